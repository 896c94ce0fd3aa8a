"""The LoHa update: ``dW = (w1_a w1_b) * (w2_a w2_b) * alpha / r``, added beside a frozen linear layer ``W x``.

Hyeon-Woo et al., 2021, "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning"
(https://arxiv.org/abs/2108.06098), as LyCORIS (https://arxiv.org/abs/2309.14859) and PEFT 0.21.2 use it: the
Hadamard (element-wise) product of two rank-``r`` matrices has rank up to ``r**2`` for ``2 r (in + out)``
parameters. ``w2_b`` starts at zero, so a fresh LoHa leaves the outputs unchanged. The update is a dense change of
``W``, which is what merging adds; the branch computes ``dW x`` (PEFT's ``F.linear(x, dW)``).

Training-time randomness is PEFT's, drawn from torch's global generator in PEFT's order (so a seeded run draws the
same masks): each training forward first draws ``rand(1)`` and skips the update when it is not above
``module_dropout``; then, with ``rank_dropout``, each output row of ``dW`` is kept when ``rand(out) > rank_dropout``
and the kept rows are divided by the kept fraction. In eval mode neither applies, and the output is exact.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional

from opendelta.plugin_api import is_linear, stored_update


class LoHaLayer(nn.Module):
    """A LoHa update of one linear layer (or of some output slices of a fused one, like GPT-2's ``c_attn``).

    Args:
        in_features: input size of the modified layer.
        out_features: output size of the modified layer.
        r: rank of each factor.
        alpha: scale numerator (the update is scaled by ``alpha / r``).
        rank_dropout: training-time probability of dropping an output row of the update.
        module_dropout: training-time probability of skipping the update for a forward pass.
        out_index: for a fused layer, the output features the update writes to; ``None`` means all.
        init_weights: ``True``: ``w2_b`` starts at zero (the update is zero); ``False``: random like the others.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        *,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        out_index: torch.Tensor | None = None,
        init_weights: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.scaling = alpha / r
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        rows = out_features if out_index is None else int(out_index.numel())
        make = {"device": device, "dtype": dtype}
        self.hada_w1_a = nn.Parameter(torch.empty(rows, r, **make))  # (out or slice, r)
        self.hada_w1_b = nn.Parameter(torch.empty(r, in_features, **make))  # (r, in)
        self.hada_w2_a = nn.Parameter(torch.empty(rows, r, **make))
        self.hada_w2_b = nn.Parameter(torch.empty(r, in_features, **make))
        self.register_buffer("out_index", out_index, persistent=False)
        with torch.no_grad():  # PEFT's (and FedPara's) He initialisation; one zero factor makes dW zero
            for param in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b):
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))
            if init_weights:
                nn.init.zeros_(self.hada_w2_b)

    def _rows_weight(self) -> torch.Tensor:
        """``(w1_a w1_b) * (w2_a w2_b) * scale``, ``[rows, in]``: the rows of ``dW`` this update writes."""
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling

    def _full(self, rows: torch.Tensor, dim: int) -> torch.Tensor:
        if self.out_index is None:
            return rows
        shape = list(rows.shape)
        shape[dim] = self.out_features
        return rows.new_zeros(shape).index_copy(dim, self.out_index, rows)

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``dW`` as an ``[out_features, in_features]`` matrix, without dropout (for merging)."""
        return self._full(self._rows_weight(), 0)

    def _row_mask(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """PEFT's rank dropout: a keep mask over all ``out_features`` rows, divided by its mean, ``[rows, 1]``."""
        keep = (torch.rand(self.out_features) > self.rank_dropout).to(dtype)
        kept = keep.mean()
        keep = keep / kept if kept > 0 else keep  # PEFT divides by zero when every row is dropped (NaN)
        keep = keep.to(device)
        if self.out_index is not None:
            keep = keep.index_select(0, self.out_index)
        return keep[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``dW x`` (``(..., out_features)``); in training, with PEFT's module and rank dropout."""
        if self.training and not bool(torch.rand(1) > self.module_dropout):
            return x.new_zeros(*x.shape[:-1], self.out_features)
        weight = self._rows_weight()
        if self.training and self.rank_dropout:
            weight = weight * self._row_mask(weight.dtype, weight.device)
        update = functional.linear(x.to(weight.dtype), weight)
        return self._full(update, -1).to(x.dtype)

    # Mergeable -----------------------------------------------------------------------------------------------
    def can_merge(self, host: nn.Module) -> bool:
        """LoHa is a change of the host's weight: it merges into any linear layer it was built for (quantized too)."""
        return is_linear(host)

    def merge_update(self, host: nn.Module) -> dict[str, torch.Tensor]:
        """``dW``, added to ``W`` in its storage layout (``[out, in]``; ``[in, out]`` for GPT-2's Conv1D)."""
        return {"weight": stored_update(host, self.delta_weight().detach())}

    def extra_repr(self) -> str:
        sliced = "" if self.out_index is None else f", out_slice={self.out_index.numel()}"
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}{sliced}"
