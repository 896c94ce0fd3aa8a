"""The BitFit delta: a trainable bias added to the output of one linear layer or layer norm, ``h -> h + bias``.

Ben Zaken, Ravfogel and Goldberg, 2021, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
Language-models" (https://arxiv.org/abs/2106.10199). The paper trains the backbone's own bias terms. Here the
backbone is never touched: its output ``W x + b`` gets a separate bias ``delta`` added, so training ``delta`` is
training ``b + delta``, the same function with the same gradient as training ``b`` itself, while ``b`` stays frozen
and exact. Layers without a bias (T5's linears and ``T5LayerNorm``, most LM heads) simply get the one they lack.
"""

from __future__ import annotations

import torch
from torch import nn


class BiasDelta(nn.Module):
    """A bias added along the last dimension of a module's output; zero at first, so a fresh delta is the identity.

    Args:
        out_features: size of the modified module's output (a linear layer's ``out_features``, a norm's size).
        out_index: for a fused layer (GPT-2's ``c_attn`` computing ``[q | k | v]``), the output features the bias
            is added to; ``None`` means all of them.
        device: where the bias lives (the modified module's device).
        dtype: the bias's dtype (the modified module's dtype).
    """

    def __init__(
        self,
        out_features: int,
        out_index: torch.Tensor | None = None,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.out_features = out_features
        size = out_features if out_index is None else int(out_index.numel())
        self.bias = nn.Parameter(torch.zeros(size, device=device, dtype=dtype))  # (out_features or slice,)
        index = None if out_index is None else out_index.to(device=device, dtype=torch.long)
        self.register_buffer("out_index", index, persistent=False)

    def delta_bias(self) -> torch.Tensor:
        """The bias over the module's whole output, shape ``(out_features,)``: what merging adds to ``b``."""
        if self.out_index is None:
            return self.bias
        return self.bias.new_zeros(self.out_features).index_copy(0, self.out_index, self.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden + bias`` for a ``(..., out_features)`` output, in the output's dtype (as under autocast)."""
        return hidden + self.delta_bias().to(hidden.dtype)  # (..., out_features)

    def can_merge(self, host: nn.Module) -> bool:
        """Whether ``host`` adds a bias of its own to its output: linear layers and LayerNorm, not RMS norms."""
        if isinstance(host, (nn.Linear, nn.LayerNorm)) or type(host).__name__ == "Conv1D":
            return True
        return type(host).__name__.endswith("LayerNorm") and isinstance(getattr(host, "bias", None), nn.Parameter)

    def merge_update(self, host: nn.Module) -> dict[str, torch.Tensor]:
        """The bias over the whole output: added to ``b``, or the new ``b`` of a layer that has none."""
        return {"bias": self.delta_bias().detach()}

    def extra_repr(self) -> str:
        sliced = "" if self.out_index is None else f", out_slice={self.out_index.numel()}"
        return f"out_features={self.out_features}{sliced}"
