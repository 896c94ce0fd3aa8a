"""The LoKr update: ``dW = kron(w1, w2) * alpha / r``, added beside a frozen linear layer ``W x``.

LyCORIS (Yeh et al., 2023, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation",
https://arxiv.org/abs/2309.14859) as PEFT 0.21.2 computes it: with ``out = a * b`` and ``in = c * d``, the Kronecker
product of ``w1`` (``[a, c]``) and ``w2`` (``[b, d]``) is an ``[out, in]`` matrix from ``a c + b d`` numbers; a
factor whose larger side is over twice the rank is itself a rank-``r`` product ``w_a @ w_b`` (``w1`` only with
``decompose_both``). PEFT's default start makes ``w1`` (or ``w1_a``) zero, so a fresh LoKr changes nothing.

Training-time randomness is PEFT's, drawn from torch's global generator in PEFT's order (so a seeded run draws the
same masks): each training forward first draws ``rand(1)`` and skips the update unless it is above
``module_dropout``; then, with ``rank_dropout``, row ``i`` of ``dW`` is kept when ``rand(out)[i] > rank_dropout``
(the kept rows divided by the kept fraction with ``rank_dropout_scale``). In eval mode neither applies.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional

from opendelta.plugin_api import is_linear, stored_update


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n == dimension`` and ``m <= n``, as PEFT's (and LyCORIS's) ``factorization``.

    A positive ``factor`` dividing ``dimension`` gives ``(factor, dimension // factor)``; otherwise ``m`` steps
    through the divisors up to the square root, staying at most ``factor`` (``-1``: no bound), so ``-1`` gives the
    pair nearest the square root (``(8, 16)`` for 128, ``(1, 127)`` for 127).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        if candidate > bound:
            break
        m, n = candidate, dimension // candidate
    return (n, m) if m > n else (m, n)


class LoKrLayer(nn.Module):
    """A LoKr update of one linear layer (or of some output rows of a fused one, like GPT-2's ``c_attn``).

    On a fused layer the Kronecker product spans the addressed rows only (``rows = a * b`` factors their count).

    Args:
        in_features: input size of the modified layer.
        out_features: output size of the modified layer.
        r: rank of a decomposed factor (and the scale's denominator).
        alpha: scale numerator.
        decompose_both: decompose ``w1`` too where the rank is small enough.
        decompose_factor: how dimensions are factored (see :func:`factorization`).
        rank_dropout: training-time probability of dropping an output row of the update.
        rank_dropout_scale: rescale the kept rows by the inverse of the kept fraction.
        module_dropout: training-time probability of skipping the update for a forward pass.
        out_index: for a fused layer, the output features the update writes to; ``None`` means all.
        init_weights: ``True``, ``"lycoris"`` or ``False`` (see :class:`~opendelta_lokr.LoKrConfig`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        *,
        decompose_both: bool = False,
        decompose_factor: int = -1,
        rank_dropout: float = 0.0,
        rank_dropout_scale: bool = False,
        module_dropout: float = 0.0,
        out_index: torch.Tensor | None = None,
        init_weights: bool | str = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.scaling = alpha / r
        self.rank_dropout, self.rank_dropout_scale, self.module_dropout = (
            rank_dropout,
            rank_dropout_scale,
            module_dropout,
        )
        rows = out_features if out_index is None else int(out_index.numel())
        (a, b), (c, d) = factorization(rows, decompose_factor), factorization(in_features, decompose_factor)
        self.shape = (a, b, c, d)
        make = {"device": device, "dtype": dtype}
        self.w1_decomposed = decompose_both and r < max(a, c) / 2
        self.w2_decomposed = r < max(b, d) / 2
        if self.w1_decomposed:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, r, **make))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, c, **make))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c, **make))
        if self.w2_decomposed:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, r, **make))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d, **make))
        else:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d, **make))
        self.register_buffer("out_index", out_index, persistent=False)
        self._initialise(init_weights)

    def _initialise(self, init_weights: bool | str) -> None:
        """Kaiming-uniform everywhere, then PEFT's zero factor.

        ``w1``/``w1_a`` for ``True``, ``w2``/``w2_b`` for ``"lycoris"``, none for ``False``.
        """
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b")}.get(init_weights, ())
        with torch.no_grad():
            for name, param in self.named_parameters():
                nn.init.zeros_(param) if name in zero else nn.init.kaiming_uniform_(param, a=math.sqrt(5))

    def _factor(self, which: int) -> torch.Tensor:
        if getattr(self, f"w{which}_decomposed"):
            return getattr(self, f"lokr_w{which}_a") @ getattr(self, f"lokr_w{which}_b")
        return getattr(self, f"lokr_w{which}")

    def _rows_weight(self) -> torch.Tensor:
        """``kron(w1, w2) * scale``, ``[rows, in]``: the rows of ``dW`` this update writes."""
        return torch.kron(self._factor(1), self._factor(2)) * self.scaling

    def _full(self, rows: torch.Tensor, dim: int) -> torch.Tensor:
        if self.out_index is None:
            return rows
        shape = list(rows.shape)
        shape[dim] = self.out_features
        return rows.new_zeros(shape).index_copy(dim, self.out_index, rows)

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``dW`` as an ``[out_features, in_features]`` matrix, without dropout (for merging)."""
        return self._full(self._rows_weight(), 0)

    def _row_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """PEFT's rank dropout: a keep mask over the update's rows, optionally divided by its mean, ``[rows, 1]``."""
        keep = (torch.rand(weight.shape[0]) > self.rank_dropout).float()
        kept = keep.mean()
        if self.rank_dropout_scale and kept > 0:  # PEFT divides by zero when every row is dropped (NaN)
            keep = keep / kept
        return keep.to(device=weight.device, dtype=weight.dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``dW x`` (``(..., out_features)``); in training, with PEFT's module and rank dropout."""
        if self.training and not bool(torch.rand(1) > self.module_dropout):
            return x.new_zeros(*x.shape[:-1], self.out_features)
        weight = self._rows_weight()
        if self.training and self.rank_dropout:
            weight = weight * self._row_mask(weight)
        update = functional.linear(x.to(weight.dtype), weight)
        return self._full(update, -1).to(x.dtype)

    # Mergeable -----------------------------------------------------------------------------------------------
    def can_merge(self, host: nn.Module) -> bool:
        """LoKr is a change of the host's weight: it merges into any linear layer it was built for (quantized too)."""
        return is_linear(host)

    def merge_update(self, host: nn.Module) -> dict[str, torch.Tensor]:
        """``dW``, added to ``W`` in its storage layout (``[out, in]``; ``[in, out]`` for GPT-2's Conv1D)."""
        return {"weight": stored_update(host, self.delta_weight().detach())}

    def extra_repr(self) -> str:
        sliced = "" if self.out_index is None else f", out_slice={self.out_index.numel()}"
        a, b, c, d = self.shape
        return f"in={self.in_features}, out={self.out_features}, kron=[{a}x{c}]x[{b}x{d}], r={self.r}{sliced}"
