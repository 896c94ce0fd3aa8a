"""The entry point: registers LoHa with OpenDelta's registry, and reads PEFT's LoHa adapter folders."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opendelta.plugin_api import RegisterDeltaMethod, hookimpl

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from opendelta.plugin_api import CheckpointRecord, DeltaModel


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``loha``."""
    from opendelta_loha.model import LoHaModel

    register(LoHaModel)


@hookimpl
def read_checkpoint(folder: Path, backbone: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """PEFT's LoHa adapter folders (``adapter_config.json`` with ``peft_type: "LOHA"``), for ``from_finetuned``."""
    from opendelta_loha.peft_format import read_peft_loha

    return read_peft_loha(folder, backbone, delta_cls)
