"""The entry point: registers prefix tuning with OpenDelta's registry, and reads PEFT's PREFIX_TUNING folders."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opendelta.plugin_api import RegisterDeltaMethod, hookimpl

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from opendelta.plugin_api import CheckpointRecord, DeltaModel


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``prefix``."""
    from opendelta_prefix.model import PrefixModel

    register(PrefixModel)


@hookimpl
def read_checkpoint(folder: Path, backbone: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """PEFT's PREFIX_TUNING adapter folders (``adapter_config.json`` with ``peft_type: "PREFIX_TUNING"``)."""
    from opendelta_prefix.peft_format import read_peft_prefix_tuning

    return read_peft_prefix_tuning(folder, backbone, delta_cls)
