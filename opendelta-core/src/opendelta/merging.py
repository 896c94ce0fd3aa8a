"""Merging: folding a delta into the weights of the module it modifies, and taking it out again.

A delta whose math is a change of its module's parameters (LoRA's ``W + s B A``, BitFit's ``b + delta``) can be
merged: the parameters are updated in place (the same tensor objects, so optimizers and tied weights keep pointing
at them) and the delta is detached, so the merged model runs exactly the bare model's code at its speed. A delta
module opts in by implementing :class:`Mergeable`; core decides, checks and applies.

Unmerging subtracts again; like any floating-point round trip it restores the weights to within rounding, not
bit for bit (``merge`` followed by ``unmerge`` is exact to float tolerance, and repeated merges are no-ops).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from opendelta.errors import DeltaStateError

__all__ = ["Mergeable", "apply_parameters", "check_finite", "is_mergeable"]


@runtime_checkable
class Mergeable(Protocol):
    """A delta module that can be folded into its host's parameters."""

    def can_merge(self, host: nn.Module) -> bool:
        """Whether the host has parameters that can express this delta (T5's bias-less layer norm cannot)."""
        ...

    def merged_parameters(self, host: nn.Module) -> Mapping[str, torch.Tensor]:
        """The host's parameters with the delta folded in, by name (a name the host lacks is created)."""
        ...

    def unmerged_parameters(self, host: nn.Module) -> Mapping[str, torch.Tensor | None]:
        """The host's parameters with the delta taken out again; ``None`` removes a parameter merging created."""
        ...


def is_mergeable(delta: nn.Module, host: nn.Module) -> bool:
    """Whether ``delta`` implements :class:`Mergeable` and can be merged into ``host``."""
    return isinstance(delta, Mergeable) and delta.can_merge(host)


def check_finite(updates: Iterable[tuple[nn.Module, Mapping[str, torch.Tensor | None]]], where: str) -> None:
    """Refuse updates with NaN or Inf, naming the first module and parameter (a "safe merge")."""
    for host, values in updates:
        for name, value in values.items():
            if value is not None and not torch.isfinite(value).all():
                raise DeltaStateError(
                    f"{where}: merging would write NaN or Inf into {type(host).__name__}.{name}; nothing was merged"
                )


def apply_parameters(host: nn.Module, values: Mapping[str, torch.Tensor | None]) -> None:
    """Write ``values`` into ``host``'s parameters in place; create missing ones, remove those set to ``None``."""
    with torch.no_grad():
        for name, value in values.items():
            current = host._parameters.get(name)
            if value is None:
                host._parameters[name] = None  # as nn.Linear(bias=False) holds it
            elif current is None:
                host.register_parameter(name, nn.Parameter(value.detach().clone(), requires_grad=False))
            else:
                current.copy_(value)
