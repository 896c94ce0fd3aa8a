"""optimum-quanto's ``QLinear`` (int8, int4, int2, float8 weights), once frozen (``QuantoConfig`` freezes it).

A frozen ``QLinear`` holds a quantized tensor as ``weight``; it dequantizes with ``.dequantize()`` and requantizes
the way quanto quantizes at load time: a float weight put back, then ``freeze()`` (with the layer's own qtype,
group size and optimizer).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from opendelta.quantization import QuantizationBackend

__all__ = ["QuantoBackend"]


class QuantoBackend(QuantizationBackend):
    """Frozen ``optimum.quanto`` ``QLinear`` layers."""

    name = "optimum-quanto"
    package = "optimum.quanto"

    def handles(self, module: nn.Module) -> bool:
        quanto = sys.modules["optimum.quanto"]
        return isinstance(module, quanto.nn.QLinear) and bool(getattr(module, "frozen", False))

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        return module.weight.dtype

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.weight.dequantize().to(self.compute_dtype(module))

    def requantize_problem(self, module: nn.Module) -> str | None:
        return None if module.weight_qtype is not None else "this QLinear does not quantize its weight"

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        module._parameters["weight"] = nn.Parameter(weight.detach().to(module.weight.dtype), requires_grad=False)
        module.freeze()
        module.weight.requires_grad_(False)
