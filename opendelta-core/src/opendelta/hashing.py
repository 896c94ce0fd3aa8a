"""The backbone hash: a fingerprint of a backbone's parameters that a checkpoint records and a load checks.

The original hashed ``repr(model)`` and every weight with md5: about 2 s for 110M parameters, and it crashed on
bfloat16. This one hashes every parameter's name, shape and dtype, and an evenly strided sample of up to
``SAMPLE`` values of each tensor (cast to float32), with SHA-256: a few milliseconds for a base-size model, exact
for the structure, and different weights (another checkpoint, an untrained task head) change it with
overwhelming probability. Delta parameters are left out, so the hash describes the backbone alone.

Reduced precision: the same weights cast to float16 or bfloat16 (``model.half()``, ``torch_dtype=torch.bfloat16``)
are the same backbone, but their exact hash differs (other dtype, rounded values). A checkpoint therefore also
records :func:`reduced_precision_hashes`: the hash with every floating-point sample rounded to float16 (and to
bfloat16) and the dtype left out of the header. Rounding is idempotent, so a backbone already in that precision,
or one partly kept in float32 (T5's ``_keep_in_fp32_modules``), hashes to the same value; weights that differ by
more than that precision's rounding (another checkpoint, an untrained head) still change it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import nn

from opendelta.markers import bare_parameter_names, delta_parameter_names
from opendelta.quantization import backend_of, quantized_modules

__all__ = ["REDUCED_PRECISIONS", "SAMPLE", "backbone_hash", "parameter_sample", "reduced_precision_hashes"]

SAMPLE = 4096

REDUCED_PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16}
"""The precisions a checkpoint records a rounded hash for, by the name it records them under."""


def parameter_sample(tensor: torch.Tensor, module: nn.Module | None = None, name: str | None = None) -> bytes:
    """What the hash reads of one tensor: an evenly strided sample of up to :data:`SAMPLE` values, as float32.

    Given the ``module`` and the ``name`` it holds the tensor under, a quantized layer's parameter is read the way
    :func:`backbone_hash` reads it (its backend's canonical storage).
    """
    backend = backend_of(module) if module is not None and name is not None else None
    if backend is not None:
        return b"".join(_sample(part) for part in backend.hash_tensors(module, name))  # type: ignore[arg-type]
    return _sample(tensor)


def _storage(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold ``tensor``: itself, or a quantized tensor subclass's inner ones (torchao, quanto).

    Such a subclass implements few ops (no strided slicing), and its storage is what identifies the weights, so the
    hash reads that, one layer at a time, without dequantizing anything.
    """
    if type(tensor) in (torch.Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [plain for name in names for plain in _storage(getattr(tensor, name))]


def _sample(tensor: torch.Tensor) -> bytes:
    parts = _storage(tensor)
    if len(parts) > 1 or parts[0] is not tensor:
        return b"".join(_sample(part) for part in parts)
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLE)
    values = flat[::step][:SAMPLE].to(device="cpu", dtype=torch.float32).contiguous()
    return values.numpy().tobytes()


def _rounded(sample: bytes, precision: torch.dtype) -> bytes:
    """A float32 sample's values rounded to ``precision`` (and back to float32, so every precision reads alike)."""
    if not sample:
        return sample
    values = torch.frombuffer(bytearray(sample), dtype=torch.float32)
    return values.to(precision).to(torch.float32).numpy().tobytes()


def backbone_hash(
    model: nn.Module,
    overrides: Mapping[str, torch.Tensor] | None = None,
    samples: Mapping[str, bytes | None] | None = None,
    precision: torch.dtype | None = None,
) -> str:
    """Fingerprint ``model``'s non-delta parameters.

    Args:
        model: the backbone (deltas may be attached; they are ignored).
        overrides: tensors to use instead of the model's own for some parameter names, so that the hash the
            backbone *would* have after loading a checkpoint can be checked before anything is modified.
        samples: what :func:`parameter_sample` read of some parameters earlier, to use instead of their current
            values (a merged delta records its modules' parameters before merging); ``None`` leaves a parameter
            out (one that merging created).
        precision: round every floating-point parameter's sample to this dtype and leave floating-point dtypes
            out of the header (see the module docstring); ``None`` hashes exactly.

    Returns:
        ``"sha256:<hex>"``.
    """
    overrides, samples = overrides or {}, samples or {}
    quantized = {
        f"{prefix}.{name}" if prefix else name: (module, backend, name)
        for prefix, module, backend in quantized_modules(model)
        for name, value in module._parameters.items()
        if value is not None
    }
    skip = delta_parameter_names(model)
    bare = bare_parameter_names(model)  # a wrapping replacement's original is hashed under the backbone's name
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: bare[item[0]]):
        if name in skip or (name in samples and samples[name] is None):
            continue
        if name in quantized and name not in overrides:  # its canonical storage (a repacked layout reads alike)
            module, backend, local = quantized[name]
            parts = backend.hash_tensors(module, local)
        else:
            parts = [overrides[name].to(param.dtype) if name in overrides else param]
        rounded = precision is not None and param.is_floating_point()
        kind = "floating" if rounded else str(param.dtype)
        digest.update(f"{bare[name]}|{tuple(parts[0].shape)}|{kind}\n".encode())
        recorded = samples.get(name)
        sample = recorded if recorded is not None else b"".join(_sample(part) for part in parts)
        digest.update(_rounded(sample, precision) if rounded else sample)  # type: ignore[arg-type]
    return "sha256:" + digest.hexdigest()


def reduced_precision_hashes(
    model: nn.Module,
    overrides: Mapping[str, torch.Tensor] | None = None,
    samples: Mapping[str, bytes | None] | None = None,
) -> dict[str, str]:
    """:func:`backbone_hash` rounded to each of :data:`REDUCED_PRECISIONS`, by precision name."""
    return {name: backbone_hash(model, overrides, samples, dtype) for name, dtype in REDUCED_PRECISIONS.items()}
