"""The entry point: registers the low-rank adapter with OpenDelta's registry."""

from __future__ import annotations

from opendelta import hookimpl
from opendelta.hookspecs import RegisterDeltaMethod


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``lowrankadapter`` (the original's ``delta_type``), also reachable as ``low_rank_adapter``."""
    from opendelta_low_rank_adapter.config import LowRankAdapterConfig
    from opendelta_low_rank_adapter.model import LowRankAdapterModel

    register("lowrankadapter", LowRankAdapterConfig, LowRankAdapterModel, aliases=("low_rank_adapter",))
