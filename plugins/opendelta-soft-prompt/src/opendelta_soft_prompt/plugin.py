"""The entry point: registers soft prompt tuning with OpenDelta's registry, and reads PEFT's PROMPT_TUNING folders."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opendelta.plugin_api import RegisterDeltaMethod, hookimpl

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from opendelta.plugin_api import CheckpointRecord, DeltaModel


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``soft_prompt``."""
    from opendelta_soft_prompt.model import SoftPromptModel

    register(SoftPromptModel)


@hookimpl
def read_checkpoint(folder: Path, backbone: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """PEFT's PROMPT_TUNING adapter folders (``adapter_config.json`` with ``peft_type: "PROMPT_TUNING"``)."""
    from opendelta_soft_prompt.peft_format import read_peft_prompt_tuning

    return read_peft_prompt_tuning(folder, backbone, delta_cls)
