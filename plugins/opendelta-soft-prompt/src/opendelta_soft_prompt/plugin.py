"""The entry point: registers soft prompt tuning with OpenDelta's registry."""

from __future__ import annotations

from opendelta.plugin_api import RegisterDeltaMethod, hookimpl


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``soft_prompt``."""
    from opendelta_soft_prompt.model import SoftPromptModel

    register(SoftPromptModel)
