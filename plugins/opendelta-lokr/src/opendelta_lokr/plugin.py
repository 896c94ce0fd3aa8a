"""The entry point: registers LoKr with OpenDelta's registry, and reads PEFT's LoKr adapter folders."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opendelta.plugin_api import RegisterDeltaMethod, hookimpl

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from opendelta.plugin_api import CheckpointRecord, DeltaModel


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``lokr``."""
    from opendelta_lokr.model import LoKrModel

    register(LoKrModel)


@hookimpl
def read_checkpoint(folder: Path, backbone: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """PEFT's LoKr adapter folders (``adapter_config.json`` with ``peft_type: "LOKR"``), for ``from_finetuned``."""
    from opendelta_lokr.peft_format import read_peft_lokr

    return read_peft_lokr(folder, backbone, delta_cls)
