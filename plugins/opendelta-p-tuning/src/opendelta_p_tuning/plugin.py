"""The entry point: registers p-tuning with OpenDelta's registry, and reads PEFT's P_TUNING adapter folders."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opendelta.plugin_api import RegisterDeltaMethod, hookimpl

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from opendelta.plugin_api import CheckpointRecord, DeltaModel


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``p_tuning`` (alias ``ptuning``)."""
    from opendelta_p_tuning.model import PTuningModel

    register(PTuningModel)


@hookimpl
def read_checkpoint(folder: Path, backbone: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """PEFT's P_TUNING adapter folders (``adapter_config.json`` with ``peft_type: "P_TUNING"``)."""
    from opendelta_p_tuning.peft_format import read_peft_p_tuning

    return read_peft_p_tuning(folder, backbone, delta_cls)
