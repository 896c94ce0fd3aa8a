"""Multi-delta serving: one forward pass in which each row of the batch uses its own delta.

Several delta models (trained for different tasks) are attached to one backbone at once. Inside
``with route_rows(model, [delta_a, delta_b, None, ...]):`` row ``i`` of every batch goes through the deltas of the
``i``-th delta model only (``None``: through none of the routed ones), while delta models not listed keep applying to
every row; with ``unlisted="no_rows"`` they apply to none (a server holding many tenants' deltas attached routes a
batch of requests for a few of them). A row gets exactly what it gets with only its delta attached; how the rows are
grouped so that this costs little more than one bare pass is :mod:`opendelta.row_groups`' job.

``generate()`` works inside the context: when the batch it runs is a whole multiple of the routed rows (beam search
repeats each row ``num_beams`` times in a row), each routing entry is repeated to match.

The plan is the calling thread's (a thread-local), not the model's: while one thread serves a routed batch, another
thread's forward through the same backbone sees its own plan, or none. Serving from several threads is therefore one
``route_rows`` per thread around each forward (the deltas' attach/detach state is shared; switch it from one place).
torch.compile guards on the thread's plan, so a compiled model recompiles once for routed calls and stays correct.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from torch import nn

from opendelta.errors import DeltaStateError
from opendelta.markers import DELTA_MARK

if TYPE_CHECKING:
    from opendelta.base import DeltaModel

__all__ = ["Routing", "RowPlan", "active_routing", "current_routing", "route_rows"]

ROUTABLE_KINDS = frozenset({"before", "after", "parallel"})

_local = threading.local()
"""``plan``: the :class:`Routing` of the ``route_rows`` this thread is inside, if any."""


class RowPlan(NamedTuple):
    """How one batch's rows fall to the routed delta models, in the forms the row groups need.

    Rows sorted by owner (stably) lie in contiguous blocks; ``order`` sorts a batch that way and ``inverse`` puts it
    back (both ``None`` when the rows already are in owner order, the usual case for a batch built task by task).
    """

    owner: torch.Tensor
    """``[batch]``: each row's index in the routed delta models, or the number of them for a row routed to none."""
    blocks: dict[int, tuple[int, int]]
    """Each owner's ``(start, end)`` in the sorted rows (the rows routed to none: key ``-1``)."""
    order: torch.Tensor | None
    inverse: torch.Tensor | None
    rows: dict[int, torch.Tensor]
    """Each owner's rows in the batch as it comes (sorted)."""


class Routing:
    """Which rows each routed delta module serves.

    Args:
        owners: for each row, the index of its delta model in ``models`` (``-1``: none).
        modules: for each routed delta model, the ids of its delta modules.
        backbone: the model routed (a thread routes one plan per model at a time).
        unrouted: ids of delta modules that apply to no row (owner ``count``, which owns no rows).
    """

    def __init__(
        self,
        owners: list[int],
        modules: list[set[int]],
        backbone: nn.Module | None = None,
        unrouted: set[int] = frozenset(),  # type: ignore[assignment]
    ) -> None:
        self.owners = owners
        self.count = len(modules)
        self.module_owner = dict.fromkeys(unrouted, self.count)  # owner ``count`` has no rows
        self.module_owner.update({module: index for index, ids in enumerate(modules) for module in ids})
        self.backbone = backbone
        self._plans: dict[tuple[int, torch.device], RowPlan] = {}
        self.cache: dict[tuple[object, ...], object] = {}
        """What the row groups keep for the rest of the context (stacked factors), by their own keys."""

    def owner_of(self, delta: nn.Module) -> int | None:
        """The index of the routed delta model ``delta`` belongs to; ``None``: not routed (it serves every row)."""
        return self.module_owner.get(id(delta))

    def plan(self, batch: int, device: torch.device) -> RowPlan:
        """The rows of a batch of ``batch`` rows by owner (computed once per batch size and device)."""
        key = (batch, device)
        found = self._plans.get(key)
        if found is None:
            found = self._plans[key] = self._make_plan(batch, device)
        return found

    def rows(self, delta: nn.Module, batch: int, device: torch.device) -> torch.Tensor | None:
        """The batch rows ``delta`` applies to, or ``None`` when it is not routed (it serves every row)."""
        owner = self.owner_of(delta)
        if owner is None:
            return None
        plan = self.plan(batch, device)
        return plan.rows.get(owner, plan.owner.new_zeros(0))

    def _make_plan(self, batch: int, device: torch.device) -> RowPlan:
        routed = len(self.owners)
        if batch % routed:
            raise DeltaStateError(
                f"route_rows was given {routed} rows but the model runs a batch of {batch}; route one entry per "
                f"row (generate() may repeat each row: the batch must be a multiple of the routed rows)"
            )
        repeat = batch // routed
        per_row = [self.count if o < 0 else o for o in self.owners for _ in range(repeat)]
        order = sorted(range(batch), key=per_row.__getitem__)  # stable: rows keep their order within an owner
        blocks: dict[int, tuple[int, int]] = {}
        for position, row in enumerate(order):
            key = -1 if per_row[row] == self.count else per_row[row]
            start, _end = blocks.get(key, (position, position))
            blocks[key] = (start, position + 1)
        rows = {
            key: torch.tensor(order[start:end], dtype=torch.long, device=device)
            for key, (start, end) in blocks.items()
            if key >= 0
        }
        owner = torch.tensor(per_row, dtype=torch.long, device=device)
        if order == list(range(batch)):
            return RowPlan(owner, blocks, None, None, rows)
        inverse = [0] * batch
        for position, row in enumerate(order):
            inverse[row] = position
        as_tensor = {"dtype": torch.long, "device": device}
        return RowPlan(owner, blocks, torch.tensor(order, **as_tensor), torch.tensor(inverse, **as_tensor), rows)


