"""HQQ's ``HQQLinear`` (half-quadratic quantization, 1-8 bits, grouped), on the transformers line that loads it.

``HQQLinear`` is not an ``nn.Linear`` subclass: it is added to the linear types so that methods targeting linear
layers accept it. Its state is split in two: the packed codes ``W_q`` (an ``nn.Parameter`` once the layer is
initialised: HQQ's ``cuda()``, which ``quantize()`` and ``load_state_dict()`` end with, wraps it) and a plain ``meta``
dict holding the per-group ``scale`` and ``zero`` tensors with the settings (bits, group size, axis, packing). The
bias is a parameter when transformers built the layer, a plain tensor attribute when HQQ did.

* It dequantizes with its own ``dequantize()`` (what its forward computes).
* The backbone hash reads ``W_q`` together with the ``meta`` tensors (and a bias that is no parameter): ``meta`` is
  no parameter or buffer, so reading ``W_q`` alone would miss the scales and zeros a merge rewrites.
* Requantizing goes through the layer's own ``quantize()`` with its own ``quant_config`` (what HQQ ran at load time),
  into new tensors: ``W_q`` and ``meta`` are replaced, never written into, so an unmerge puts the old objects back.
  ``quantize()`` assigns a plain tensor to ``W_q``, which ``nn.Module`` refuses while ``W_q`` is a registered
  parameter: the parameter is unregistered first (and put back if quantizing fails).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from opendelta.quantization import QuantizationBackend

__all__ = ["HqqBackend"]

_QUANTIZE_ARGS = ("weight_quant_params", "scale_quant_params", "zero_quant_params")
"""The keys of an ``HQQLinear.quant_config`` that its ``quantize()`` takes (the config may hold others)."""


def _hqq_linear() -> type[nn.Module]:
    return sys.modules["hqq.core.quantize"].HQQLinear


def _codes(module: nn.Module) -> torch.Tensor | None:
    """The layer's ``W_q``, a registered parameter or a plain attribute (before HQQ's ``cuda()`` wrapped it)."""
    codes = module._parameters.get("W_q")
    return codes if codes is not None else module.__dict__.get("W_q")


def _meta_tensors(meta: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors of an HQQ ``meta`` dict by key, those of nested ones too (quantized scales' own ``meta_scale``)."""
    found: list[torch.Tensor] = []
    for key in sorted(meta):
        value = meta[key]
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            found.extend(_meta_tensors(value))
    return found


def _set_storage(module: nn.Module, codes: torch.Tensor | None, meta: dict[str, Any] | None) -> None:
    """Make ``codes`` and ``meta`` the layer's storage, whether ``codes`` is a parameter or a plain tensor."""
    module._parameters.pop("W_q", None)
    module.__dict__.pop("W_q", None)
    if isinstance(codes, nn.Parameter):
        module._parameters["W_q"] = codes
    else:
        module.__dict__["W_q"] = codes
    module.meta = meta


class HqqBackend(QuantizationBackend):
    """``hqq.core.quantize.HQQLinear`` layers, once quantized (``W_q`` and ``meta`` set)."""

    name = "hqq"
    package = "hqq.core.quantize"

    def layer_types(self) -> tuple[type[nn.Module], ...]:
        return (_hqq_linear(),)

    def handles(self, module: nn.Module) -> bool:
        return (
            isinstance(module, _hqq_linear())
            and _codes(module) is not None
            and getattr(module, "meta", None) is not None
        )

    def features(self, module: nn.Module) -> tuple[int, int]:
        out_features, in_features = module.meta["shape"]  # what dequantize() reshapes to: [out, in]
        return int(in_features), int(out_features)

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        return module.compute_dtype

    def device(self, module: nn.Module) -> torch.device:
        return _codes(module).device  # type: ignore[union-attr]

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        in_features, out_features = self.features(module)
        return module.dequantize().reshape(out_features, in_features).to(self.compute_dtype(module))

    def hash_tensors(self, module: nn.Module, name: str) -> list[torch.Tensor]:
        """``W_q`` (as its integer codes), then every tensor of ``meta`` by key, then a bias that is no parameter.

        ``meta`` holds no parameter or buffer, so the hash would not see the scales and zeros otherwise (a merge
        replaces them with ``W_q``); a bias HQQ keeps as a plain tensor is read here for the same reason.
        """
        if name != "W_q":
            return [module._parameters[name]]
        codes, meta = _codes(module), module.meta
        if meta.get("view_as_float") and meta.get("unpack_view_dtype") is not None:
            codes = codes.view(meta["unpack_view_dtype"])  # type: ignore[union-attr]  # codes stored as floats
        parts = [codes, *_meta_tensors(meta)]
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and module._parameters.get("bias") is None:
            parts.append(bias)
        return parts  # type: ignore[return-value]

    def requantize_problem(self, module: nn.Module) -> str | None:
        config = getattr(module, "quant_config", None)
        if not config or not config.get("weight_quant_params"):
            return "this HQQLinear has no quant_config (weight_quant_params) to requantize with"
        return None

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        config = {key: module.quant_config.get(key) for key in _QUANTIZE_ARGS}
        old_codes, old_meta = _codes(module), module.meta
        module._parameters.pop("W_q", None)  # quantize() assigns a plain tensor, then wraps it as a new parameter
        module.__dict__.pop("W_q", None)
        try:
            module.quantize(weight.detach().to(self.compute_dtype(module)), **config)
        except BaseException:
            _set_storage(module, old_codes, old_meta)
            raise

    def saved_state(self, module: nn.Module) -> dict[str, Any]:
        return {"W_q": _codes(module), "meta": module.meta}

    def restore(self, module: nn.Module, state: dict[str, Any]) -> None:
        _set_storage(module, state["W_q"], state["meta"])
