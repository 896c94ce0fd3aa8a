"""Merging: folding a delta into the weights of the module it modifies, and taking it out again.

A delta whose math is an additive change of its module's parameters (LoRA's ``W + s B A``, BitFit's ``b + delta``)
can be merged: the parameters are updated in place (the same tensor objects, so optimizers and tied weights keep
pointing at them) and the delta is detached, so the merged model runs exactly the bare model's code at its speed. A
delta module opts in by implementing :class:`Mergeable`; core decides, checks and applies.

Unmerging subtracts again; like any floating-point round trip it restores the weights to within rounding, not
bit for bit (``merge`` followed by ``unmerge`` is exact to float tolerance, and repeated merges are no-ops). What is
subtracted is what was added: the update is computed from the delta's tensors as they were at merge time (a
:class:`MergeRecord` keeps a copy of them, small next to the weights), so a delta changed while merged (loaded,
perturbed, trained by mistake) cannot leave its change in the backbone. The record lives on the insertion, so it
survives ``deepcopy`` and pickling of the delta model.

Merging moves a delta in front of the sequential deltas that run after the module: exact only when no delta that is
not itself an additive change of the module's parameters runs there before it. Core refuses a merge that would
break that, and, through a marker on the module (:func:`merged_after`), re-attaching such a delta while a later one
is merged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from opendelta.delta_protocols import Mergeable, class_implements
from opendelta.errors import DeltaStateError
from opendelta.markers import WRAPPED_ATTR

__all__ = [
    "MergeRecord",
    "Mergeable",
    "add_update",
    "check_finite",
    "is_mergeable",
    "mark_merged",
    "merged_after",
    "remove_created",
    "snapshot",
    "update_at_merge",
]

MERGED_ATTR = "_opendelta_merged"
"""On a module while deltas are merged into its weights: the insertion order numbers (``seq``) of those deltas."""


def is_mergeable(delta: nn.Module, host: nn.Module) -> bool:
    """Whether ``delta`` implements :class:`Mergeable` and can be merged into ``host``."""
    return class_implements(delta, Mergeable) and delta.can_merge(host)


def check_finite(updates: Iterable[tuple[nn.Module, Mapping[str, torch.Tensor]]], where: str) -> None:
    """Refuse updates that would put NaN or Inf into a parameter, naming it (a "safe merge")."""
    for host, values in updates:
        for name, update in values.items():
            current = host._parameters.get(name)
            merged = update if current is None else current + update.to(device=current.device, dtype=current.dtype)
            if not torch.isfinite(merged).all():
                raise DeltaStateError(
                    f"{where}: merging would write NaN or Inf into {type(host).__name__}.{name}; nothing was merged"
                )


def add_update(host: nn.Module, update: Mapping[str, torch.Tensor], sign: int) -> list[str]:
    """Add (``sign=1``) or subtract (``-1``) ``update`` in place; returns the names of parameters it created.

    Subtracting from a parameter that adding created removes it (it is set back to ``None``, as an
    ``nn.Linear(bias=False)`` holds its bias).
    """
    created = []
    with torch.no_grad():
        for name, value in update.items():
            current = host._parameters.get(name)
            if current is None:
                if sign > 0:
                    host.register_parameter(name, nn.Parameter(value.detach().clone(), requires_grad=False))
                    created.append(name)
            else:  # the module may have moved (device, dtype) since the update was computed
                current.add_(value.to(device=current.device, dtype=current.dtype), alpha=sign)
    return created


def remove_created(host: nn.Module, names: Iterable[str]) -> None:
    """Drop parameters :func:`add_update` created."""
    for name in names:
        host._parameters[name] = None


@dataclass
class MergeRecord:
    """What merging one delta did, to undo exactly that."""

    snapshot: dict[str, torch.Tensor]
    """The delta's own tensors at merge time (see :func:`snapshot`)."""
    created: list[str] = field(default_factory=list)
    """Parameters of the module that merging created (removed again by unmerging)."""
    quantized: Any = None
    """For a quantized module: the :class:`~opendelta.quantized_merge.QuantizedMerge` whose saved storage an
    unmerge puts back (its weight is restored, not subtracted from)."""


def _own_tensors(delta: nn.Module) -> dict[str, torch.Tensor]:

    wrapped = getattr(delta, WRAPPED_ATTR, None)
    tensors = {**dict(delta.named_parameters()), **dict(delta.named_buffers())}
    return {n: t for n, t in tensors.items() if not wrapped or not (n == wrapped or n.startswith(wrapped + "."))}


def snapshot(delta: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the delta's own parameters and buffers (a replacement's wrapped original left out)."""
    return {name: tensor.detach().clone() for name, tensor in _own_tensors(delta).items()}


def update_at_merge(delta: nn.Module, host: nn.Module, saved: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``delta.merge_update(host)`` as it was when ``saved`` was taken: what merging added, to subtract it.

    When the delta changed since, its saved tensors are put in for the computation and its own put back after.
    """
    tensors = _own_tensors(delta)
    unchanged = tensors.keys() == saved.keys() and all(
        t.dtype == saved[n].dtype and t.device == saved[n].device and torch.equal(t, saved[n])
        for n, t in tensors.items()
    )
    if unchanged:
        return dict(delta.merge_update(host))  # type: ignore[attr-defined]
    if tensors.keys() != saved.keys() or any(t.shape != saved[n].shape for n, t in tensors.items()):
        raise DeltaStateError(
            f"cannot unmerge the {type(delta).__name__} on {type(host).__name__}: its parameters were replaced by "
            f"ones of other names or shapes while it was merged, so what merging added cannot be recomputed; "
            f"nothing was unmerged"
        )
    now = {name: tensor.detach().clone() for name, tensor in tensors.items()}
    with torch.no_grad():
        try:
            for name, tensor in tensors.items():
                tensor.copy_(saved[name])
            return {k: v.detach().clone() for k, v in delta.merge_update(host).items()}  # type: ignore[attr-defined]
        finally:
            for name, tensor in tensors.items():
                tensor.copy_(now[name])


def mark_merged(host: nn.Module, seq: int, merged: bool) -> None:
    """Note on ``host`` that the delta inserted as number ``seq`` is merged into its weights (or no longer is).

    The attribute goes with the last one, leaving the module as it was.
    """
    seqs = set(host.__dict__.get(MERGED_ATTR, ()))
    seqs = seqs | {seq} if merged else seqs - {seq}
    if seqs:
        host.__dict__[MERGED_ATTR] = tuple(sorted(seqs))
    else:
        host.__dict__.pop(MERGED_ATTR, None)


def merged_after(host: nn.Module, seq: int) -> bool:
    """Whether a delta inserted after number ``seq`` is merged into ``host``'s weights."""
    return any(other > seq for other in host.__dict__.get(MERGED_ATTR, ()))
