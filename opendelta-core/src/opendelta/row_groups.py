"""Running routed deltas on their own rows only, at little more than the cost of one pass.

Under :func:`opendelta.route_rows` each delta of one module applies to the rows of its delta model. Done row set by
row set with ``index_select`` / ``index_add`` per delta, the scatter of ``index_add`` on the batch dimension and a
full copy of the hidden states per delta cost several times the bare model with tens of tasks. Instead, a run of
routed deltas of one module is applied as one group:

* the batch is taken in owner order once (rows of one task are contiguous blocks; a batch built task by task
  already is, and then nothing is copied), each delta computes on its block as a view, and the blocks are joined
  once (then put back in the batch's order once);
* many LoRA-like deltas (:class:`~opendelta.delta_protocols.LowRankBranch`) of one module become one gathered
  batched product: their factors are stacked (zero-padded to the largest rank, zeros for rows without one), each row
  gathers its own, and ``baddbmm`` adds ``x A_row^T B_row^T`` to the output in one step, as S-LoRA's and Punica's
  BGMV kernels do. Both forms are differentiable, so routed training gets what separate passes get.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import nn

from opendelta.delta_protocols import FusedParallel, LowRankBranch, LowRankFactors, class_implements
from opendelta.routing import Routing, RowPlan

__all__ = ["BATCHED_FROM", "Step", "add_parallel", "run_routed"]

Step = tuple[Literal["sequential", "parallel"], nn.Module, "torch.Tensor | None"]
"""One delta to apply to a module's hidden states: sequential (``hidden = delta(hidden)``) or parallel
(``hidden = hidden + delta(x)``, with its input ``x``)."""

BATCHED_FROM = 3
"""From how many routed LoRA-like deltas on one module the gathered product replaces per-block calls: below it the
blocks' own matrix products are as fast and gather nothing (measured in ``nox -s bench``)."""


