"""The entry point: registers LoRA with OpenDelta's registry, and reads PEFT's LoRA adapter folders."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opendelta.plugin_api import RegisterDeltaMethod, hookimpl

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from opendelta.plugin_api import CheckpointRecord, DeltaModel


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``lora``."""
    from opendelta_lora.model import LoraModel

    register(LoraModel)


@hookimpl
def read_checkpoint(folder: Path, backbone: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """PEFT's LoRA adapter folders (``adapter_config.json``), for ``from_finetuned`` (see ``peft_format``)."""
    from opendelta_lora.peft_format import read_peft_checkpoint

    return read_peft_checkpoint(folder, backbone, delta_cls)
