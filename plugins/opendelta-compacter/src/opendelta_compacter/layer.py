"""Parameterised hypercomplex multiplication (PHM) layers and the Compacter adapter built from two of them.

Karimi Mahabadi, Henderson and Ruder, 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers"
(https://arxiv.org/abs/2106.04647), after Zhang et al., 2021, "Beyond Fully-Connected Layers with Quaternions:
Parameterization of Hypercomplex Multiplications with 1/n Parameters" (https://openreview.net/forum?id=rcQdycl0zyk).

A PHM layer's ``[in, out]`` weight is ``W = sum_i kron(A_i, B_i)``: the "phm rule" ``A: [n, n, n]`` (``n`` small
matrices, often shared) and the blocks ``B: [n, in/n, out/n]``, each optionally stored as a product of two
factors. The tensors are made by :func:`new_phm_rule` and :func:`new_phm_weight` and handed to :class:`PHMLinear`,
so that one tensor can be given to several layers (shared rule, shared blocks) by the model that builds them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from opendelta.plugin_api import SamplerAdapter, init_weight_

__all__ = ["HyperComplexAdapterLayer", "PHMFactors", "PHMLinear", "new_phm_rule", "new_phm_weight"]

PHMFactors = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""A batch of ``n`` matrices ``[n, rows, cols]``, whole or as factors ``([n, rows, r], [n, r, cols])``."""

RULE_INIT_RANGE = 0.01
"""Std (normal) or half-range (uniform) of the phm rule at initialisation: the original's fixed value."""


