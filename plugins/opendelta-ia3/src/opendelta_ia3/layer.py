"""The IA3 delta: a learned vector that rescales a linear layer's output, or (feed-forward) its input.

Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"
(https://arxiv.org/abs/2205.05638): ``l_k * (W_k x)``, ``l_v * (W_v x)`` and ``W_2 (l_ff * h)``. The math and the
merge follow PEFT 0.21.2's ``IA3Layer``: an output-scaled layer's bias is scaled too, an input-scaled one's is not.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from opendelta.plugin_api import backend_of, is_linear, stored_update


class IA3Layer(nn.Module):
    """``h -> h * l`` placed after a linear layer, or before it (``feedforward``) on its input.

    Args:
        features: the layer's ``out_features`` (or ``in_features`` when ``feedforward``): the scaled width.
        out_index: for a fused layer (GPT-2's ``c_attn``), the output features the vector covers (the others keep
            a scale of one); ``None``: all of them. Never set with ``feedforward``.
        feedforward: scale the layer's input instead of its output.
        init_ones: start at ones (the identity); else at ``N(0, 1)``, as PEFT's ``init_ia3_weights=False``.
        device: where the vector lives (the layer's device).
        dtype: its dtype (the layer's compute dtype).
    """

    def __init__(
        self,
        features: int,
        out_index: torch.Tensor | None = None,
        *,
        feedforward: bool = False,
        init_ones: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if feedforward and out_index is not None:
            raise ValueError("a feed-forward IA3 vector scales the whole input; it cannot cover output slices")
        self.features = features
        self.feedforward = feedforward
        size = features if out_index is None else int(out_index.numel())
        make = torch.ones if init_ones else torch.randn
        self.ia3_l = nn.Parameter(make(size, device=device, dtype=dtype))  # (features or slice,)
        index = None if out_index is None else out_index.to(device=device, dtype=torch.long)
        self.register_buffer("out_index", index, persistent=False)
        self._merged_update: dict[str, torch.Tensor] | None = None

    def scaling(self) -> torch.Tensor:
        """The vector over the whole scaled width, ``(features,)``: ones outside a fused layer's covered slices."""
        if self.out_index is None:
            return self.ia3_l
        return self.ia3_l.new_ones(self.features).index_copy(0, self.out_index, self.ia3_l)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden * l`` for a ``(..., features)`` input or output, back in ``hidden``'s dtype (as PEFT does)."""
        return (hidden * self.scaling()).to(hidden.dtype)

    # Mergeable -----------------------------------------------------------------------------------------------
    def can_merge(self, host: nn.Module) -> bool:
        """Linear layers (``nn.Linear``, ``Conv1D``, a quantization backend's), whose weight can absorb ``l``."""
        return is_linear(host)

    def merge_update(self, host: nn.Module) -> Mapping[str, torch.Tensor]:
        """What merging adds: ``(l - 1)[:, None] * W`` and ``(l - 1) * b``, or ``W * (l - 1)[None, :]`` (feed-forward).

        IA3 is multiplicative, so the additive update depends on the host's weight, which merging changes: the
        update computed while this delta is attached (core asks then, to merge) is kept, and given back when core
        asks again while it is out of the host (to unmerge), so unmerging subtracts exactly what merging added.
        """
        attached = any(child is self for child in host._modules.values())
        if not attached and self._merged_update is not None:
            return self._merged_update
        update = self._update(host)
        if attached:
            self._merged_update = update
        return update

    def _update(self, host: nn.Module) -> dict[str, torch.Tensor]:
        backend = backend_of(host)
        if backend is not None:
            weight = backend.dequantize(host)  # [out, in], float
        else:
            weight = host.weight if isinstance(host, nn.Linear) else host.weight.t()  # Conv1D stores [in, out]
        weight = weight.detach()
        change = self.scaling().detach().to(device=weight.device, dtype=torch.float32) - 1
        if self.feedforward:
            update = weight.float() * change[None, :]
        else:
            update = change[:, None] * weight.float()
        out = {"weight": stored_update(host, update.to(weight.dtype))}
        bias = getattr(host, "bias", None)
        if not self.feedforward and isinstance(bias, torch.Tensor):
            out["bias"] = (change.to(bias.device) * bias.detach().float()).to(bias.dtype)
        return out

    def extra_repr(self) -> str:
        sliced = "" if self.out_index is None else f", slice={self.out_index.numel()}"
        return f"features={self.features}{sliced}, {'input' if self.feedforward else 'output'}"
