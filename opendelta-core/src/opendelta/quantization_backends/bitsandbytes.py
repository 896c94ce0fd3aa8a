"""bitsandbytes' ``Linear8bitLt`` (LLM.int8, row-wise absmax int8) and ``Linear4bit`` (nf4/fp4, blockwise).

Both are ``nn.Linear`` subclasses whose ``weight`` holds the quantized storage (``Int8Params`` int8 ``[out, in]``
with row scales ``SCB``; ``Params4bit`` packed uint8 with a ``quant_state``). Both requantize exactly as bitsandbytes
quantizes at load time (``Int8Params._quantize``, ``Params4bit._quantize``), into new parameter objects, so that an
unmerge can put the old ones back untouched.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import nn

from opendelta.quantization import QuantizationBackend

__all__ = ["Bnb4bitBackend", "Bnb8bitBackend"]


def _bnb() -> Any:
    return sys.modules["bitsandbytes"]


class Bnb8bitBackend(QuantizationBackend):
    """LLM.int8 layers (``load_in_8bit=True``): ``W = int8 * SCB / 127`` row by row."""

    name = "bitsandbytes int8"
    package = "bitsandbytes"

    def handles(self, module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return (
            isinstance(module, _bnb().nn.Linear8bitLt)
            and isinstance(weight, torch.Tensor)
            and weight.dtype == torch.int8
        )

    @staticmethod
    def _scales(module: nn.Module) -> torch.Tensor:
        """The row scales: on the weight until the first forward, then on the layer's matmul state."""
        scales = getattr(module.weight, "SCB", None)
        return scales if scales is not None else module.state.SCB

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        rows = self._scales(module).to(torch.float32)[:, None]
        return (module.weight.data.to(torch.float32) * rows / 127).to(self.compute_dtype(module))

    def requantize_problem(self, module: nn.Module) -> str | None:
        if module.state.has_fp16_weights:
            return "a bitsandbytes int8 layer that keeps fp16 weights (has_fp16_weights=True) quantizes on the fly"
        if self._scales(module) is None:
            return "this bitsandbytes int8 layer has no row scales (SCB) to requantize with"
        return None

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        params = _bnb().nn.Int8Params(weight.detach().to(torch.float16), requires_grad=False, has_fp16_weights=False)
        module._parameters["weight"] = params._quantize(module.weight.device)
        module.state.CB = module.state.SCB = None  # the next forward reads them from the new weight

    def saved_state(self, module: nn.Module) -> dict[str, Any]:
        return {"weight": module._parameters["weight"], "CB": module.state.CB, "SCB": module.state.SCB}

    def restore(self, module: nn.Module, state: dict[str, Any]) -> None:
        module._parameters["weight"] = state["weight"]
        module.state.CB, module.state.SCB = state["CB"], state["SCB"]


class Bnb4bitBackend(QuantizationBackend):
    """nf4 / fp4 layers (``load_in_4bit=True``, QLoRA's): blockwise 4-bit codes with absmax per block."""

    name = "bitsandbytes 4-bit"
    package = "bitsandbytes"

    def handles(self, module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return isinstance(module, _bnb().nn.Linear4bit) and getattr(weight, "bnb_quantized", False)

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        dtype = getattr(module, "compute_dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else self._canonical(module)[1].dtype

    @staticmethod
    def _canonical(module: nn.Module) -> tuple[torch.Tensor, Any]:
        """The packed codes and quant state in bitsandbytes' canonical layout.

        On the CPU, the first inference call repacks a 4-bit weight in place for the AVX512 kernel
        (``packing_format_for_cpu``); the inverse is computed here on a copy of the state, the layer untouched.
        """
        weight = module.weight
        state = weight.quant_state
        if not getattr(state, "packing_format_for_cpu", False):
            return weight.data, state
        functional = _bnb().functional
        return functional._convert_weight_packed_for_cpu_inverse(weight.data, copy.copy(state))

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        data, state = self._canonical(module)
        return _bnb().functional.dequantize_4bit(data, state).to(self.compute_dtype(module))

    def hash_tensors(self, module: nn.Module, name: str) -> list[torch.Tensor]:
        return [self._canonical(module)[0]] if name == "weight" else [module._parameters[name]]

    def training_layout(self, module: nn.Module) -> None:
        """Keep the canonical layout for good: undo a CPU repacking, and switch the repacking off for this layer.

        bitsandbytes' CPU repacking (at the first eval-mode call without gradients) stores the block scales in
        bfloat16 and feeds a kernel that passes no gradient; its inverse (what its ``.cuda()`` runs before moving)
        does not give the float32 scales back, so repacking again at every evaluation would drift the weights. With
        the repacking off, evaluation runs bitsandbytes' float path, the same computation as training.
        """
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            functional = _bnb().functional
            weight.data, weight.quant_state = functional._convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False

    def requantize_problem(self, module: nn.Module) -> str | None:
        return None if module.weight.quant_state is not None else "this 4-bit layer has no quant_state"

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        old = module.weight
        state = self._canonical(module)[1]
        params = _bnb().nn.Params4bit(
            weight.detach().to(state.dtype),
            requires_grad=False,
            quant_type=old.quant_type,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_storage=old.quant_storage,
        )
        new = params._quantize(old.device)
        module._parameters["weight"] = new
        if hasattr(module, "quant_state"):
            module.quant_state = new.quant_state

    def saved_state(self, module: nn.Module) -> dict[str, Any]:
        return {"weight": module._parameters["weight"], "quant_state": getattr(module, "quant_state", None)}

    def restore(self, module: nn.Module, state: dict[str, Any]) -> None:
        module._parameters["weight"] = state["weight"]
        if hasattr(module, "quant_state"):
            module.quant_state = state["quant_state"]