def current_routing() -> Routing | None:
    """The plan of the :func:`route_rows` the calling thread is inside, if any."""
    return getattr(_local, "plan", None)


def active_routing(module: nn.Module) -> Routing | None:
    """The routing that applies to ``module``'s deltas in this thread: :func:`current_routing` (any module)."""
    del module
    return current_routing()


@contextmanager
def route_rows(
    backbone: nn.Module,
    per_row: Sequence[DeltaModel | None],
    *,
    unlisted: Literal["all_rows", "no_rows"] = "all_rows",
) -> Iterator[Routing]:
    """Run each batch row through its own delta model (see the module docstring).

    Args:
        backbone: the model the delta models are attached to.
        per_row: for each row of the batches run inside the context, its delta model or ``None``.
        unlisted: what the delta models attached to ``backbone`` but not in ``per_row`` apply to: every row (the
            default: a delta shared by all tasks) or none (many tenants attached, a batch for a few of them).

    Raises:
        DeltaStateError: a delta model is not attached to ``backbone``, is merged, or places deltas that cannot
            be routed per row (prefixes, soft prompts change the sequence length: route with separate passes); or
            this thread is inside a ``route_rows`` already (one plan per thread at a time).
    """
    models: list[DeltaModel] = []
    owners: list[int] = []
    for model in per_row:
        if model is None:
            owners.append(-1)
            continue
        if not any(model is m for m in models):
            _check_routable(model, backbone)
            models.append(model)
        owners.append(next(i for i, m in enumerate(models) if m is model))
    if not owners:
        raise DeltaStateError("route_rows needs one entry per batch row; got none")
    outer = current_routing()
    if outer is not None:
        what = f"this {type(backbone).__name__}" if outer.backbone is backbone else "another model"
        raise DeltaStateError(
            f"route_rows is already active in this thread (on {what}); a thread routes one batch plan at a time: "
            f"leave the first context before entering another (other threads route plans of their own)"
        )
    if unlisted not in ("all_rows", "no_rows"):
        raise ValueError(f"route_rows(unlisted={unlisted!r}): use 'all_rows' or 'no_rows'")
    modules = [{id(i.delta) for i in m.insertions()} for m in models]
    unrouted: set[int] = set()
    if unlisted == "no_rows":
        listed = set().union(*modules)
        unrouted = {id(m) for m in backbone.modules() if getattr(m, DELTA_MARK, False) and id(m) not in listed}
    routing = Routing(owners, modules, backbone, unrouted)
    _local.plan = routing
    try:
        yield routing
    finally:
        _local.plan = None


def _check_routable(model: DeltaModel, backbone: nn.Module) -> None:
    name = type(model).__name__
    if model.backbone_model is not backbone:
        raise DeltaStateError(f"{name} is attached to another model than the one given to route_rows")
    if model.merged or not model.attached:
        state = "merged into the weights" if model.merged else "detached"
        raise DeltaStateError(f"{name} is {state}; route_rows needs attached delta models")
    kinds = {i.kind for i in model.insertions()} - ROUTABLE_KINDS
    if "parameter" in kinds:
        raise DeltaStateError(
            f"{name} changes stacked expert weights (a parameter delta), which every row of a forward shares; route "
            f"rows between deltas on modules (LoRA on linear layers, adapters, BitFit), and run this one in passes of "
            f"its own"
        )
    if kinds:
        raise DeltaStateError(
            f"{name} places {sorted(kinds)} deltas, which change the sequence rather than each row's values; route "
            f"rows between LoRA, adapters, BitFit and the like, and run prefix or prompt tasks in passes of their own"
        )
