"""The LoRA branch: ``x -> (alpha / r) * B A dropout(x)``, added beside a frozen linear layer ``W x``.

Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (https://arxiv.org/abs/2106.09685).
``A`` starts Kaiming-uniform and ``B`` at zero, so a fresh LoRA leaves the model's outputs unchanged.
The update it represents is the dense matrix :meth:`LoraLayer.delta_weight`, which is what merging adds to ``W``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from opendelta.plugin_api import is_linear, stored_update


class LoraLayer(nn.Module):
    """A low-rank update of one linear layer (or of some output slices of a fused one, like GPT-2's ``c_attn``).

    Args:
        in_features: input size of the modified layer.
        out_features: output size of the modified layer.
        r: rank.
        alpha: scale numerator (the branch is scaled by ``alpha / r``).
        dropout: dropout probability on the branch's input.
        out_index: for a fused layer, the output features the update writes to; ``None`` means all.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        out_index: torch.Tensor | None = None,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.scaling = alpha / r
        rows = out_features if out_index is None else int(out_index.numel())
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(rows, r, device=device, dtype=dtype))  # (out or slice, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("out_index", out_index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The branch's contribution to the layer's output, shape ``(..., out_features)``."""
        update = self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t() * self.scaling  # (..., r) -> (..., rows)
        if self.out_index is None:
            return update
        full = update.new_zeros(*update.shape[:-1], self.out_features)
        return full.index_copy(-1, self.out_index, update)

    def add_to(self, hidden: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``hidden + forward(x)`` as one fused multiply-add (``addmm``): no full-size intermediate tensors.

        ``hidden`` is the linear layer's fresh output, so without autograd it is updated in place.
        """
        if self.out_index is not None:
            return hidden + self.forward(x)
        low = self.lora_dropout(x).reshape(-1, self.in_features) @ self.lora_A.t()  # (N, r)
        up = (self.lora_B * self.scaling).t()  # (r, out), scaled on the small matrix
        if not torch.is_grad_enabled() and hidden.is_contiguous():
            hidden.view(-1, self.out_features).addmm_(low, up)  # a view of the same memory: (N, out)
            return hidden
        return torch.addmm(hidden.reshape(-1, self.out_features), low, up).view_as(hidden)

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scaling * B A`` as an ``[out_features, in_features]`` matrix (for merging)."""
        dense = self.lora_B @ self.lora_A * self.scaling  # (rows, in)
        if self.out_index is None:
            return dense
        full = dense.new_zeros(self.out_features, self.in_features)
        return full.index_copy(0, self.out_index, dense)

    def can_merge(self, host: nn.Module) -> bool:
        """LoRA is a change of the host's weight: it merges into any linear layer it was built for (quantized too)."""
        return is_linear(host)

    def merge_update(self, host: nn.Module) -> dict[str, torch.Tensor]:
        """``scale * B A``, added to ``W`` in its storage layout (``[out, in]``; ``[in, out]`` for GPT-2's Conv1D)."""
        return {"weight": stored_update(host, self.delta_weight().detach())}

    def extra_repr(self) -> str:
        sliced = "" if self.out_index is None else f", out_slice={self.out_index.numel()}"
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}{sliced}"
