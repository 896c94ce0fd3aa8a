"""PEFT's positions for a prefix: the real tokens come after the ``P`` prefix positions.

PEFT's prefix tuning hands the model a key/value cache that already holds the prefix, so every model that counts
positions from the cache puts the first real token at position ``P``: GPT-2's and BERT's learned position
embeddings, the rotary angle of Llama's queries. Core's prefix takes no position, so for a PEFT prefix this module
moves the input stack's ``position_ids`` up by ``P`` (given ones too, as PEFT does), with a pre-hook that is live
while the prefix is attached.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def _sequence_length(arguments: dict[str, Any]) -> tuple[int, torch.device] | None:
    for name in ("input_ids", "inputs_embeds"):
        value = arguments.get(name)
        if isinstance(value, torch.Tensor):
            return value.shape[1], value.device
    return None


def _past_length(arguments: dict[str, Any]) -> int:
    """How many positions the call's key/value cache holds (the bare model's: core's prefix never enters it)."""
    cache_position = arguments.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    cache = arguments.get("past_key_values")
    length = getattr(cache, "get_seq_length", None)
    return int(length()) if callable(length) else 0


class PositionShift:
    """The pre-hook: while ``owner.attached``, ``position_ids`` of the call move up by ``count``.

    A plain object (not a closure), so a backbone carrying it still pickles; it holds the delta model, so the shift
    lives as long as the prefixes it belongs to, even when the caller keeps no reference to the delta model.
    """

    def __init__(self, stack: nn.Module, count: int, owner: Any) -> None:
        self.signature = inspect.signature(stack.forward)
        if "position_ids" not in self.signature.parameters:
            raise TypeError(f"{type(stack).__name__}.forward takes no position_ids")
        self.count, self.owner = count, owner

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.owner.attached:
            return None
        signature = self.signature
        bound = signature.bind_partial(*args, **kwargs)
        arguments: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                return None  # nothing this hook can rewrite by name
            if kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(value)
            else:
                arguments[name] = value
        given = arguments.get("position_ids")
        if isinstance(given, torch.Tensor):
            arguments["position_ids"] = given + self.count
        else:
            found = _sequence_length(arguments)
            if found is None:
                return None
            length, device = found
            start = _past_length(arguments) + self.count
            arguments["position_ids"] = torch.arange(start, start + length, device=device).unsqueeze(0)
        return (), arguments


def shift_positions(stack: nn.Module, count: int, owner: Any) -> RemovableHandle:
    """Move ``stack``'s ``position_ids`` up by ``count`` on every call while ``owner.attached`` is true."""
    return stack.register_forward_pre_hook(PositionShift(stack, count, owner), with_kwargs=True)
