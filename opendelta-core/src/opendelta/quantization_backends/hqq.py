"""HQQ's ``HQQLinear`` (half-quadratic quantization, 1-8 bits, grouped), on the transformers line that loads it.

``HQQLinear`` is not an ``nn.Linear`` subclass: it is added to the linear types so that methods targeting linear
layers accept it. It dequantizes with its own ``dequantize()``; requantizing goes through ``quantize()`` with the
layer's own ``quant_config``, into new tensors (``W_q`` and ``meta`` replaced, the old ones kept for an unmerge).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from opendelta.quantization import QuantizationBackend

__all__ = ["HqqBackend"]


def _hqq_linear() -> type[nn.Module]:
    return sys.modules["hqq.core.quantize"].HQQLinear


class HqqBackend(QuantizationBackend):
    """``hqq.core.quantize.HQQLinear`` layers."""

    name = "hqq"
    package = "hqq.core.quantize"

    def layer_types(self) -> tuple[type[nn.Module], ...]:
        return (_hqq_linear(),)

    def handles(self, module: nn.Module) -> bool:
        return isinstance(module, _hqq_linear()) and getattr(module, "W_q", None) is not None

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        return module.compute_dtype

    def device(self, module: nn.Module) -> torch.device:
        return module.W_q.device

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.dequantize().reshape(module.out_features, module.in_features).to(self.compute_dtype(module))

    def requantize_problem(self, module: nn.Module) -> str | None:
        return (
            None if getattr(module, "quant_config", None) else "this HQQLinear has no quant_config to requantize with"
        )

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        module.quantize(weight.detach().to(self.compute_dtype(module)), **module.quant_config)

    def saved_state(self, module: nn.Module) -> dict[str, Any]:
        return {"W_q": module.W_q, "meta": module.meta}

    def restore(self, module: nn.Module, state: dict[str, Any]) -> None:
        module.W_q, module.meta = state["W_q"], state["meta"]
