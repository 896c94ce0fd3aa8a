"""The entry point: registers the low-rank adapter with OpenDelta's registry."""

from __future__ import annotations

from opendelta.plugin_api import RegisterDeltaMethod, hookimpl


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``low_rank_adapter``, the ``delta_type`` 0.3.2 wrote (with ``lowrankadapter``, its config's alias).

    Earlier builds of this plugin registered and wrote ``lowrankadapter`` (the name the 0.3.2 manual's text
    uses); the alias keeps the checkpoints they saved loading.
    """
    from opendelta_low_rank_adapter.model import LowRankAdapterModel

    register(LowRankAdapterModel)  # with the alias its config declares
