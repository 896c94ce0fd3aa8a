"""Merging: folding a delta into the weights of the module it modifies, and taking it out again.

A delta whose math is an additive change of its module's parameters (LoRA's ``W + s B A``, BitFit's ``b + delta``)
can be merged: the parameters are updated in place (the same tensor objects, so optimizers and tied weights keep
pointing at them) and the delta is detached, so the merged model runs exactly the bare model's code at its speed. A
delta module opts in by implementing :class:`Mergeable`; core decides, checks and applies.

Unmerging subtracts again; like any floating-point round trip it restores the weights to within rounding, not
bit for bit (``merge`` followed by ``unmerge`` is exact to float tolerance, and repeated merges are no-ops).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from opendelta.errors import DeltaStateError

__all__ = ["Mergeable", "add_update", "check_finite", "is_mergeable", "remove_created"]


@runtime_checkable
class Mergeable(Protocol):
    """A delta module that is an additive change of its host's parameters (LoRA's ``s B A``, BitFit's bias)."""

    def can_merge(self, host: nn.Module) -> bool:
        """Whether the host has parameters that can express this delta (T5's bias-less layer norm cannot)."""
        ...

    def merge_update(self, host: nn.Module) -> Mapping[str, torch.Tensor]:
        """What merging adds to each of the host's parameters, by name, shaped like them.

        A name the host lacks, or holds as ``None``, is created with this value and removed again on unmerge.
        """
        ...


def is_mergeable(delta: nn.Module, host: nn.Module) -> bool:
    """Whether ``delta`` implements :class:`Mergeable` and can be merged into ``host``."""
    return isinstance(delta, Mergeable) and delta.can_merge(host)


def check_finite(updates: Iterable[tuple[nn.Module, Mapping[str, torch.Tensor]]], where: str) -> None:
    """Refuse updates that would put NaN or Inf into a parameter, naming it (a "safe merge")."""
    for host, values in updates:
        for name, update in values.items():
            current = host._parameters.get(name)
            merged = update if current is None else current + update.to(current.dtype)
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
            else:
                current.add_(value.to(current.dtype), alpha=sign)
    return created


def remove_created(host: nn.Module, names: Iterable[str]) -> None:
    """Drop parameters :func:`add_update` created."""
    for name in names:
        host._parameters[name] = None
