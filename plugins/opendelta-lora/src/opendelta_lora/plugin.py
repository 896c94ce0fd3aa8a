"""The entry point: registers LoRA with OpenDelta's registry."""

from __future__ import annotations

from opendelta import hookimpl
from opendelta.hookspecs import RegisterDeltaMethod


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``lora``."""
    from opendelta_lora.config import LoraConfig
    from opendelta_lora.model import LoraModel

    register("lora", LoraConfig, LoraModel)
