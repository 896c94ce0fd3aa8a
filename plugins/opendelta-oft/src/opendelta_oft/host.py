"""What the orthogonal deltas read from the linear layer they modify, and how their merge stays undoable.

Both methods are multiplicative (``W' = W R^T``, BOFT also ``* s``), while core's merge contract is additive
(``merge_update`` returns what to add, and unmerging subtracts what core recomputes then). Recomputed from the
merged weight, the update would be wrong; :class:`MergedUpdate` keeps the one computed while the delta was attached
and gives it back while it is out of the host, so unmerging subtracts exactly what merging added.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from opendelta.plugin_api import backend_of, stored_update


def host_weight(host: nn.Module) -> torch.Tensor:
    """The host's weight as ``[out, in]``, detached: dequantized for a quantized layer, untransposed for Conv1D."""
    backend = backend_of(host)
    if backend is not None:
        return backend.dequantize(host).detach()
    weight = host.weight if isinstance(host, nn.Linear) else host.weight.t()  # Conv1D stores [in, out]
    return weight.detach()


def host_output(host: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``host``'s own forward on ``x``, without its hooks (so without the deltas placed on it)."""
    return type(host).forward(host, x)


def is_attached(delta: nn.Module, host: nn.Module) -> bool:
    """Whether ``delta`` is one of ``host``'s children now (core detaches a delta when merging it)."""
    return any(child is delta for child in host._modules.values())


class MergedUpdate:
    """The additive weight update of a multiplicative delta, kept from merge time for unmerging."""

    def __init__(self) -> None:
        self._kept: dict[str, torch.Tensor] | None = None

    def update(
        self, delta: nn.Module, host: nn.Module, merged_weight: Callable[[torch.Tensor], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``{"weight": W' - W}`` in the host's storage layout, ``W'`` being ``merged_weight(W)`` (``[out, in]``).

        Computed while ``delta`` is attached (core asks then, to merge) and kept; while it is out of the host (core
        asks again, to unmerge), the kept one is given back.
        """
        attached = is_attached(delta, host)
        if not attached and self._kept is not None:
            return self._kept
        weight = host_weight(host)
        change = merged_weight(weight.float()) - weight.float()  # [out, in]
        out = {"weight": stored_update(host, change.to(weight.dtype))}
        if attached:
            self._kept = out
        return out
