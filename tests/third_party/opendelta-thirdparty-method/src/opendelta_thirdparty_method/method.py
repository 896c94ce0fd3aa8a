"""The gated adapter: ``h -> h + tanh(g) * up(act(down(h)))`` with the gate ``g`` starting at zero.

Zero-initialised gating (LLaMA-Adapter, Zhang et al., 2023, https://arxiv.org/abs/2303.16199) makes a fresh delta
exactly the identity whatever the adapter's initial weights, and lets the adapter fade in as the gate trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from opendelta import DeltaConfig, DeltaConfigError, DeltaModel, Target
from opendelta.layers import ACTIVATIONS, BottleneckAdapter
from opendelta.shapes import factory_kwargs


@dataclass(kw_only=True)
class GatedAdapterConfig(DeltaConfig):
    """Configuration of :class:`GatedAdapterModel`.

    Attributes:
        bottleneck_dim: width of the bottleneck; 8 by default.
        non_linearity: activation between the projections, a key of ``opendelta.layers.ACTIVATIONS``; "relu".
    """

    delta_type: ClassVar[str] = "gated_adapter"

    bottleneck_dim: int = 8
    non_linearity: str = "relu"

    def validate(self) -> None:
        """Refuse a bottleneck below 1 and an unknown activation."""
        super().validate()
        if self.bottleneck_dim < 1:
            raise DeltaConfigError(f"GatedAdapterConfig.bottleneck_dim must be >= 1, got {self.bottleneck_dim}")
        if self.non_linearity.lower() not in ACTIVATIONS:
            raise DeltaConfigError(
                f"GatedAdapterConfig.non_linearity={self.non_linearity!r} is unknown; choose one of "
                f"{sorted(ACTIVATIONS)}"
            )


class GatedAdapter(nn.Module):
    """A bottleneck branch scaled by ``tanh(gate)``, added to the hidden state; the identity at init."""

    def __init__(
        self,
        features: int,
        bottleneck_dim: int,
        non_linearity: str,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.branch = BottleneckAdapter(
            features, bottleneck_dim, non_linearity, residual=False, device=device, dtype=dtype
        )  # (..., features) -> (..., features), without the residual: the gate scales the branch alone
        self.gate = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the gated adapter to a ``(..., features)`` hidden state."""
        return hidden + torch.tanh(self.gate) * self.branch(hidden)


class GatedAdapterModel(DeltaModel):
    """A gated adapter after the attention and feed-forward output projections (``attn.proj``, ``ff.w2``)."""

    config_class = GatedAdapterConfig
    delta_type = "gated_adapter"
    delta_name = "gated_adapter"
    default_modified_modules: ClassVar[tuple[str, ...]] = ("attn.proj", "ff.w2")
    insertion = "after"
    config: GatedAdapterConfig

    def _build_delta(self, target: Target) -> nn.Module:
        _in_features, out_features = self.features(target.module)
        config = self.config
        return GatedAdapter(out_features, config.bottleneck_dim, config.non_linearity, **factory_kwargs(target.module))
