"""A test-only delta method, so core is tested with no method plugin installed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

import opendelta
from opendelta import DeltaConfig, DeltaConfigError, DeltaModel, Target


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


class ToyPlugin:
    @opendelta.hookimpl
    def register_delta_methods(self, register):
        register("toy", ToyConfig, ToyModel)
