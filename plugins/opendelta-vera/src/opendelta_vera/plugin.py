"""The entry point: registers VeRA with OpenDelta's registry, and reads PEFT's VeRA adapter folders."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opendelta.plugin_api import RegisterDeltaMethod, hookimpl

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from opendelta.plugin_api import CheckpointRecord, DeltaModel


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``vera``."""
    from opendelta_vera.model import VeraModel

    register(VeraModel)


@hookimpl
def read_checkpoint(folder: Path, backbone: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """PEFT's VeRA adapter folders (``adapter_config.json`` with ``peft_type: "VERA"``), for ``from_finetuned``."""
    from opendelta_vera.peft_format import read_peft_vera

    return read_peft_vera(folder, backbone, delta_cls)
