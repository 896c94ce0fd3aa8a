"""LoRA on a stack of expert weights: one low-rank update per expert, ``W_e + (alpha / r) B_e A_e``.

transformers 5 keeps a sparse block's experts as 3-D parameters (``gate_up_proj`` ``[experts, out, in]``) and runs
expert ``e`` as ``F.linear(x, W[e])`` on the tokens routed to it. :class:`ExpertLoraLayer` is placed on such a
parameter (core's "parameter" placement), so the experts' own code reads ``W + scale * B A`` batched over experts:
each token gets the update of the expert it was routed to, exactly as a model whose expert weights were
``W_e + scale * B_e A_e``. ``A`` (``[experts, r, in]``) starts Kaiming-uniform per expert and ``B``
(``[experts, out, r]``) at zero, so a fresh one changes nothing.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from opendelta.plugin_api import StackLayout
from opendelta_lora.config import init_kind
from opendelta_lora.layer import lora_scaling


class ExpertLoraLayer(nn.Module):
    """Per-expert low-rank updates of one stacked expert weight.

    Args:
        layout: the stacked parameter's experts, in and out features, and storage order.
        parameter: its name in the experts module (``gate_up_proj``), for merging and messages.
        r: rank of each expert's update.
        alpha: scale numerator (the update is scaled by ``alpha / r``).
    """

    def __init__(
        self,
        layout: StackLayout,
        parameter: str,
        r: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.layout, self.parameter, self.r = layout, parameter, r
        self.scaling = lora_scaling(alpha, r, use_rslora)
        experts = layout.num_experts
        self.lora_A = nn.Parameter(torch.empty(experts, r, layout.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(experts, layout.out_features, r, device=device, dtype=dtype))
        kind = init_kind(init_lora_weights)
        if kind not in ("kaiming", "random", "gaussian"):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} does not apply to stacked expert weights")
        for expert in range(experts):  # each expert's A as LoraLayer's: fan-in is in_features, not experts * that
            if kind == "gaussian":
                nn.init.normal_(self.lora_A.data[expert], std=1 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.data[expert], a=math.sqrt(5))
            if kind == "random":
                nn.init.kaiming_uniform_(self.lora_B.data[expert], a=math.sqrt(5))

    def updated(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight + scale * B A`` in the weight's storage order, in one batched multiply-add (``baddbmm``)."""
        if self.layout.transposed:  # slices are [in, out]: add (B A)^T = A^T B^T
            return torch.baddbmm(weight, self.lora_A.transpose(1, 2), self.lora_B.transpose(1, 2), alpha=self.scaling)
        return torch.baddbmm(weight, self.lora_B, self.lora_A, alpha=self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scale * B_e A_e`` of every expert, ``[experts, out, in]`` (for merging)."""
        return torch.bmm(self.lora_B, self.lora_A) * self.scaling

    def can_merge(self, host: nn.Module) -> bool:
        """Merges into the stacked parameter it was built for, as long as its shape is the one it was built for."""
        weight = host._parameters.get(self.parameter)
        return weight is not None and self.merge_shape() == tuple(weight.shape)

    def merge_shape(self) -> tuple[int, int, int]:
        """The shape of the parameter this update is for, in its storage order."""
        layout = self.layout
        inner = (
            (layout.in_features, layout.out_features)
            if layout.transposed
            else (layout.out_features, layout.in_features)
        )
        return (layout.num_experts, *inner)

    def merge_update(self, host: nn.Module) -> dict[str, torch.Tensor]:
        """``{parameter: scale * B A}`` in the parameter's storage order."""
        dense = self.delta_weight().detach()
        return {self.parameter: dense.transpose(1, 2) if self.layout.transposed else dense}

    def extra_repr(self) -> str:
        layout = self.layout
        return (
            f"{self.parameter}: experts={layout.num_experts}, in={layout.in_features}, out={layout.out_features}, "
            f"r={self.r}, scaling={self.scaling:g}"
        )
