"""Reading a module's feature sizes from the module itself, so no pseudo forward pass is needed.

GPT-2 and friends use transformers' ``Conv1D``, a linear layer whose weight is stored ``[in, out]``, transposed
relative to ``nn.Linear``'s ``[out, in]``; this module is the one place that knows it.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LINEAR_TYPES", "fused_output_index", "linear_features", "weight_of"]


def _linear_types() -> tuple[type[nn.Module], ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency, but plain-torch use must not break
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


LINEAR_TYPES: tuple[type[nn.Module], ...] = _linear_types()
"""Module types that compute ``x @ W.T + b`` (``nn.Linear``) or ``x @ W + b`` (``Conv1D``)."""


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, LINEAR_TYPES):
        in_features, out_features = module.weight.shape  # Conv1D: [in, out]
        return int(in_features), int(out_features)
    raise TypeError(f"{type(module).__name__} is not a linear layer (nn.Linear or transformers' Conv1D)")


def weight_of(module: nn.Module) -> torch.Tensor:
    """The module's weight as ``[out, in]`` whatever its storage layout (a view, not a copy)."""
    weight: torch.Tensor = module.weight
    return weight if isinstance(module, nn.Linear) else weight.t()


def fused_output_index(out_features: int, parts: tuple[int, ...] | None, num_parts: int | None) -> torch.Tensor | None:
    """Indices of the output features of the selected equal slices of a fused module (``None``: all of them).

    Example: GPT-2's ``c_attn`` computes ``[q | k | v]``; parts ``(0, 2)`` of 3 select the q and v features.
    """
    if parts is None or num_parts is None:
        return None
    if out_features % num_parts:
        raise ValueError(f"{out_features} output features do not split into {num_parts} equal parts")
    size = out_features // num_parts
    return torch.cat([torch.arange(p * size, (p + 1) * size) for p in parts])
