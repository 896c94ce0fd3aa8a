"""The entry point: registers LN tuning with OpenDelta's registry."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from opendelta.plugin_api import RegisterDeltaMethod, hookimpl

if TYPE_CHECKING:
    from torch import nn

    from opendelta.plugin_api import CheckpointRecord, DeltaModel


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``ln_tuning``."""
    from opendelta_ln_tuning.model import LNTuningModel

    register(LNTuningModel)


@hookimpl
def read_checkpoint(folder: Path, backbone: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """PEFT's LN tuning adapter folders (``adapter_config.json``), for ``from_finetuned`` (see ``peft_format``)."""
    from opendelta_ln_tuning.peft_format import read_peft_ln_tuning

    return read_peft_ln_tuning(folder, backbone, delta_cls)
