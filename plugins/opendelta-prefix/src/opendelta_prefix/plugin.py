"""The entry point: registers prefix tuning with OpenDelta's registry."""

from __future__ import annotations

from opendelta import hookimpl
from opendelta.hookspecs import RegisterDeltaMethod


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``prefix``."""
    from opendelta_prefix.config import PrefixConfig
    from opendelta_prefix.model import PrefixModel

    register("prefix", PrefixConfig, PrefixModel)
