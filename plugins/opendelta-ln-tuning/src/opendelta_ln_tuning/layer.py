"""The LN tuning delta: a trainable offset on one parameter (weight or bias) of a layer norm.

Zhao et al., 2023, "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning"
(https://arxiv.org/abs/2312.11420). PEFT 0.21.2's ``LNTuningModel`` swaps in a trainable copy of each targeted norm;
here the norm's forward reads ``p + offset`` for its weight ``p`` (and bias), through core's "parameter" placement,
with ``offset`` starting at zero: the same function as training the copy (the copy is ``p + offset``), while the
stored parameter is never written, so detaching gives the backbone back bit for bit and merging is ``p += offset``.
"""

from __future__ import annotations

import torch
from torch import nn


class NormOffset(nn.Module):
    """``p -> p + offset`` for one parameter ``p`` of a layer norm; zero at first, so a fresh delta is the identity.

    Args:
        parameter: the norm's parameter it changes (``"weight"`` or ``"bias"``).
        features: that parameter's size (the normalised width).
        device: where the offset lives (the parameter's device).
        dtype: its dtype (the parameter's dtype).
    """

    def __init__(
        self, parameter: str, features: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.parameter = parameter
        self.features = features
        self.offset = nn.Parameter(torch.zeros(features, device=device, dtype=dtype))  # (features,)

    def updated(self, weight: torch.Tensor) -> torch.Tensor:
        """The parameter the norm's forward reads: ``weight + offset``, in ``weight``'s dtype."""
        return weight + self.offset.to(weight.dtype)

    # Mergeable -----------------------------------------------------------------------------------------------
    def can_merge(self, host: nn.Module) -> bool:
        """Whether ``host`` holds the parameter this offset changes (then merging adds the offset to it)."""
        return isinstance(host._parameters.get(self.parameter), torch.Tensor)

    def merge_update(self, host: nn.Module) -> dict[str, torch.Tensor]:
        """What merging adds to the norm's parameter: the offset."""
        return {self.parameter: self.offset.detach()}

    def extra_repr(self) -> str:
        return f"{self.parameter}, features={self.features}"


class AffineAfterNorm(nn.Module):
    """``y -> y * (1 + scale) + shift`` after a layer norm that has no weight or bias of its own (OLMo's).

    Tuning such a norm's affine transform from the identity, which is what LN tuning means for it; zero at first.
    It runs after the norm (not mergeable: the norm has no parameter to fold it into).
    """

    def __init__(self, features: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.features = features
        self.scale = nn.Parameter(torch.zeros(features, device=device, dtype=dtype))  # (features,)
        self.shift = nn.Parameter(torch.zeros(features, device=device, dtype=dtype))  # (features,)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden * (1 + self.scale) + self.shift

    def extra_repr(self) -> str:
        return f"features={self.features}"
