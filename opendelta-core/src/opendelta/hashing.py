"""The backbone hash: a fingerprint of a backbone's parameters that a checkpoint records and a load checks.

The original hashed ``repr(model)`` and every weight with md5: about 2 s for 110M parameters, and it crashed on
bfloat16. This one hashes every parameter's name, shape and dtype, and an evenly strided sample of up to
``SAMPLE`` values of each tensor (cast to float32), with SHA-256: a few milliseconds for a base-size model, exact
for the structure, and different weights (another checkpoint, an untrained task head) change it with
overwhelming probability. Delta parameters are left out, so the hash describes the backbone alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import nn

from opendelta.insertion import delta_parameter_names

__all__ = ["SAMPLE", "backbone_hash", "parameter_sample"]

SAMPLE = 4096


def parameter_sample(tensor: torch.Tensor) -> bytes:
    """What the hash reads of one tensor: an evenly strided sample of up to :data:`SAMPLE` values, as float32."""
    return _sample(tensor)


def _sample(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLE)
    values = flat[::step][:SAMPLE].to(device="cpu", dtype=torch.float32).contiguous()
    return values.numpy().tobytes()


def backbone_hash(
    model: nn.Module,
    overrides: Mapping[str, torch.Tensor] | None = None,
    samples: Mapping[str, bytes | None] | None = None,
) -> str:
    """Fingerprint ``model``'s non-delta parameters.

    Args:
        model: the backbone (deltas may be attached; they are ignored).
        overrides: tensors to use instead of the model's own for some parameter names, so that the hash the
            backbone *would* have after loading a checkpoint can be checked before anything is modified.
        samples: what :func:`parameter_sample` read of some parameters earlier, to use instead of their current
            values (a merged delta records its modules' parameters before merging); ``None`` leaves a parameter
            out (one that merging created).

    Returns:
        ``"sha256:<hex>"``.
    """
    overrides, samples = overrides or {}, samples or {}
    skip = delta_parameter_names(model)
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if name in skip or (name in samples and samples[name] is None):
            continue
        tensor = overrides[name].to(param.dtype) if name in overrides else param
        digest.update(f"{name}|{tuple(tensor.shape)}|{param.dtype!s}\n".encode())
        recorded = samples.get(name)
        digest.update(recorded if recorded is not None else _sample(tensor))
    return "sha256:" + digest.hexdigest()
