"""Building blocks that several delta methods share: activations, initialisers, the bottleneck adapter.

They live in core so each plugin holds only its own math (the Adapter, Compacter, low-rank and parallel adapters
all use the same down-projection, non-linearity, up-projection shape, differing in how the projections are
parameterised and where the block is placed).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "INITIALISERS", "BottleneckAdapter", "SamplerAdapter", "get_activation", "init_weight_"]


def _transformers_activation(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers.activations import get_activation as hf_get_activation

        module: nn.Module = hf_get_activation(name)
        return module

    return build


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_new": _transformers_activation("gelu_new"),
    "gelu_fast": _transformers_activation("gelu_fast"),
    "quick_gelu": _transformers_activation("quick_gelu"),
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
    "linear": nn.Identity,
}
"""Non-linearities by the names the original OpenDelta configs use."""


def get_activation(name: str) -> nn.Module:
    """A fresh activation module for ``name`` (case-insensitive).

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    key = name.lower()
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown non_linearity {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[key]()


INITIALISERS = ("glorot-uniform", "glorot-normal", "normal", "uniform", "zeros", "kaiming-uniform")


def init_weight_(tensor: torch.Tensor, method: str, std: float = 0.01, gain: float = 1.0) -> torch.Tensor:
    """Initialise ``tensor`` in place with one of :data:`INITIALISERS`.

    Args:
        tensor: the tensor to fill.
        method: one of :data:`INITIALISERS`.
        std: standard deviation for ``normal``, half-range for ``uniform``.
        gain: scale of the Glorot initialisers (the Compacter code base uses ``sqrt(2)``).
    """
    with torch.no_grad():
        if method == "glorot-uniform":
            return nn.init.xavier_uniform_(tensor, gain=gain)
        if method == "glorot-normal":
            return nn.init.xavier_normal_(tensor, gain=gain)
        if method == "normal":
            return nn.init.normal_(tensor, std=std)
        if method == "uniform":
            return nn.init.uniform_(tensor, -std, std)
        if method == "zeros":
            return nn.init.zeros_(tensor)
        if method == "kaiming-uniform":
            return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
    raise ValueError(f"unknown initialisation {method!r}; choose one of {list(INITIALISERS)}")


class BottleneckAdapter(nn.Module):
    """``h -> h + up(act(down(h)))`` (Houlsby et al., 2019), or without the residual for parallel use.

    The child names (``modulelist.down_proj``, ``modulelist.up_proj``) are the original OpenDelta's, so its
    printed trees and checkpoints keep their keys. Weights start normal with ``init_std`` and biases at zero, so a
    fresh adapter is close to the identity (exactly the identity when ``zero_up=True``).

    Args:
        in_features: size of the input hidden state.
        bottleneck_dim: size of the bottleneck.
        non_linearity: activation name (see :data:`ACTIVATIONS`).
        out_features: size of the output (defaults to ``in_features``; must equal it when ``residual``).
        residual: add the input to the output (sequential adapters) or not (parallel ones).
        scale: multiplies the bottleneck branch (parallel adapters use it).
        init_std: standard deviation of the initial weights.
        zero_up: start the up-projection at zero.
    """

    def __init__(
        self,
        in_features: int,
        bottleneck_dim: int,
        non_linearity: str = "gelu_new",
        *,
        out_features: int | None = None,
        residual: bool = True,
        scale: float = 1.0,
        init_std: float = 0.01,
        zero_up: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        out_features = in_features if out_features is None else out_features
        if residual and out_features != in_features:
            raise ValueError(
                f"a residual adapter needs out_features == in_features, got {out_features} != {in_features}"
            )
        self.residual, self.scale = residual, scale
        down = nn.Linear(in_features, bottleneck_dim, device=device, dtype=dtype)
        up = nn.Linear(bottleneck_dim, out_features, device=device, dtype=dtype)
        for linear in (down, up):
            init_weight_(linear.weight, "normal", std=init_std)
            nn.init.zeros_(linear.bias)
        if zero_up:
            nn.init.zeros_(up.weight)
        self.modulelist = nn.Sequential(
            OrderedDict(down_proj=down, non_linear=get_activation(non_linearity), up_proj=up)
        )

    def extra_repr(self) -> str:
        return f"residual={self.residual}, scale={self.scale:g}"

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the adapter to a ``(..., in_features)`` hidden state."""
        branch = self.modulelist(hidden)  # (..., out_features)
        if self.scale != 1.0:
            branch = branch * self.scale
        return hidden + branch if self.residual else branch


class SamplerAdapter(nn.Module):
    """``h -> h + up_sampler(act(down_sampler(h)))`` with projections a plugin parameterises its own way.

    The layout of the Compacter code base (Karimi Mahabadi et al., 2021), which the low-rank adapter (rank-``r``
    factorised projections) and Compacter (parameterised hypercomplex multiplications) share: only the two
    samplers differ, so each plugin builds them and this block does the rest. Child names (``down_sampler``,
    ``activation``, ``up_sampler``) are the original OpenDelta's, so its printed trees and checkpoints keep their
    keys.

    Args:
        down_sampler: maps ``(..., hidden)`` to ``(..., bottleneck)``.
        up_sampler: maps ``(..., bottleneck)`` back to ``(..., hidden)``.
        non_linearity: activation name between them (see :data:`ACTIVATIONS`).
    """

    def __init__(self, down_sampler: nn.Module, up_sampler: nn.Module, non_linearity: str = "gelu_new") -> None:
        super().__init__()
        self.down_sampler = down_sampler
        self.activation = get_activation(non_linearity)
        self.up_sampler = up_sampler

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the adapter to a ``(..., hidden)`` hidden state."""
        return hidden + self.up_sampler(self.activation(self.down_sampler(hidden)))
