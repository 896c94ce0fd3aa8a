"""The entry point: registers FourierFT with OpenDelta's registry, and reads PEFT's FourierFT adapter folders."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opendelta.plugin_api import RegisterDeltaMethod, hookimpl

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from opendelta.plugin_api import CheckpointRecord, DeltaModel


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``fourierft``."""
    from opendelta_fourierft.model import FourierFTModel

    register(FourierFTModel)


@hookimpl
def read_checkpoint(folder: Path, backbone: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """PEFT's FourierFT adapter folders (``adapter_config.json`` with ``peft_type: "FOURIERFT"``)."""
    from opendelta_fourierft.peft_format import read_peft_fourierft

    return read_peft_fourierft(folder, backbone, delta_cls)
