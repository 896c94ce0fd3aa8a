"""The entry point: registers IA3 with OpenDelta's registry, and reads PEFT's IA3 adapter folders."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opendelta.plugin_api import RegisterDeltaMethod, hookimpl

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from opendelta.plugin_api import CheckpointRecord, DeltaModel


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``ia3``."""
    from opendelta_ia3.model import IA3Model

    register(IA3Model)


@hookimpl
def read_checkpoint(folder: Path, backbone: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """PEFT's IA3 adapter folders (``adapter_config.json`` with ``peft_type: "IA3"``), for ``from_finetuned``."""
    from opendelta_ia3.peft_format import read_peft_ia3

    return read_peft_ia3(folder, backbone, delta_cls)
