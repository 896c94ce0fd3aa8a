"""The entry point: registers OFT and BOFT with OpenDelta's registry, and reads PEFT's adapter folders of both."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opendelta.plugin_api import RegisterDeltaMethod, hookimpl

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from opendelta.plugin_api import CheckpointRecord, DeltaModel


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``oft`` and ``boft``."""
    from opendelta_oft.boft_model import BOFTModel
    from opendelta_oft.model import OFTModel

    register(OFTModel)
    register(BOFTModel)


@hookimpl
def read_checkpoint(folder: Path, backbone: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """PEFT's OFT and BOFT adapter folders (``peft_type`` ``"OFT"``/``"BOFT"``), for ``from_finetuned``."""
    from opendelta_oft.peft_boft import read_peft_boft
    from opendelta_oft.peft_oft import read_peft_oft

    return read_peft_oft(folder, backbone, delta_cls) or read_peft_boft(folder, backbone, delta_cls)
