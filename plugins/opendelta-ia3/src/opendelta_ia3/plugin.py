"""The entry point: registers IA3 with OpenDelta's registry."""

from __future__ import annotations

from opendelta.plugin_api import RegisterDeltaMethod, hookimpl


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``ia3``."""
    from opendelta_ia3.model import IA3Model

    register(IA3Model)
