"""The entry point: registers prefix tuning with OpenDelta's registry."""

from __future__ import annotations

from opendelta.plugin_api import RegisterDeltaMethod, hookimpl


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``prefix``."""
    from opendelta_prefix.model import PrefixModel

    register(PrefixModel)
