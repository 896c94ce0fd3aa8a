"""Glue between delta models and training stacks: the transformers ``Trainer``, DDP/accelerate/FSDP2, checkpointing.

Not imported by ``import opendelta``. :mod:`~opendelta.integrations.aliases`,
:mod:`~opendelta.integrations.checkpointing` and :mod:`~opendelta.integrations.distributed` need only torch;
``DeltaTrainerCallback`` (:mod:`~opendelta.integrations.trainer`) is resolved on first access, so that importing
this package does not import transformers' trainer machinery.
"""

from __future__ import annotations

from typing import Any

from opendelta.integrations.aliases import first_names_only
from opendelta.integrations.checkpointing import (
    checkpointing_enabled,
    enable_gradient_checkpointing,
    ensure_input_grads,
)
from opendelta.integrations.distributed import (
    check_in_sync,
    full_delta_state_dict,
    is_main_process,
    save_finetuned_distributed,
)

__all__ = [
    "DeltaTrainerCallback",
    "check_in_sync",
    "checkpointing_enabled",
    "enable_gradient_checkpointing",
    "ensure_input_grads",
    "first_names_only",
    "full_delta_state_dict",
    "is_main_process",
    "save_finetuned_distributed",
]


def __getattr__(name: str) -> Any:
    """Import ``DeltaTrainerCallback`` (and transformers' callback module) only when it is asked for."""
    if name == "DeltaTrainerCallback":
        from opendelta.integrations.trainer import DeltaTrainerCallback

        return DeltaTrainerCallback
    raise AttributeError(f"module 'opendelta.integrations' has no attribute {name!r}")
