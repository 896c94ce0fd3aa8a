"""Loading another checkpoint into a delta model that exists, in place (``DeltaModel.load_weights``).

Why: serving many tenants from one model, often compiled with ``torch.compile``. Building a new delta model per
tenant re-creates parameters (new storage, new hooks), which a compiled model sees as new code and recompiles.
Copying a tenant's tensors into the parameters and buffers already attached (``copy_``: same storage, same
``data_ptr``) changes only values, which compiled graphs read and never guard on.

The order is: read the checkpoint with the readers ``from_finetuned`` uses (OpenDelta's own folders, 0.3.x folders,
other libraries' folders through the plugins' ``read_checkpoint`` hook, or a state dict), then check everything
(method, hyper-parameters, tensor names, shapes, dtypes and values, the backbone hash), then copy. Any error comes
before the first copy, so the delta model is left as it was.

The generic rule: same tensor names and shapes, same hyper-parameters except the addressing and freezing fields
(:data:`UNCOMPARED_FIELDS`; the tensor names already say which modules are modified). A delta module may widen it
with :class:`~opendelta.delta_protocols.HotLoadable` (a :class:`~opendelta.delta_protocols.LoadPlan`): tensors
that may be smaller along some dimensions (zero-padded here), buffers its config sets, fields that may differ.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from opendelta.backbone_check import backbone_matches, forget_loaded, mark_loaded
from opendelta.checkpoint import backbone_parameters_in, read_checkpoint_folder
from opendelta.checkpoint_record import CheckpointRecord
from opendelta.concurrency import switching
from opendelta.delta_protocols import HotLoadable, LoadPlan
from opendelta.errors import CheckpointError, DeltaStateError
from opendelta.tensor_checks import checked_tensors, plain_tensors

if TYPE_CHECKING:
    from opendelta.base import DeltaModel
    from opendelta.config import DeltaConfig

__all__ = ["UNCOMPARED_FIELDS", "LoadResult", "load_weights"]

UNCOMPARED_FIELDS = frozenset(
    {
        "modified_modules",
        "exclude_modules",
        "common_structure",
        "unfrozen_modules",
        "backbone_class",
        "backbone_checkpoint_name",
        "backbone_hash",
    }
)
"""Config fields a checkpoint may set differently: addressing (the tensor names say which modules it modifies, and
must be this model's), what ``freeze_module`` trains, and the backbone record (checked by its hash instead)."""


class LoadResult(NamedTuple):
    """What ``load_weights`` left out, by tensor name (both empty with ``strict=True``)."""

    missing_keys: list[str]
    """This delta model's tensors the checkpoint does not hold: they keep their values."""
    unexpected_keys: list[str]
    """The checkpoint's tensors this delta model has no place for: not loaded."""


def _read(delta_model: DeltaModel, source: Any, check_hash: bool) -> CheckpointRecord:
    """The checkpoint as a record; a state dict is taken as this model's own config with those tensors."""
    backbone = delta_model.backbone_model
    if isinstance(source, Mapping):
        tensors = plain_tensors(source, "the state dict")
        return CheckpointRecord("the state dict", "the state dict", type(delta_model), delta_model.config, tensors)
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_dir():
        raise CheckpointError(
            f"load_weights() reads a local folder written by save_finetuned (or a PEFT adapter folder a plugin "
            f"reads) or a state dict of tensors, got {source!r}; download a Hub checkpoint first "
            f"(huggingface_hub.snapshot_download) and pass its folder"
        )
    record = read_checkpoint_folder(type(delta_model), source, backbone, check_hash=check_hash, into=delta_model)
    if record.model_cls is not type(delta_model):
        raise CheckpointError(
            f"{source} holds a {record.model_cls.__name__} ({record.model_cls.delta_type!r}) delta, not one for "
            f"{type(delta_model).__name__}; load it with {record.model_cls.__name__}.from_finetuned instead"
        )
    return record


def _plans(delta_model: DeltaModel, config: DeltaConfig) -> dict[int, tuple[nn.Module, LoadPlan]]:
    """Each delta module's plan for a checkpoint of ``config``, by the module's id (the generic rule: empty)."""
    plans = {}
    for insertion in delta_model.insertions():
        delta = insertion.delta
        plans[id(delta)] = (delta, delta.load_plan(config) if isinstance(delta, HotLoadable) else LoadPlan())
    return plans


def _check_config(delta_model: DeltaModel, record: CheckpointRecord, plans: Mapping[int, Any]) -> set[str]:
    """Refuse hyper-parameters that differ where no plan allows it; returns the fields to take from the checkpoint."""
    taken = {f for _, plan in plans.values() for f in plan.taken}
    free = UNCOMPARED_FIELDS | taken | {f for _, plan in plans.values() for f in plan.kept}
    own, theirs = delta_model.config.to_dict(), record.config.to_dict()
    differ = [
        f"{k}: checkpoint {theirs.get(k)!r} vs this model {v!r}"
        for k, v in own.items()
        if k not in free and theirs.get(k) != v
    ]
    if differ:
        raise CheckpointError(
            f"{record.source} was trained with other hyper-parameters than {type(delta_model).__name__} has "
            f"({'; '.join(differ[:5])}), which change what its tensors compute; build the delta model with the "
            f"checkpoint's values to hot-load it (or load it on its own with from_finetuned). Nothing was changed"
        )
    return taken


def _owners(plans: Mapping[int, tuple[nn.Module, LoadPlan]]) -> dict[tuple[int, int], tuple[LoadPlan, str]]:
    """Each delta tensor's plan and local name, by its storage (``delta_state_dict`` names tensors by position)."""
    owners = {}
    for delta, plan in plans.values():
        for local, tensor in delta.state_dict().items():
            owners[(tensor.untyped_storage().data_ptr(), tensor.storage_offset())] = (plan, local)
    return owners


def _fitted(name: str, tensor: torch.Tensor, own: torch.Tensor, dims: tuple[int, ...], source: str) -> torch.Tensor:
    """``tensor`` shaped as ``own``: zero-padded along ``dims`` where it is smaller, refused where it cannot fit."""
    if tensor.shape == own.shape:
        return tensor
    fits = tensor.dim() == own.dim() and all(
        t == o or (d in dims and t < o) for d, (t, o) in enumerate(zip(tensor.shape, own.shape, strict=True))
    )
    if not fits:
        padding = f" (it may be smaller along dims {list(dims)}: zero-padded)" if dims else ""
        raise CheckpointError(
            f"{source}: {name} has shape {tuple(tensor.shape)}, this delta model's is {tuple(own.shape)}{padding}; "
            f"build the delta model with the checkpoint's sizes (a LoRA with max_rank= holds any lower rank). "
            f"Nothing was changed"
        )
    padded = own.new_zeros(own.shape)
    padded[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return padded


def _plan_copies(
    delta_model: DeltaModel, record: CheckpointRecord, strict: bool
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], set[str], LoadResult]:
    """Every ``(destination, value)`` pair of the load, checked, and the config fields to take.

    Raises before anything is written: the caller copies only once this returns.
    """
    backbone = delta_model.backbone_model
    plans = _plans(delta_model, record.config)
    taken = _check_config(delta_model, record, plans)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    tensors = dict(record.tensors)
    if record.translate is not None:  # an OpenDelta 0.3.x file: names known once the delta is built (it is)
        tensors = record.translate(delta_model, tensors)
    backbone_part = backbone_parameters_in(backbone, tensors)
    own = delta_model.delta_state_dict()
    delta_part = {n: t for n, t in tensors.items() if n not in backbone_part}
    missing, unexpected = sorted(set(own) - set(delta_part)), sorted(set(delta_part) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{record.source} does not hold this {type(delta_model).__name__}'s tensors: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; it was saved from a delta on other modules (build the delta model with "
            f"its modified_modules), or pass strict=False to load the tensors both have. Nothing was changed"
        )
    delta_part = checked_tensors({n: t for n, t in delta_part.items() if n in own}, record.tensor_source, targets=own)
    owners = _owners(plans)
    for name, tensor in delta_part.items():
        target = own[name]
        plan, local = owners.get((target.untyped_storage().data_ptr(), target.storage_offset()), (LoadPlan(), name))
        pairs.append((target, _fitted(name, tensor, target, tuple(plan.padded.get(local, ())), record.source)))
    params = dict(backbone.named_parameters())
    for name, tensor in checked_tensors(backbone_part, record.tensor_source, targets=params).items():
        pairs.append((params[name], _fitted(name, tensor, params[name], (), record.source)))
    for delta, plan in plans.values():
        for local, value in plan.values.items():
            buffer = delta.get_buffer(local)
            pairs.append((buffer, _fitted(local, value.to(buffer.dtype), buffer, (), record.source)))
    return pairs, taken, LoadResult(missing, unexpected)


def load_weights(delta_model: DeltaModel, source: Any, *, check_hash: bool = True, strict: bool = True) -> LoadResult:
    """Copy a checkpoint's tensors into ``delta_model``'s own, in place (see ``DeltaModel.load_weights``)."""
    delta_model._check_not_unloaded("load_weights")
    if delta_model.merged:
        raise DeltaStateError(
            f"{type(delta_model).__name__} is merged into the backbone's weights; load_weights() would change the "
            f"deltas but not the merged weights. Call unmerge() first (and merge() again after). Nothing was changed"
        )
    record = _read(delta_model, source, check_hash)
    pairs, taken, result = _plan_copies(delta_model, record, strict)
    backbone = delta_model.backbone_model
    saved = record.saved
    if saved is not None and saved.get("backbone_hash") and not check_hash:
        overrides = backbone_parameters_in(backbone, record.tensors)
        if not backbone_matches(saved, backbone, overrides, record.source):
            warnings.warn(
                f"the delta in {record.source} was trained on another backbone (hash differs); loaded anyway "
                f"(check_hash=False)",
                stacklevel=3,
            )
    with switching(backbone, f"{type(delta_model).__name__}.load_weights()"), torch.no_grad():
        for target, value in pairs:
            target.copy_(value)
    config = delta_model.config
    for name in sorted(taken):
        setattr(config, name, getattr(record.config, name))
    if saved is not None:
        config.backbone_hash = saved.get("backbone_hash")
        forget_loaded(backbone, delta_model)
        mark_loaded(saved, backbone, record.source, delta_model)
    return result
