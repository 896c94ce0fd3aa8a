"""Making room for extra leading positions in a module call: prefix rows, soft-prompt tokens.

Several deltas add ``P`` positions in front of a sequence inside one module call (prefix tuning inside an attention
block, a soft prompt in front of an encoder) and take them out of the output again, so that everything outside the
call sees the bare model's shapes. Doing that without per-model code means adjusting the call's other arguments by
name and shape, with rules that hold for the transformers models we map:

* an argument whose name contains ``mask`` (not ``head_mask``) and whose last dimension is the sequence length is an
  attention mask: it gains ``P`` leading key columns, and ``P`` leading query rows when its second-to-last dimension
  is the sequence length too, all "attend" (``True`` for booleans, ``1`` for integers, ``0.0`` for the additive
  float masks transformers uses);
* ``position_bias`` (T5's relative attention bias) is extended the same way with zeros: the new positions carry no
  position bias;
* ``cache_position`` and ``position_ids`` gain ``P`` leading positions and the real ones move up by ``P``;
* ``position_embeddings``, the rotary ``(cos, sin)`` a decoder computes once for its layers, gains ``P`` leading rows
  of the identity rotation (cos 1, sin 0): the new positions are not rotated, as the prefix keys that transformers'
  attention interface receives are not;
* ``seq_len``, an integer a task head hands its base model (transformers 4.57's ModernBERT, which sizes its masks and
  positions by it), grows by ``P`` when it is the call's length;
* arguments an architecture declares as relative positions (DeBERTa's ``relative_pos``) are dropped, so that the
  module rebuilds them for the longer sequence.

Anything else is left alone. The same rules apply inside a ``**kwargs`` argument.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection
from functools import cache
from typing import Any

import torch
from torch import nn

from opendelta.errors import DeltaStateError

__all__ = [
    "align_with_cache",
    "bound_arguments",
    "extend_arguments",
    "find_cache",
    "layer_index",
    "strip_positions",
    "takes_rotary_embeddings",
    "unbind",
]

POSITION_ARGUMENTS = ("cache_position", "position_ids")
BIAS_ARGUMENTS = ("position_bias",)
ROTARY_ARGUMENTS = ("position_embeddings",)
LENGTH_ARGUMENTS = ("seq_len",)


@cache
def _signature(cls: type[nn.Module]) -> inspect.Signature:
    return inspect.signature(cls.forward)


class _BoundCall(inspect.BoundArguments):
    """Bound arguments that remember how many the caller passed by position."""

    __slots__ = ("positional",)


def bound_arguments(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> inspect.BoundArguments:
    """The call's arguments by parameter name (positional ones included), for editing by name."""
    signature = _signature(type(module))
    call = _BoundCall(signature, signature.bind(None, *args, **kwargs).arguments)  # ``None`` stands for ``self``
    call.positional = len(args)
    return call


