"""torchao's quantized weights: an ``nn.Linear`` whose ``weight`` is a torchao tensor subclass.

Every torchao tensor dequantizes (``.dequantize()``), so every one can carry deltas, be merged into a float model
(``merge_and_unload(dequantize=True)``) and be hashed (on its inner tensors). Requantizing is implemented for the
int8 weight tensor (``Int8WeightOnlyConfig``, and the weights of ``Int8DynamicActivationInt8WeightConfig``) with
per-row or per-tensor scales, which is what torchao's int8 configs produce; another torchao tensor is refused by
name when merged without ``dequantize=True``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from opendelta.quantization import QuantizationBackend

__all__ = ["TorchaoBackend"]


def _torchao_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and type(value).__module__.startswith("torchao.")


class TorchaoBackend(QuantizationBackend):
    """``nn.Linear`` layers whose weight torchao quantized (``TorchAoConfig`` in transformers, ``quantize_``)."""

    name = "torchao"
    package = "torchao"

    def handles(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and _torchao_tensor(module._parameters.get("weight"))

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        return module.weight.dtype  # a torchao tensor reports the dtype it dequantizes to

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.weight.dequantize().to(self.compute_dtype(module))

    def _granularity(self, module: nn.Module) -> Any:
        """Torchao's granularity that produced this int8 weight's block size, or ``None`` for another layout."""
        from torchao.quantization.granularity import PerRow, PerTensor

        weight = module.weight
        block = list(getattr(weight, "block_size", ()))
        if block == [1, weight.shape[1]]:
            return PerRow()
        if block == list(weight.shape):
            return PerTensor()
        return None

    def requantize_problem(self, module: nn.Module) -> str | None:
        weight = module.weight
        kind = type(weight).__name__
        if kind != "Int8Tensor":
            return f"torchao {kind} weights can be dequantized but OpenDelta requantizes only torchao's Int8Tensor"
        if any(getattr(weight, n, None) is not None for n in ("act_quant_scale", "act_pre_scale")):
            return "this torchao Int8Tensor has static activation scales, which a merged weight would invalidate"
        if self._granularity(module) is None:
            return f"this torchao Int8Tensor has block size {weight.block_size}, neither per row nor per tensor"
        return None

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        from torchao.quantization.quant_primitives import MappingType

        old = module.weight
        symmetric = old.zero_point is None or not bool(old.zero_point.any())
        new = type(old).from_hp(
            weight.detach().to(old.dtype),
            self._granularity(module),
            mapping_type=MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC,
            act_quant_kwargs=old.act_quant_kwargs,
            reduce_range=old.reduce_range,
        )
        module._parameters["weight"] = nn.Parameter(new, requires_grad=False)
