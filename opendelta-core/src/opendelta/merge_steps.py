"""Folding a delta model's deltas into its backbone's weights and taking them out again, step by step.

Engine layer: the orchestration of :mod:`opendelta.merging`'s primitives over a list of placed deltas (which of them
can merge, whether merging changes the order they run in, the update each adds, the record that lets unmerging
subtract exactly that). ``DeltaModel.merge``/``unmerge``/``merge_and_unload`` are the public calls; they keep the
state checks and the bookkeeping of the delta model, and call these.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from opendelta.errors import DeltaStateError
from opendelta.hashing import parameter_sample
from opendelta.insertion import Insertion
from opendelta.markers import SLOTS_ATTR
from opendelta.merging import (
    MergeRecord,
    add_update,
    check_finite,
    is_mergeable,
    mark_merged,
    remove_created,
    snapshot,
    update_at_merge,
)
from opendelta.quantization import is_quantized
from opendelta.quantized_merge import merge_quantized_weight, refusals, warn_loss
from opendelta.shapes import weight_of as dequantize_weight

__all__ = ["fold_in", "forget_merged", "mergeable", "take_out", "unmergeable_names"]


def mergeable(insertions: Sequence[Insertion], owner: str) -> list[Insertion]:
    """The placed deltas whose math is a change of their host's parameters.

    Raises:
        DeltaStateError: none of them is (``owner`` names the delta model in the message).
    """
    chosen = [i for i in insertions if is_mergeable(i.delta, i.host)]
    if not chosen:
        raise DeltaStateError(
            f"{owner} has no delta that can be folded into the weights (its math is not a change of "
            f"the modified modules' parameters); it always runs as an extra step"
        )
    return chosen


def _check_order(chosen: Sequence[Insertion], names: dict[int, str], owner: str) -> None:
    """Refuse when a merged delta would run before an unmergeable one added earlier on the same module's output."""
    for insertion in chosen:
        earlier = [
            s.attr
            for s in getattr(insertion.host, SLOTS_ATTR, ())
            if s.kind == "after"
            and s.seq < insertion.seq
            and not is_mergeable(insertion.host._modules[s.attr], insertion.host)
        ]
        if earlier:
            raise DeltaStateError(
                f"{owner} cannot merge its delta on {names.get(id(insertion.host), '?')}: "
                f"{', '.join(earlier)} (added before it, not mergeable) runs on that module's output first, and a "
                f"merged delta would run before it; detach the delta model of {earlier[0]!r} first, or merge "
                f"before adding it. Nothing was merged."
            )


def _check_quantized(
    updates: Sequence[tuple[nn.Module, dict[str, torch.Tensor]]], names: dict[int, str], owner: str, dequantize: bool
) -> None:
    """Refuse, before anything changes, updates of quantized weights that cannot be written back."""
    problems = [] if dequantize else refusals(updates, names)
    if problems:
        raise DeltaStateError(
            f"{owner} cannot merge into these quantized layers: {'; '.join(problems[:3])}"
            f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}. Nothing was merged. Use "
            f"merge_and_unload(dequantize=True) for a float model with the deltas merged, or keep them unmerged"
        )


def fold_in(
    chosen: Sequence[Insertion],
    backbone: nn.Module,
    owner: str,
    *,
    safe_merge: bool,
    premerge_samples: dict[str, bytes | None],
    float_weights: dict[int, torch.Tensor] | None = None,
) -> None:
    """Merge each of ``chosen`` into its host's weights and detach it; every check first, so a refusal changes nothing.

    ``premerge_samples`` receives, by backbone name, the hash sample of each parameter before it changes (``None``
    for one merging creates), so a merged delta model's checkpoint records the hash of the backbone it belongs to.

    A quantized host's weight goes through its backend (:mod:`opendelta.quantized_merge`): requantized, with the
    loss reported in one warning; or, when ``float_weights`` is given (``merge_and_unload(dequantize=True)``), left
    as it is while the merged float weight is put into ``float_weights`` by ``id`` of the host, for the caller to
    build a float layer from.
    """
    names = {id(m): n for n, m in backbone.named_modules()}
    _check_order(chosen, names, owner)
    updates = [(i.host, dict(i.delta.merge_update(i.host))) for i in chosen]  # type: ignore[operator]
    _check_quantized(updates, names, owner, dequantize=float_weights is not None)
    if safe_merge:
        check_finite([(h, u) for h, u in updates if not is_quantized(h)], owner)
    losses = []
    for insertion, (host, update) in zip(chosen, updates, strict=True):
        prefix = names[id(host)]
        touched = list(update)
        if is_quantized(host) and "weight" in update:  # requantizing replaces the storage, whatever its names (W_q)
            touched = [n for n in update if n != "weight"] + [n for n, p in host._parameters.items() if p is not None]
        for name in dict.fromkeys(touched):
            current = host._parameters.get(name)
            full = f"{prefix}.{name}" if prefix else name
            sample = None if current is None else parameter_sample(current, host, name)
            premerge_samples.setdefault(full, sample)
        record = MergeRecord(snapshot(insertion.delta))
        insertion.detach()
        if is_quantized(host) and "weight" in update:
            change = update.pop("weight")
            if float_weights is not None:
                base = float_weights.get(id(host))
                base = dequantize_weight(host) if base is None else base
                float_weights[id(host)] = base + change.to(device=base.device, dtype=base.dtype)
            else:
                record.quantized = merge_quantized_weight(host, change)
                losses.append(record.quantized)
        record.created = add_update(host, update, 1)
        insertion.merge_record = record
        mark_merged(host, insertion.seq, True)
    warn_loss(losses, owner)


def take_out(merged: Sequence[Insertion]) -> None:
    """Subtract what :func:`fold_in` added (computed from the deltas as they were then) and re-attach the deltas."""
    updates = [update_at_merge(i.delta, i.host, i.merge_record.snapshot) for i in merged]
    for insertion, update in zip(merged, updates, strict=True):
        created = insertion.merge_record.created
        restored = insertion.merge_record.quantized
        if restored is not None:  # the quantized storage from before the merge, not a second lossy round trip
            restored.restore(insertion.host)
        skip = {*created, *(["weight"] if restored is not None else [])}
        add_update(insertion.host, {k: v for k, v in update.items() if k not in skip}, -1)
        remove_created(insertion.host, created)
        insertion.merge_record = None
        mark_merged(insertion.host, insertion.seq, False)
        insertion.attach()


def unmergeable_names(pending: Sequence[Insertion]) -> list[str]:
    """``Host.attr`` of each pending delta that cannot merge (``merge_and_unload`` refuses while there is one)."""
    return [f"{type(i.host).__name__}.{i.attr}" for i in pending if not is_mergeable(i.delta, i.host)]


def forget_merged(merged: Sequence[Insertion]) -> None:
    """Merged for good: no delta is waiting to be unmerged on these hosts any more."""
    for insertion in merged:
        mark_merged(insertion.host, insertion.seq, False)