def add_parallel(delta: nn.Module, hidden: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``hidden + delta(x)`` for every row, fused when the delta offers it."""
    return delta.add_to(hidden, x) if class_implements(delta, FusedParallel) else hidden + delta(x)


def run_routed(steps: Sequence[Step], hidden: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Apply ``steps`` in order, each routed delta on its rows only, runs of routed deltas as one group."""
    plan = routing.plan(hidden.shape[0], hidden.device)
    index = 0
    while index < len(steps):
        kind, delta, x = steps[index]
        if routing.owner_of(delta) is None:  # not routed: every row
            hidden = delta(hidden) if kind == "sequential" else add_parallel(delta, hidden, x)  # type: ignore[arg-type]
            index += 1
            continue
        end = index + 1
        while end < len(steps) and _joins(steps[end], kind, x, routing):
            end += 1
        group = steps[index:end]
        if kind == "parallel":
            hidden = _add_group([d for _k, d, _x in group], hidden, x, routing, plan)  # type: ignore[arg-type]
        else:
            hidden = _blockwise([d for _k, d, _x in group], hidden, None, routing, plan)
        index = end
    return hidden


def _joins(step: Step, kind: str, x: torch.Tensor | None, routing: Routing) -> bool:
    """Whether ``step`` belongs to the group before it: routed, the same kind, and (parallel) the same input."""
    return step[0] == kind and routing.owner_of(step[1]) is not None and step[2] is x


def _by_owner(deltas: Sequence[nn.Module], routing: Routing) -> dict[int, list[nn.Module]]:
    owned: dict[int, list[nn.Module]] = {}
    for delta in deltas:
        owned.setdefault(routing.owner_of(delta), []).append(delta)  # type: ignore[arg-type]
    return owned


def _add_group(
    deltas: Sequence[nn.Module], hidden: torch.Tensor, x: torch.Tensor, routing: Routing, plan: RowPlan
) -> torch.Tensor:
    if len(deltas) >= BATCHED_FROM:
        stacks = _low_rank_stacks(deltas, x, routing)
        if stacks is not None and hidden.dim() >= 2 and hidden.shape[0] == x.shape[0]:
            return _gathered_low_rank(stacks, hidden, x, plan)
    return _blockwise(deltas, hidden, x, routing, plan)


def _blockwise(
    deltas: Sequence[nn.Module], hidden: torch.Tensor, x: torch.Tensor | None, routing: Routing, plan: RowPlan
) -> torch.Tensor:
    """Each owner's deltas on its block of rows (in owner order), the blocks joined once.

    ``x`` given: parallel deltas (``block + sum delta(x_block)``); ``None``: sequential ones, in order.
    """
    owned = _by_owner(deltas, routing)
    order = plan.order
    hidden_sorted = hidden if order is None else hidden.index_select(0, order)
    x_sorted = None if x is None else (x if order is None else x.index_select(0, order))
    pieces, in_place = [], True
    for owner, (start, end) in sorted(plan.blocks.items(), key=lambda item: item[1][0]):
        view = block = hidden_sorted[start:end]
        for delta in owned.get(owner, ()):
            block = delta(block) if x_sorted is None else add_parallel(delta, block, x_sorted[start:end])
        pieces.append(block)
        in_place = in_place and block.data_ptr() == view.data_ptr() and block.shape == view.shape
    if in_place:  # every block was updated where it lies (LoRA's fused add without autograd): nothing to join
        joined = hidden_sorted
    else:
        joined = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return joined if plan.inverse is None else joined.index_select(0, plan.inverse)


def _factors(delta: nn.Module) -> LowRankFactors | None:
    return delta.low_rank_factors() if class_implements(delta, LowRankBranch) else None


class _Stacks(NamedTuple):
    """The factors of one module's routed low-rank deltas, one slot per routed delta model (zeros: none)."""

    down: torch.Tensor
    """``[owners + 1, rank, in]``, zero-padded to the largest rank; the last slot is the rows routed to none."""
    up: torch.Tensor
    """``[owners + 1, rows, rank]``, each slot multiplied by its delta's scale."""
    out_index: torch.Tensor | None
    versions: tuple[object, ...]


def _low_rank_stacks(deltas: Sequence[nn.Module], x: torch.Tensor, routing: Routing) -> _Stacks | None:
    """The stacked factors of ``deltas`` (one per routed delta model), or ``None`` when they cannot be one stack.

    Without autograd the stacks are kept for the rest of the ``route_rows`` context (``generate()`` runs the model
    once per token) and rebuilt only when a factor changed in place (its version counter moved) or its scale did.
    """
    found: dict[int, LowRankFactors] = {}
    for delta in deltas:
        owner, factors = routing.owner_of(delta), _factors(delta)
        if owner == routing.count:  # routed to no row
            continue
        if factors is None or owner is None or owner in found:
            return None
        found[owner] = factors
    if not found:
        return None
    versions = tuple((*_version(f.down), *_version(f.up), *_version(f.scale)) for f in found.values())
    key = ("low-rank", *(id(d) for d in deltas))
    cache = routing.cache
    kept = cache.get(key)
    if kept is not None and kept.versions == versions and not torch.is_grad_enabled():
        return kept
    stacks = _stack(found, x, routing.count, versions)
    if stacks is not None and not torch.is_grad_enabled():
        cache[key] = stacks
    return stacks


def _version(value: torch.Tensor | float) -> tuple[object, ...]:
    """What tells a factor (or a tensor scale, as a hot-loadable LoRA keeps it) changed: identity and version."""
    return (id(value), value._version) if isinstance(value, torch.Tensor) else (value,)


def _stack(
    found: dict[int, LowRankFactors], x: torch.Tensor, count: int, versions: tuple[object, ...]
) -> _Stacks | None:
    first = next(iter(found.values()))
    in_features, rows = first.down.shape[1], first.up.shape[0]
    same = all(
        f.down.shape[1] == in_features and f.up.shape[0] == rows and _same_index(f.out_index, first.out_index)
        for f in found.values()
    )
    if not same or in_features != x.shape[-1] or x.dim() < 2:
        return None
    rank = max(f.down.shape[0] for f in found.values())
    dtype = x.dtype
    zero_down, zero_up = x.new_zeros(rank, in_features), x.new_zeros(rows, rank)
    downs, ups = [], []
    for owner in range(count + 1):
        f = found.get(owner)
        if f is None:
            downs.append(zero_down)
            ups.append(zero_up)
            continue
        down, up = f.down.to(dtype), (f.up * f.scale).to(dtype)
        pad = rank - down.shape[0]
        if pad:
            down = torch.cat([down, down.new_zeros(pad, in_features)])
            up = torch.cat([up, up.new_zeros(rows, pad)], dim=1)
        downs.append(down)
        ups.append(up)
    return _Stacks(torch.stack(downs), torch.stack(ups), first.out_index, versions)


def _same_index(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))


def _gathered_low_rank(stacks: _Stacks, hidden: torch.Tensor, x: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """``hidden + x A_row^T (s B)_row^T`` for every row at once: each row gathers its slot of the stacks."""
    batch, (in_features, rows) = x.shape[0], (stacks.down.shape[2], stacks.up.shape[1])
    per_row_down = stacks.down.index_select(0, plan.owner)  # [batch, rank, in]
    per_row_up = stacks.up.index_select(0, plan.owner)  # [batch, rows, rank]
    low = torch.bmm(x.reshape(batch, -1, in_features), per_row_down.transpose(1, 2))  # [batch, tokens, rank]
    if stacks.out_index is None:
        flat = hidden.reshape(batch, -1, rows).to(x.dtype)
        return torch.baddbmm(flat, low, per_row_up.transpose(1, 2)).to(hidden.dtype).view_as(hidden)
    update = torch.bmm(low, per_row_up.transpose(1, 2)).to(hidden.dtype)  # [batch, tokens, rows]
    flat = hidden.reshape(batch, -1, hidden.shape[-1])
    return flat.index_add(-1, stacks.out_index.to(hidden.device), update).view_as(hidden)
