"""The entry point: registers soft prompt tuning with OpenDelta's registry."""

from __future__ import annotations

from opendelta import hookimpl
from opendelta.hookspecs import RegisterDeltaMethod


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``soft_prompt``."""
    from opendelta_soft_prompt.config import SoftPromptConfig
    from opendelta_soft_prompt.model import SoftPromptModel

    register("soft_prompt", SoftPromptConfig, SoftPromptModel)
