"""The checks every tensor read from a file passes before it reaches a model, whatever the format.

A checkpoint in this library's format (safetensors), an OpenDelta 0.3.x ``pytorch_model.bin`` and a PEFT adapter
all end in ``parameter.copy_(tensor)``. That copy accepts far more than trained weights: integers and booleans
(cast silently), complex numbers (imaginary part dropped, with a warning at most), NaN and infinity, and a float64
``1e300`` that becomes ``inf`` in a float32 parameter. A pickle can also hold tensors that are not plain memory
(sparse, meta, nested, quantized), on which the checks themselves would fail with a raw error. So every reader
calls the two functions here, and the checks are the same for every format:

* :func:`plain_tensors`, right after reading: a mapping of names to dense, in-memory tensors;
* :func:`checked_tensors`, once the parameters they are for are known: real floating-point values that stay
  finite *after* the cast to the parameter's dtype (the value checked is the value copied).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from opendelta.errors import CheckpointError

__all__ = ["checked_tensors", "plain_tensors"]


def _not_plain(tensor: Any) -> str | None:
    """Why ``tensor`` is not a dense tensor in memory, or ``None`` when it is one."""
    if not isinstance(tensor, torch.Tensor):
        return f"a {type(tensor).__name__}, not a tensor"
    if tensor.is_nested:
        return "a nested tensor"
    if tensor.layout != torch.strided:
        return f"a sparse tensor ({tensor.layout})"
    if tensor.is_meta:
        return "a meta tensor (a shape without values)"
    if tensor.is_quantized:
        return f"a quantized tensor ({tensor.dtype})"
    return None


def plain_tensors(tensors: Any, source: str) -> dict[str, torch.Tensor]:
    """``tensors`` as a dict, refused unless it maps names to dense tensors that hold their values in memory.

    Buffers may be of any dtype here (GPT-2's boolean mask in a legacy file); :func:`checked_tensors` checks the
    values of what is loaded into parameters.

    Raises:
        CheckpointError: not a mapping of strings to tensors, or a sparse, meta, nested or quantized tensor.
    """
    if not isinstance(tensors, Mapping) or not all(isinstance(n, str) for n in tensors):
        raise CheckpointError(f"the weights of {source} must map parameter names to tensors")
    for name, tensor in tensors.items():
        problem = _not_plain(tensor)
        if problem is not None:
            raise CheckpointError(
                f"{source}: {name!r} is {problem}; a checkpoint holds dense tensors with their values, so the file "
                f"is damaged or was not written as a delta checkpoint; nothing was loaded"
            )
    return dict(tensors)


def checked_tensors(
    tensors: Any, source: str, *, targets: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors cast to the dtype of the parameters they are loaded into, refused unless they are trained weights.

    Args:
        tensors: what a file holds, by parameter name.
        source: the file or folder, for the messages.
        targets: the parameters the tensors are for, by the same names; a tensor not named there keeps its dtype.

    Returns:
        The tensors, each cast to its target's dtype (what ``copy_`` would make of it).

    Raises:
        CheckpointError: naming the tensor: not a dense tensor (see :func:`plain_tensors`), integer, boolean or
            complex values, NaN or infinity, or values that overflow the target's dtype (``1e300`` into float32).
    """
    tensors = plain_tensors(tensors, source)
    targets = targets or {}
    out = {}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CheckpointError(
                f"{source}: {name!r} is {tensor.dtype}, not a floating-point tensor (trained weights are real "
                f"floating-point numbers); the file is damaged; nothing was loaded"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{source}: {name!r} holds NaN or infinite values (training diverged, or the file is damaged); "
                f"nothing was loaded"
            )
        target = targets.get(name)
        cast = tensor if target is None else tensor.to(target.dtype)
        if target is not None and not bool(torch.isfinite(cast).all()):
            raise CheckpointError(
                f"{source}: {name!r} holds values beyond the range of {target.dtype}, the dtype of the parameter it "
                f"is loaded into (as {tensor.dtype} they reach {tensor.abs().max().item():.3g}; cast they become "
                f"infinite); nothing was loaded"
            )
        out[name] = cast
    return out
