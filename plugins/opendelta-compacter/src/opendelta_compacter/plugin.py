"""The entry point: registers Compacter with OpenDelta's registry."""

from __future__ import annotations

from opendelta.plugin_api import RegisterDeltaMethod, hookimpl


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``compacter``."""
    from opendelta_compacter.model import CompacterModel

    register(CompacterModel)