def unbind(bound: inspect.BoundArguments) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of an edited call, in the caller's own style.

    What was passed by position stays positional; everything else, added arguments included, goes by keyword.
    (Re-deriving the split from the signature is not safe: decorated ``forward`` methods of transformers accept
    keywords their unwrapped signature places differently.)
    """
    count = bound.positional if isinstance(bound, _BoundCall) else len(bound.args) - 1
    parameters = list(bound.signature.parameters.values())[1:]
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:count]
    args = tuple(bound.arguments[name] for name in positional)
    kwargs: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if name == "self" or name in positional:
            continue
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            args += tuple(value)
        else:
            kwargs[name] = value
    return args, kwargs


def _attend_value(tensor: torch.Tensor) -> bool | float | int:
    if tensor.dtype == torch.bool:
        return True
    return 0.0 if tensor.is_floating_point() else 1


def _pad(tensor: torch.Tensor, dim: int, count: int, value: bool | float | int) -> torch.Tensor:
    shape = list(tensor.shape)
    shape[dim] = count
    return torch.cat([tensor.new_full(shape, value), tensor], dim=dim)


def _extend_square(tensor: torch.Tensor, count: int, length: int, value: bool | float | int) -> torch.Tensor:
    """Pad the key dimension (last) and, when it is the sequence too, the query dimension (second to last).

    Only masks of three or more dimensions have a query dimension: a ``(batch, length)`` mask is never padded
    along its batch, even when the batch size equals the length.
    """
    if tensor.shape[-1] == length:
        tensor = _pad(tensor, -1, count, value)
    if tensor.dim() >= 3 and tensor.shape[-2] == length:
        tensor = _pad(tensor, -2, count, value)
    return tensor


def _extend_positions(tensor: torch.Tensor, count: int) -> torch.Tensor:
    start = tensor[..., :1]
    leading = start + torch.arange(count, device=tensor.device, dtype=tensor.dtype)
    return torch.cat([leading, tensor + count], dim=-1)


def takes_rotary_embeddings(bound: inspect.BoundArguments) -> bool:
    """Whether the call hands the module precomputed rotary ``(cos, sin)`` (an argument of ``ROTARY_ARGUMENTS``).

    Such a module rotates nothing by itself: its added rows get the identity rotation (see ``extend_arguments``).
    One that rotates by ``position_ids`` (GPT-J) gives the added rows positions of their own instead.
    """
    values = [bound.arguments.get(n) for n in ROTARY_ARGUMENTS]
    nested = [v.get(n) for v in bound.arguments.values() if isinstance(v, dict) for n in ROTARY_ARGUMENTS]
    return any(isinstance(v, tuple) and len(v) == 2 for v in [*values, *nested])


def _unrotated_rows(value: Any, count: int, length: int) -> Any:
    """Rotary ``(cos, sin)`` of ``length`` positions with ``count`` leading identity rotations; other values as is."""
    if not (isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, torch.Tensor) for v in value)):
        return value
    cos, sin = value
    if cos.dim() < 2 or cos.shape != sin.shape or cos.shape[-2] != length:
        return value
    return _pad(cos, -2, count, 1.0), _pad(sin, -2, count, 0.0)


def _extend_one(name: str, value: Any, count: int, length: int, where: str) -> Any:
    if name in ROTARY_ARGUMENTS:
        return _unrotated_rows(value, count, length)
    if name in LENGTH_ARGUMENTS and isinstance(value, int) and not isinstance(value, bool):
        return value + count if value == length else value
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if name in POSITION_ARGUMENTS and not value.is_floating_point():
        return _extend_positions(value, count) if value.shape[-1] == length else value
    is_mask = "mask" in name and "head_mask" not in name
    if not (is_mask or name in BIAS_ARGUMENTS):
        return value
    if value.shape[-1] not in (length, length + count):
        raise DeltaStateError(
            f"{where}: argument {name!r} has shape {tuple(value.shape)}, which fits neither the {length} positions of "
            f"the call nor {length + count} with the {count} added ones"
        )
    return _extend_square(value, count, length, 0.0 if name in BIAS_ARGUMENTS else _attend_value(value))


def extend_arguments(
    bound: inspect.BoundArguments,
    skip: str,
    count: int,
    length: int,
    relative_positions: Collection[str] = (),
    where: str = "the call",
) -> None:
    """Adjust every argument but ``skip`` (the sequence itself) for ``count`` new leading positions, in place.

    Args:
        bound: the call's arguments (see :func:`bound_arguments`).
        skip: the name of the sequence argument the caller extends itself.
        count: how many positions are added in front.
        length: the sequence length before they are added.
        relative_positions: argument names to drop so the module rebuilds them (declared by the mapping).
        where: the module, for error messages.

    Raises:
        DeltaStateError: a mask or bias fits neither length.
    """
    for name, value in list(bound.arguments.items()):
        if name == skip:
            continue
        if name in relative_positions:
            bound.arguments[name] = None
        elif isinstance(value, dict) and _signature_kind(bound, name) is inspect.Parameter.VAR_KEYWORD:
            bound.arguments[name] = {
                key: None if key in relative_positions else _extend_one(key, item, count, length, where)
                for key, item in value.items()
            }
        else:
            bound.arguments[name] = _extend_one(name, value, count, length, where)


def _signature_kind(bound: inspect.BoundArguments, name: str) -> inspect._ParameterKind:
    return bound.signature.parameters[name].kind


def strip_positions(output: Any, count: int, length: int) -> Any:
    """Take the ``count`` leading positions back out of a module's output.

    The hidden state (the tensor itself, or the first element of a tuple or ``ModelOutput``) loses its first
    ``count`` rows along the sequence dimension; any other tensor of the output that is square in the extended
    length (T5's position bias, attention weights) is cut back to ``length`` on both of those dimensions.

    The hidden state is returned contiguous, as the bare model's is. A strided view would make the task head's
    ``linear`` choose its kernel by whether the head's weight requires grad (PyTorch folds a 3-D input into one
    ``mm`` for a trainable weight, runs ``bmm`` for a frozen one), and MKL rounds those two differently on AVX-512
    CPUs: a checkpoint trained on a frozen backbone would then reload onto a fresh, trainable one with outputs
    differing in the last bit.
    """
    extended = length + count

    def cut(value: Any, first: bool) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if first and value.dim() >= 2 and value.shape[-2] == extended:
            return value[..., count:, :].contiguous()
        if value.dim() >= 2 and value.shape[-1] == extended and value.shape[-2] == extended:
            return value[..., count:, count:]
        return value

    if isinstance(output, torch.Tensor):
        return cut(output, True)
    if hasattr(output, "to_tuple"):
        for index, key in enumerate(list(output.keys())):
            output[key] = cut(output[key], index == 0)
        return output
    if isinstance(output, (tuple, list)):
        return type(output)(cut(value, index == 0) for index, value in enumerate(output))
    raise DeltaStateError(f"cannot take the added positions out of an output of type {type(output).__name__}")


def find_cache(bound: inspect.BoundArguments) -> Any:
    """The transformers key/value cache among the call's arguments, or ``None``.

    For an encoder-decoder cache, its self-attention part.
    """
    try:
        from transformers.cache_utils import Cache, EncoderDecoderCache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    values = list(bound.arguments.values())
    for value in values + [v for d in values if isinstance(d, dict) for v in d.values()]:
        if isinstance(value, EncoderDecoderCache):
            return value.self_attention_cache
        if isinstance(value, Cache):
            return value
    return None


def layer_index(module: nn.Module) -> int | None:
    """The ``layer_idx`` transformers gives an attention module (searched in ``module`` and its submodules)."""
    for sub in module.modules():
        index = getattr(sub, "layer_idx", None)
        if isinstance(index, int):
            return index
    return None


def align_with_cache(
    bound: inspect.BoundArguments, count: int, masks: Collection[str], *, positional: bool = True
) -> bool:
    """After the first step of a cached ``generate()``, account for ``count`` positions the cache holds extra.

    When added positions (a soft prompt, a prefix through placeholder rows) entered the key/value cache with the
    first step, the cache is ``count`` longer than the tokens ``generate()`` counted. Then ``cache_position`` and
    ``position_ids`` move up by ``count`` and the 2-d masks named in ``masks`` gain ``count`` leading "attend"
    columns, so that positions and masks inside the model agree with the cache. Detected by comparing the cache
    length with the call's positions or mask; a call that already agrees is left alone.

    ``positional=False`` is for added positions that carry no position (a prefix): ``position_ids``, which rotary
    positions are computed from, stay those of the bare model, and where the call gives none but the model's
    forward takes them, they are set to the unshifted ``cache_position`` (what the model would derive itself).

    Returns:
        Whether the call was changed (in place).
    """
    cache_ = find_cache(bound)
    length = cache_.get_seq_length() if cache_ is not None else 0
    if not length:
        return False
    arguments = bound.arguments
    nested = next((v for k, v in arguments.items() if isinstance(v, dict) and "cache_position" in v), None)
    position = arguments.get("cache_position", nested.get("cache_position") if nested else None)
    mask_name = next((n for n in masks if isinstance(arguments.get(n), torch.Tensor)), None)
    position_ids = arguments.get("position_ids")
    new_tokens = None
    if isinstance(position, torch.Tensor) and position.numel():
        if int(position.reshape(-1)[0]) + count != length:
            return False
        new_tokens = position.shape[-1]
    elif mask_name is not None and arguments[mask_name].dim() == 2:
        new_tokens = arguments[mask_name].shape[-1] + count - length
        if new_tokens < 1:
            return False
    elif isinstance(position_ids, torch.Tensor) and position_ids.numel():
        # No cache_position and no mask: transformers 5 drops an all-ones mask, and then counts positions without
        # the added ones. Unpadded, every row's first position is the number of tokens generate() has seen.
        if int(position_ids[..., 0].max()) + count != length:
            return False
        new_tokens = position_ids.shape[-1]
    else:
        return False
    if isinstance(position, torch.Tensor):
        if nested is not None and "cache_position" not in arguments:
            nested["cache_position"] = position + count
        else:
            arguments["cache_position"] = position + count
    if isinstance(arguments.get("position_ids"), torch.Tensor):
        if positional:
            arguments["position_ids"] = arguments["position_ids"] + count
    elif not positional and isinstance(position, torch.Tensor) and "position_ids" in bound.signature.parameters:
        arguments["position_ids"] = position.unsqueeze(0)
    for name in masks:
        mask = arguments.get(name)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[-1] + count == length + new_tokens:
            arguments[name] = torch.cat([mask.new_ones(mask.shape[0], count), mask], dim=-1)
    return True
