"""Where a module call's hidden state is: its main input among the arguments, its main output in what it returns.

Foundation layer: pure functions over call arguments and results, used by the insertion hooks and by the shape probe.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from opendelta.errors import DeltaStateError

__all__ = ["main_input", "main_output", "with_input", "with_output"]


def main_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int | str, torch.Tensor]:
    """The hidden-state input of a call: the first positional tensor, else the first tensor keyword argument.

    OPT and others call submodules with keyword arguments only, so ``args[0]`` cannot be assumed.
    """
    if args and isinstance(args[0], torch.Tensor):
        return 0, args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return "hidden_states", kwargs["hidden_states"]
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return key, value
    raise DeltaStateError(
        f"cannot find the input tensor of {type(module).__name__}: it was called with "
        f"{len(args)} positional argument(s) and keywords {sorted(kwargs)}, none a tensor first"
    )


def with_input(args: tuple[Any, ...], kwargs: dict[str, Any], where: int | str, value: torch.Tensor) -> Any:
    """``(args, kwargs)`` with the main input (at ``where``, from :func:`main_input`) replaced by ``value``."""
    if isinstance(where, int):
        return (value, *args[1:]), kwargs
    return args, {**kwargs, where: value}


def main_output(module: nn.Module, output: Any) -> torch.Tensor:
    """The hidden-state output of a call: the tensor itself, or the first element of a tuple or ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "to_tuple"):
        first = output.to_tuple()[0] if len(output) else None
        if isinstance(first, torch.Tensor):
            return first
    raise DeltaStateError(
        f"cannot find the hidden-state output of {type(module).__name__}: it returned {type(output).__name__}; "
        f"a sequential or parallel delta needs a tensor, or a tuple/ModelOutput whose first element is one"
    )


def with_output(output: Any, value: torch.Tensor) -> Any:
    """``output`` with its main output (see :func:`main_output`) replaced by ``value``."""
    if isinstance(output, torch.Tensor):
        return value
    if isinstance(output, tuple) and not hasattr(output, "to_tuple"):
        return (value, *output[1:])
    if isinstance(output, list):
        return [value, *output[1:]]
    output[next(iter(output.keys()))] = value  # ModelOutput: item and attribute stay in sync
    return output
