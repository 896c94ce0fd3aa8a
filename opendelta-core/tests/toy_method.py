"""A test-only delta method, so core is tested with no method plugin installed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

import opendelta
from opendelta import DeltaConfig, DeltaConfigError, DeltaModel, Target
from opendelta.plugin_api import LowRankFactors


class Scale(nn.Module):
    """``h -> h * (1 + s)`` with ``s`` starting at zero: the smallest delta that is identity at init."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.zeros(features))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden * (1 + self.s)


@dataclass(kw_only=True)
class ToyConfig(DeltaConfig):
    delta_type: ClassVar[str] = "toy"
    width: int = 0

    def validate(self) -> None:
        super().validate()
        if self.width < 0:
            raise DeltaConfigError(f"ToyConfig.width must be >= 0, got {self.width}")


class ToyModel(DeltaModel):
    config_class = ToyConfig
    delta_type = "toy"
    delta_name = "toy"
    default_modified_modules = ("attn.proj", "ff.w2")
    insertion = "after"

    def _build_delta(self, target: Target) -> nn.Module:
        _in, out = self.features(target.module)
        return Scale(out)


class LowRank(nn.Module):
    """``x -> scale * x A^T B^T``, declared as a low-rank branch so routing may batch many of them."""

    def __init__(self, features_in: int, features_out: int, rank: int, scale: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(rank, features_in) / features_in**0.5)
        self.b = nn.Parameter(torch.zeros(features_out, rank))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.a.t() @ self.b.t() * self.scale

    def low_rank_factors(self) -> LowRankFactors:
        return LowRankFactors(self.a, self.b, self.scale)


@dataclass(kw_only=True)
class ToyLowRankConfig(DeltaConfig):
    delta_type: ClassVar[str] = "toy_low_rank"
    rank: int = 2


class ToyLowRankModel(DeltaModel):
    """A parallel low-rank toy (LoRA without the plugin): what core's batched routing is tested with."""

    config_class = ToyLowRankConfig
    delta_type = "toy_low_rank"
    delta_name = "toy_low_rank"
    default_modified_modules = ("attn.q", "attn.v")
    insertion = "parallel"

    def _build_delta(self, target: Target) -> nn.Module:
        features_in, features_out = self.features(target.module)
        return LowRank(features_in, features_out, self.config.rank, scale=1.5 / self.config.rank)


class ToyPlugin:
    @opendelta.hookimpl
    def register_delta_methods(self, register):
        register("toy", ToyConfig, ToyModel)
        register("toy_low_rank", ToyLowRankConfig, ToyLowRankModel)
