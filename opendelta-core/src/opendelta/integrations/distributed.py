"""Saving and checking a delta model trained by several processes (DDP, accelerate, FSDP2 ``fully_shard``).

What needs no glue: DDP (and accelerate, which wraps the model in DDP) broadcasts every parameter from rank 0 when
it wraps the model, so deltas initialised differently on each rank start equal, and its reducer holds only the
parameters that require grad, so after ``freeze_module`` gradients are averaged over the delta (and task head)
parameters alone and ``find_unused_parameters`` is not needed. What does: the checkpoint must be written once, by
rank 0, and every rank must wait for it before reading it; and under FSDP2 every parameter is a ``DTensor`` shard,
so the delta's tensors must be gathered (a collective call every rank makes) and the backbone hash computed from
the full tensors, not from this rank's shard.

Every function here is called by *every* rank; they run in plain single-process code too.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from opendelta.backbone_check import backbone_record
from opendelta.checkpoint import config_document
from opendelta.errors import DeltaStateError
from opendelta.hashing import parameter_sample
from opendelta.markers import delta_parameter_names
from opendelta.saving import write_checkpoint

if TYPE_CHECKING:
    from opendelta.base import DeltaModel

__all__ = ["check_in_sync", "full_delta_state_dict", "is_main_process", "save_finetuned_distributed"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """Whether this process is rank 0 (always true without an initialised process group)."""
    return not _distributed() or dist.get_rank() == 0


def _is_sharded(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "full_tensor")  # a DTensor (FSDP2, tensor parallel), without importing its module


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if _is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def full_delta_state_dict(delta_model: DeltaModel) -> dict[str, torch.Tensor]:
    """What ``save_finetuned`` writes, with sharded tensors gathered: the delta's and the trainable backbone's.

    Under FSDP2 each tensor is all-gathered, so every rank must call this, in the same order (they do when the
    model was built the same way on every rank).
    """
    backbone = delta_model.backbone_model
    deltas = delta_parameter_names(backbone)
    trainable = {n: p.detach() for n, p in backbone.named_parameters() if p.requires_grad and n not in deltas}
    return {name: _full(tensor) for name, tensor in {**trainable, **delta_model.delta_state_dict()}.items()}


def _full_samples(delta_model: DeltaModel) -> dict[str, bytes | None]:
    """The hash's samples of the sharded backbone parameters, read from their gathered full tensors."""
    samples: dict[str, bytes | None] = {}
    backbone = delta_model.backbone_model
    deltas = delta_parameter_names(backbone)  # not hashed
    for name, param in sorted(backbone.named_parameters(), key=lambda item: item[0]):
        if _is_sharded(param) and name not in deltas:
            samples[name] = parameter_sample(_full(param.detach()))  # one parameter gathered at a time
    return samples


def save_finetuned_distributed(delta_model: DeltaModel, path: str | os.PathLike[str]) -> Path:
    """``delta_model.save_finetuned(path)`` written once, by rank 0; every rank returns when the checkpoint exists.

    Call it on every rank (a barrier follows the write, and under FSDP2 the tensors are gathered by all ranks).
    Pass the :class:`~opendelta.DeltaModel`, not the DDP/FSDP-wrapped backbone: the delta model keeps the unwrapped
    one. Without a process group it is ``save_finetuned``.

    Returns:
        The checkpoint folder.
    """
    folder = Path(path)
    backbone = delta_model.backbone_model
    if not any(_is_sharded(p) for p in backbone.parameters()):
        if is_main_process():
            delta_model.save_finetuned(folder)
    else:
        tensors = full_delta_state_dict(delta_model)
        samples = {**delta_model.premerge_samples(), **_full_samples(delta_model)}
        record = backbone_record(backbone, tensors, samples=samples)
        document = config_document(delta_model.config, record)  # every rank's config records the hash
        if is_main_process():
            write_checkpoint(folder, document, tensors)
    if _distributed():
        dist.barrier()
    return folder


def _digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    out = {}
    for name, tensor in tensors.items():
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        out[name] = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
    return out


def check_in_sync(delta_model: DeltaModel) -> None:
    """Check that every rank holds bit-identical delta (and trainable backbone) tensors; call it on every rank.

    Data-parallel training keeps replicas identical only if every rank applies the same averaged update; a rank
    that skipped a step, used another seed without DDP's initial broadcast, or trained outside DDP diverges
    silently. This compares a SHA-256 of each tensor across ranks (one small all-gather of strings).

    Raises:
        DeltaStateError: some tensor differs between ranks; the message names the tensors and ranks.
    """
    if not _distributed():
        return
    mine = _digests(full_delta_state_dict(delta_model))
    every: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    reference = every[0] or {}
    differ = [
        (name, rank)
        for rank, theirs in enumerate(every)
        for name in sorted(reference)
        if (theirs or {}).get(name) != reference[name]
    ]
    if differ:
        shown = ", ".join(f"{name} (rank {rank})" for name, rank in differ[:8])
        raise DeltaStateError(
            f"delta tensors differ between ranks: {shown}{'...' if len(differ) > 8 else ''}; wrap the backbone in "
            f"DistributedDataParallel (or accelerate's prepare) before training and step every rank's optimizer"
        )
