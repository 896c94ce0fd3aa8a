"""The entry point: registers AdaLoRA with OpenDelta's registry, and reads PEFT's AdaLoRA adapter folders."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opendelta.plugin_api import RegisterDeltaMethod, hookimpl

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from opendelta.plugin_api import CheckpointRecord, DeltaModel


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``adalora``."""
    from opendelta_adalora.model import AdaLoraModel

    register(AdaLoraModel)


@hookimpl
def read_checkpoint(folder: Path, backbone: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """PEFT's AdaLoRA adapter folders (``adapter_config.json``, ``peft_type: "ADALORA"``), for ``from_finetuned``."""
    from opendelta_adalora.peft_format import read_peft_adalora

    return read_peft_adalora(folder, backbone, delta_cls)