def new_phm_rule(
    n: int,
    init: str = "normal",
    *,
    factorized: bool = False,
    learnable: bool = True,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> PHMFactors:
    """A fresh phm rule ``A: [n, n, n]``, or its rank-one factors ``([n, n, 1], [n, 1, n])``.

    Args:
        n: the hypercomplex division.
        init: ``"normal"`` (std 0.01) or ``"uniform"`` (in ``[-0.01, 0.01]``), as in the original.
        factorized: return the two factors instead of the rule.
        learnable: ``nn.Parameter`` (trained) or plain tensors (to be registered as buffers: fixed, but saved).
        device: where the tensors live.
        dtype: the tensors' dtype.
    """
    shapes = [(n, n, 1), (n, 1, n)] if factorized else [(n, n, n)]
    tensors: list[torch.Tensor] = []
    for shape in shapes:
        tensor = init_weight_(torch.empty(shape, device=device, dtype=dtype), init, std=RULE_INIT_RANGE)
        tensors.append(nn.Parameter(tensor) if learnable else tensor)
    return (tensors[0], tensors[1]) if factorized else tensors[0]


def new_phm_weight(
    n: int,
    in_features: int,
    out_features: int,
    init: str = "glorot-uniform",
    *,
    factorized: bool = True,
    rank: int = 1,
    init_range: float = 0.0001,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> PHMFactors:
    """Fresh blocks ``B: [n, in/n, out/n]``, or their factors ``([n, in/n, rank], [n, rank, out/n])``.

    Glorot initialisers apply to each ``[rows, cols]`` block on its own with gain ``sqrt(2)``, as the original
    (rabeehk/compacter's ``glorot_uniform``) did; ``"normal"`` draws with std ``init_range``.

    Args:
        n: the hypercomplex division.
        in_features: input size of the projection.
        out_features: output size of the projection.
        init: ``"glorot-uniform"``, ``"glorot-normal"`` or ``"normal"``.
        factorized: return the rank-``rank`` factors instead of the blocks.
        rank: inner size of the factors.
        init_range: std of ``"normal"``.
        device: where the tensors live.
        dtype: the tensors' dtype.

    Raises:
        ValueError: ``n`` does not divide ``in_features`` or ``out_features``.
    """
    if in_features % n or out_features % n:
        raise ValueError(f"the hypercomplex division {n} must divide {in_features=} and {out_features=}")
    rows, cols = in_features // n, out_features // n
    shapes = [(n, rows, rank), (n, rank, cols)] if factorized else [(n, rows, cols)]
    factors = []
    for shape in shapes:
        tensor = torch.empty(shape, device=device, dtype=dtype)
        for block in tensor:  # each (rows, cols) or factor block separately: its own fan-in and fan-out
            init_weight_(block, init, std=init_range, gain=math.sqrt(2.0))
        factors.append(nn.Parameter(tensor))
    return (factors[0], factors[1]) if factorized else factors[0]


class PHMLinear(nn.Module):
    """``x -> x @ W + b`` with ``W = sum_i kron(A_i, B_i)``: a linear map with about ``1/n`` of the parameters.

    Tensor names are the original OpenDelta's (``phm_rule`` or ``phm_rule_left``/``phm_rule_right``, ``W`` or
    ``W_left``/``W_right``, ``b``), so its checkpoint keys carry over. A rule given as plain tensors (not
    ``nn.Parameter``) is registered as a buffer: it stays fixed but is saved and moved with the layer. Several
    layers may be given the same tensors; they then share them (one ``nn.Parameter``, several names).

    Args:
        in_features: size of the input's last dimension.
        out_features: size of the output's last dimension.
        phm_rule: ``A: [n, n, n]`` or its factors (see :func:`new_phm_rule`).
        weight: ``B: [n, in/n, out/n]`` or its factors (see :func:`new_phm_weight`).
        bias: add a bias ``b: [out]``, starting at zero.
        kronecker_prod: compute ``x @ W`` by building ``W`` from the Kronecker products first (``True``), or by
            contracting ``x`` with the factors without forming ``W`` (``False``); ``None`` picks the cheaper: the
            structured path for factorised blocks, the dense weight for whole ones. The result is the same.
    """

    phm_rule: torch.Tensor  # (n, n, n), or the factors below
    phm_rule_left: torch.Tensor  # (n, n, 1)
    phm_rule_right: torch.Tensor  # (n, 1, n)
    W: torch.Tensor  # (n, in/n, out/n), or the factors below
    W_left: torch.Tensor  # (n, in/n, r)
    W_right: torch.Tensor  # (n, r, out/n)
    b: torch.Tensor | None  # (out,)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        phm_rule: PHMFactors,
        weight: PHMFactors,
        *,
        bias: bool = True,
        kronecker_prod: bool | None = None,
    ) -> None:
        super().__init__()
        rule = phm_rule[0] if isinstance(phm_rule, tuple) else phm_rule
        n = rule.shape[0]
        if in_features % n or out_features % n:
            raise ValueError(f"the hypercomplex division {n} must divide {in_features=} and {out_features=}")
        rows, cols = in_features // n, out_features // n
        self.in_features, self.out_features, self.phm_dim = in_features, out_features, n
        self.factorized_phm_rule, self.factorized_phm = isinstance(phm_rule, tuple), isinstance(weight, tuple)
        # None: whichever is cheaper; the structured path only saves work when the blocks are factorised
        self.kronecker_prod = not self.factorized_phm if kronecker_prod is None else kronecker_prod
        if isinstance(phm_rule, tuple):
            self._register("phm_rule_left", phm_rule[0], (n, n, 1))
            self._register("phm_rule_right", phm_rule[1], (n, 1, n))
        else:
            self._register("phm_rule", phm_rule, (n, n, n))
        if isinstance(weight, tuple):
            rank = weight[0].shape[-1]
            self._register("W_left", weight[0], (n, rows, rank))
            self._register("W_right", weight[1], (n, rank, cols))
        else:
            self._register("W", weight, (n, rows, cols))
        zeros = torch.zeros(out_features, device=rule.device, dtype=rule.dtype)
        self.register_parameter("b", nn.Parameter(zeros) if bias else None)  # (out,)

    def _register(self, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
        """Register ``tensor`` as a parameter (``nn.Parameter``: trained) or a buffer (fixed), checking its shape."""
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"PHMLinear({self.in_features}, {self.out_features}): {name} must be {shape}, got {tuple(tensor.shape)}"
            )
        if isinstance(tensor, nn.Parameter):
            self.register_parameter(name, tensor)
        else:
            self.register_buffer(name, tensor)

    def rule(self) -> torch.Tensor:
        """The phm rule ``A: [n, n, n]`` (the product of its factors when factorised)."""
        if self.factorized_phm_rule:
            return torch.bmm(self.phm_rule_left, self.phm_rule_right)  # (n, n, 1) @ (n, 1, n)
        return self.phm_rule

    def blocks(self) -> torch.Tensor:
        """The blocks ``B: [n, in/n, out/n]`` (the product of its factors when factorised)."""
        if self.factorized_phm:
            return torch.bmm(self.W_left, self.W_right)  # (n, in/n, r) @ (n, r, out/n)
        return self.W

    def delta_weight(self) -> torch.Tensor:
        """The dense weight ``sum_i kron(A_i, B_i)`` as an ``[in_features, out_features]`` matrix."""
        n = self.phm_dim
        # kron(A_i, B_i)[a*rows + k, c*cols + p] = A_i[a, c] * B_i[k, p], summed over i
        dense = torch.einsum("iac,ikp->akcp", self.rule(), self.blocks())  # (n, in/n, n, out/n)
        return dense.reshape(n * dense.shape[1], n * dense.shape[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(..., in_features)`` to ``(..., out_features)``, by the dense weight or the structured path."""
        out = x @ self.delta_weight() if self.kronecker_prod else self._structured(x)  # (..., out)
        return out if self.b is None else out + self.b

    def _structured(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ sum_i kron(A_i, B_i)`` without forming the ``[in, out]`` weight.

        ``x`` is read as ``n`` blocks ``x_a: [in/n]``; output block ``c`` is ``sum_{i,a} A_i[a, c] * x_a @ B_i``.
        With factorised blocks ``B_i = L_i R_i`` that is two matrix products, ``x_a @ L_i`` for every ``(a, i)``
        and then ``G[(a, i, r), (c, p)] = A_i[a, c] R_i[r, p]``: ``n r (in + n out)`` multiplications per row
        instead of ``in * out``. Whole blocks gain nothing (``in * out`` either way).
        """
        n, lead = self.phm_dim, x.shape[:-1]
        blocks = x.reshape(*lead, n, self.in_features // n)  # (..., n, in/n)
        if self.factorized_phm:
            rank = self.W_left.shape[-1]
            left = self.W_left.permute(1, 0, 2).reshape(-1, n * rank)  # (in/n, n*r): [k, (i, r)]
            t = (blocks @ left).reshape(*lead, n * n * rank)  # (..., n*n*r): [(a, i, r)]
            g = torch.einsum("iac,irp->aircp", self.rule(), self.W_right)  # (n, n, r, n, out/n)
            return t @ g.reshape(n * n * rank, self.out_features)  # (..., out)
        z = torch.einsum("iac,...ak->...cik", self.rule(), blocks)  # (..., n, n, in/n): [c, (i, k)]
        out = z.reshape(*lead, n, -1) @ self.W.reshape(-1, self.out_features // n)  # (..., n, out/n)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        rank = f", rank={self.W_left.shape[-1]}" if self.factorized_phm else ""
        path = "dense" if self.kronecker_prod else "structured"
        return f"in={self.in_features}, out={self.out_features}, n={self.phm_dim}{rank}, {path}"


class HyperComplexAdapterLayer(SamplerAdapter):
    """``h -> h + up(act(down(h)))`` whose projections are :class:`PHMLinear` layers: the Compacter adapter.

    Core's :class:`~opendelta.layers.SamplerAdapter` with PHM samplers (``down_sampler: hidden -> bottleneck``,
    ``up_sampler: bottleneck -> hidden``); the subclass only keeps the original's class name in printed trees.
    """

    down_sampler: PHMLinear
    up_sampler: PHMLinear
