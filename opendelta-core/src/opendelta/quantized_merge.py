"""Merging into quantized weights: dequantize, add, requantize, with the loss measured; or refused by name.

A delta's update cannot be added to an int8 or packed 4-bit tensor in place (torch would cast the update to int8 and
drop it). For a layer a quantization backend handles (:mod:`opendelta.quantization`), merging instead computes the
float weight ``W`` the layer uses, adds the update ``U`` and lets the backend quantize ``W + U`` into new storage.
That is lossy: quantizing again rounds the sum, so each merge measures what it lost and :func:`warn_loss` reports it.
Unmerging does not subtract (a second lossy round trip): the record keeps the backend's old storage objects and puts
them back, so the layer is bit for bit what it was.

A layer whose backend cannot requantize, or an integer weight no backend handles, is refused before anything
changes (:func:`refusals`), naming the layer and the way out: ``merge_and_unload(dequantize=True)``, which merges
into float copies of the layers instead (:func:`dequantize_into`), so the result is a plain float model.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from opendelta.errors import OpenDeltaQuantizationWarning
from opendelta.quantization import QuantizationBackend, backend_of, quantized_modules

__all__ = [
    "QuantizedMerge",
    "dequantize_into",
    "merge_quantized_weight",
    "refusals",
    "remove_quantization_config",
    "warn_loss",
]


@dataclass
class QuantizedMerge:
    """What merging into one quantized layer did: the storage it replaced and the error it introduced."""

    backend: QuantizationBackend
    state: dict[str, Any]
    """The backend's storage objects before the merge (put back by an unmerge)."""
    weight_error: float
    """``|deq(q(W + U)) - (W + U)| / |W + U|`` (Frobenius norms): how far the merged layer is from the exact sum."""
    update_error: float
    """``|deq(q(W + U)) - W - U| / |U|``: how much of the update itself was lost to rounding."""

    def restore(self, host: nn.Module) -> None:
        self.backend.restore(host, self.state)


def refusals(updates: Sequence[tuple[nn.Module, Mapping[str, torch.Tensor]]], names: Mapping[int, str]) -> list[str]:
    """Why some of ``updates`` cannot be merged in place: one line per refused layer (empty when all can)."""
    problems = []
    for host, update in updates:
        name = names.get(id(host), type(host).__name__)
        backend = backend_of(host)
        if backend is not None:
            problem = backend.requantize_problem(host) if "weight" in update else None
            if problem:
                problems.append(f"{name} ({backend.name}): {problem}")
            continue
        for key in update:
            current = host._parameters.get(key)
            if current is not None and not current.is_floating_point():
                problems.append(
                    f"{name}.{key} is {current.dtype} and no quantization backend handles {type(host).__name__} "
                    f"(register one with the register_quantization_backends hook)"
                )
    return problems


def merge_quantized_weight(host: nn.Module, update: torch.Tensor) -> QuantizedMerge:
    """Fold the ``[out, in]`` ``update`` into a quantized ``host``'s weight through its backend; measure the loss."""
    backend = backend_of(host)
    assert backend is not None, "merge_quantized_weight needs a quantized layer"
    state = backend.saved_state(host)
    with torch.no_grad():
        before = backend.dequantize(host).to(torch.float32)
        change = update.to(device=before.device, dtype=torch.float32)
        exact = before + change
        backend.requantize(host, exact.to(backend.compute_dtype(host)))
        after = backend.dequantize(host).to(torch.float32)
        weight_error = float((after - exact).norm() / exact.norm().clamp_min(1e-30))
        update_error = float((after - exact).norm() / change.norm().clamp_min(1e-30))
    return QuantizedMerge(backend, state, weight_error, update_error)


def warn_loss(merges: Sequence[QuantizedMerge], owner: str) -> None:
    """One warning for a merge into quantized layers: how many, which backends, the largest relative errors."""
    if not merges:
        return
    kinds = ", ".join(sorted({m.backend.name for m in merges}))
    weight = max(m.weight_error for m in merges)
    update = max(m.update_error for m in merges)
    warnings.warn(
        f"{owner} merged into {len(merges)} quantized layer(s) ({kinds}), which requantizes them and is lossy: the "
        f"merged weights differ from W + delta by up to {weight:.2%} (relative), and up to {update:.1%} of the "
        f"update's norm is lost to rounding. unmerge() restores the original quantized weights exactly; "
        f"merge_and_unload(dequantize=True) merges into float weights without this loss",
        OpenDeltaQuantizationWarning,
        stacklevel=4,
    )


def _float_linear(module: nn.Module, backend: QuantizationBackend, weight: torch.Tensor | None) -> nn.Linear:
    """A plain ``nn.Linear`` computing what the quantized ``module`` computes (with ``weight`` if given)."""
    in_features, out_features = backend.features(module)
    dtype, device = backend.compute_dtype(module), backend.device(module)
    bias = getattr(module, "bias", None)
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    values = backend.dequantize(module) if weight is None else weight
    linear.weight = nn.Parameter(values.detach().to(device=device, dtype=dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype), requires_grad=False)
    linear.train(module.training)
    return linear


def dequantize_into(model: nn.Module, merged: Mapping[int, torch.Tensor]) -> int:
    """Replace every quantized linear layer of ``model`` by a float ``nn.Linear``; returns how many.

    ``merged`` holds, by ``id`` of the layer, the float weight to use instead of the dequantized one (a layer a
    delta was merged into). Forward hooks or deltas still placed on a replaced layer would be lost: callers replace
    layers only once every delta is merged or detached.
    """
    found = quantized_modules(model)
    parents = dict(model.named_modules())
    for name, module, backend in found:
        parent_name, _, attr = name.rpartition(".")
        parent = parents[parent_name] if parent_name else model
        setattr(parent, attr, _float_linear(module, backend, merged.get(id(module))))
    remove_quantization_config(model)
    return len(found)


def remove_quantization_config(model: nn.Module) -> None:
    """Make transformers models in ``model`` forget they were quantized (so ``save_pretrained`` writes floats)."""
    for module in model.modules():
        quantizer = getattr(module, "hf_quantizer", None)
        if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
            quantizer.remove_quantization_config(module)
        elif getattr(module, "is_quantized", False) and hasattr(getattr(module, "config", None), "to_dict"):
            module.is_quantized = False
            if hasattr(module.config, "quantization_config"):
                del module.config.quantization_config
