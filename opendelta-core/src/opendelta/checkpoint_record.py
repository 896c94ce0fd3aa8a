"""What a checkpoint reader returns: one record, whatever the format, for the one apply step to load.

Persistence layer. A reader (OpenDelta's own format in :mod:`opendelta.checkpoint`, OpenDelta 0.3.x in
:mod:`opendelta.legacy`, another library's through the ``read_checkpoint`` hook, such as PEFT's LoRA folders in
``opendelta-lora``) reads and checks its files and says what to build; :func:`opendelta.checkpoint.apply_checkpoint`
builds the delta on the backbone, checks every tensor against it, copies them (taking the delta out again on any
error) and leaves the backbone in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from opendelta.base import DeltaModel
    from opendelta.config import DeltaConfig

__all__ = ["CheckpointRecord"]


@dataclass(frozen=True)
class CheckpointRecord:
    """One checkpoint, read: the method, its config, its tensors, and what the apply step must still check.

    Attributes:
        source: the folder, as messages name it.
        tensor_source: the file the tensors came from, as the tensor checks name it.
        model_cls: the delta method to build.
        config: its config (already checked).
        tensors: the delta's tensors under :meth:`DeltaModel.delta_state_dict`'s names, plus backbone parameters
            (a task head) under their backbone names.
        saved: the checkpoint's ``config.json`` when it is OpenDelta's format (its backbone record is checked:
            hash, declared tensors, not loaded twice); ``None`` for a format without one.
        translate: for a format whose names are known only once the delta is built (OpenDelta 0.3.x), the function
            ``(delta_model, tensors) -> tensors`` that renames them; ``None`` when ``tensors`` are final.
        describe: the format's name in a mismatch message (``"the 'lora' delta built from its own config"``).
    """

    source: str
    tensor_source: str
    model_cls: type[DeltaModel]
    config: DeltaConfig
    tensors: Mapping[str, torch.Tensor]
    saved: Mapping[str, Any] | None = None
    translate: Callable[[DeltaModel, Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    describe: str = ""
    checks: dict[str, bool] = field(default_factory=dict)
    """Reader-specific switches for the apply step (``{"caller_tensors": True}``: tensors the caller passed)."""
