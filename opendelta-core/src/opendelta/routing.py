"""Multi-delta serving: one forward pass in which each row of the batch uses its own delta.

Several delta models (trained for different tasks) are attached to one backbone at once. Inside
``with route_rows(model, [delta_a, delta_b, None, ...]):`` row ``i`` of every batch goes through the deltas of the
``i``-th delta model only (``None``: through none of the routed ones), while delta models not listed keep applying to
every row. Each routed delta runs on its rows alone (gathered, then scattered back), so a row gets exactly what it
gets with only its delta attached, and the work grows with the rows, not with the number of deltas.

``generate()`` works inside the context: when the batch it runs is a whole multiple of the routed rows (beam search
repeats each row ``num_beams`` times in a row), each routing entry is repeated to match.

The routing is set on the modules that carry deltas for the duration of the context (an attribute torch.compile
guards on, so a compiled model recompiles once for routed calls and stays correct). One model therefore routes one
batch plan at a time: a second ``route_rows`` on the same model while one is active (another thread) is refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from opendelta.errors import DeltaStateError
from opendelta.markers import SLOTS_ATTR

if TYPE_CHECKING:
    from opendelta.base import DeltaModel

__all__ = ["ROUTING_ATTR", "Routing", "active_routing", "route_rows"]

ROUTABLE_KINDS = frozenset({"before", "after", "parallel"})


class Routing:
    """Which rows each routed delta module serves.

    Args:
        owners: for each row, the index of its delta model in ``models`` (``-1``: none).
        modules: for each routed delta model, the ids of its delta modules.
    """

    def __init__(self, owners: list[int], modules: list[set[int]]) -> None:
        self.owners = owners
        self.module_owner = {module: index for index, ids in enumerate(modules) for module in ids}
        self._rows: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def rows(self, delta: nn.Module, batch: int, device: torch.device) -> torch.Tensor | None:
        """The batch rows ``delta`` applies to, or ``None`` when it is not routed (it serves every row)."""
        owner = self.module_owner.get(id(delta))
        if owner is None:
            return None
        key = (owner, batch, device)
        if key not in self._rows:
            routed = len(self.owners)
            if batch % routed:
                raise DeltaStateError(
                    f"route_rows was given {routed} rows but the model runs a batch of {batch}; route one entry per "
                    f"row (generate() may repeat each row: the batch must be a multiple of the routed rows)"
                )
            repeat = batch // routed
            chosen = [i * repeat + j for i, o in enumerate(self.owners) if o == owner for j in range(repeat)]
            self._rows[key] = torch.tensor(chosen, dtype=torch.long, device=device)
        return self._rows[key]


ROUTING_ATTR = "_opendelta_routing"


def active_routing(module: nn.Module) -> Routing | None:
    """The routing of the enclosing :func:`route_rows` for a module that carries deltas, if any."""
    return getattr(module, ROUTING_ATTR, None)


@contextmanager
def route_rows(backbone: nn.Module, per_row: Sequence[DeltaModel | None]) -> Iterator[Routing]:
    """Run each batch row through its own delta model (see the module docstring).

    Args:
        backbone: the model the delta models are attached to.
        per_row: for each row of the batches run inside the context, its delta model or ``None``.

    Raises:
        DeltaStateError: a delta model is not attached to ``backbone``, is merged, or places deltas that cannot
            be routed per row (prefixes, soft prompts change the sequence length: route with separate passes).
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

    routing = Routing(owners, [{id(i.delta) for i in m.insertions()} for m in models])
    hosts = [m for m in backbone.modules() if getattr(m, SLOTS_ATTR, None)]
    if any(getattr(m, ROUTING_ATTR, None) is not None for m in hosts):
        raise DeltaStateError(
            f"route_rows is already active on this {type(backbone).__name__} (nested, or in another thread); one model "
            f"routes one batch plan at a time"
        )
    for host in hosts:
        setattr(host, ROUTING_ATTR, routing)
    try:
        yield routing
    finally:
        for host in hosts:
            delattr(host, ROUTING_ATTR)


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
