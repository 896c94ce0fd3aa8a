"""Prefix tuning's one mechanism: learned keys and values in front of an attention's own, on any architecture.

A prefix delta is an ``nn.Module`` with ``num_tokens`` (``P``) and ``key_value()`` returning a ``[P, key size]`` and
a ``[P, value size]`` tensor, in the output space of the attention's key and value projections. Core places it on an
attention module (a registered child, like every delta) in one of two ways, chosen per module:

* **interface**: when the attention computes through transformers' ``AttentionInterface`` (GPT-2, BART and OPT on
  4.57; every mapped attention but DeBERTa's on 5.x), the prefix is prepended to the key and value *at that call*,
  after the key/value cache was updated: the cache never holds the prefix, so positions and cache lengths stay those
  of the bare model and ``generate()`` works with the cache, greedy or beam. The module's config names our
  implementation only while the module runs.
* **rows**: otherwise (DeBERTa, and BERT, RoBERTa and T5 on 4.57), ``P`` placeholder rows are put in front of the
  attention's input, the call's masks and positions are extended (``opendelta.sequence``), the key and value
  projections' outputs for those rows are replaced by the prefix, and the rows are cut from the output again. With
  a key/value cache, the prefix enters the cache with the first step and later steps leave it there.

Either way the prefix carries no position: where an architecture computes a relative position bias inside the
attention (T5), its mapping names the module that produces it, and the bias of the prefix keys is zero, as the
interface backend gives them. No attention class is written per model: what varies is read from the common-structure
mapping (the key and value projections ``attn.k``/``attn.v``; the optional ``attention`` hints).
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import nn

from opendelta.delta_protocols import PrefixSource
from opendelta.errors import DeltaStateError, UnsupportedTargetError
from opendelta.insertion import SLOT_HANDLERS, Insertion, _insert, _Slot, register_placement
from opendelta.markers import SLOTS_ATTR
from opendelta.module_io import main_input
from opendelta.sequence import (
    align_with_cache,
    bound_arguments,
    extend_arguments,
    find_cache,
    layer_index,
    strip_positions,
    takes_rotary_embeddings,
    unbind,
)
from opendelta.shapes import fused_output_index, linear_features
from opendelta.structure_registry import structure_for_model

__all__ = [
    "INTERFACE_KEY",
    "AttentionParts",
    "PrefixPlacement",
    "PrefixSource",
    "attention_backend",
    "attention_parts",
    "insert_prefix",
    "place_prefix",
]

INTERFACE_KEY = "opendelta_prefix"
"""The attention implementation name our wrapper is registered under in transformers' ``AttentionInterface``."""

_STATE_ATTR = "_opendelta_prefix_state"
_POSITIONLESS_ATTR = "_opendelta_prefix_positionless"
"""Set on a rows-backend prefix at its first call: whether its attention took precomputed rotary embeddings, so the
placeholder rows got the identity rotation and the real positions stayed the bare model's (see ``_RootHandler``)."""


@dataclass(frozen=True)
class PrefixPlacement:
    """How one prefix is placed on one attention module."""

    backend: str
    """``"interface"`` or ``"rows"``."""
    relative_positions: tuple[str, ...] = ()
    """Call arguments holding relative positions, dropped so the module rebuilds them (rows backend)."""
    key_index: torch.Tensor | None = None
    """For a fused projection (GPT-2's ``c_attn``): the output features that are the key (rows backend)."""
    value_index: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------- choosing a backend
@cache
def _calls_interface(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def attention_backend(attention: nn.Module) -> str:
    """``"interface"`` when ``attention`` (or a module inside it) computes through transformers' interface."""
    return "interface" if any(_calls_interface(type(m)) for m in attention.modules()) else "rows"


def _config_of(attention: nn.Module) -> Any:
    for module in attention.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            return config
    raise UnsupportedTargetError(
        f"{type(attention).__name__} computes through transformers' attention interface but carries no config"
    )


# ----------------------------------------------------------------------------------------- the interface backend
@dataclass
class _Active:
    delta: nn.Module
    base: str
    config: Any
    called: bool = False
    marked: bool = False
    """Whether this call put :data:`_FALLBACK_ATTR` on the config (and so takes it off again)."""


class _ActiveState(threading.local):
    """The prefix whose attention is running in this thread (thread-local: torch.compile can trace it)."""

    active: _Active | None = None


_ACTIVE = _ActiveState()


def _base_function(module: nn.Module, base: str) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise UnsupportedTargetError(f"{type(module).__module__} defines no eager_attention_forward")
        return eager
    return ALL_ATTENTION_FUNCTIONS[base]


def _heads(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[P, heads * dim]`` -> ``[batch, heads, P, dim]`` shaped like ``like`` (``[batch, heads, T, dim]``)."""
    batch, heads, _t, dim = like.shape
    per_head = tensor.to(like.dtype).view(tensor.shape[0], heads, dim).transpose(0, 1)  # (heads, P, dim)
    return per_head.unsqueeze(0).expand(batch, heads, tensor.shape[0], dim)


def _prefixed_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any
) -> Any:
    """The wrapper registered as :data:`INTERFACE_KEY`: prefix keys/values, then the model's own implementation."""
    active = _ACTIVE.active
    if active is None:  # the config was left switched (an exception mid-forward): behave as the base
        return _base_function(module, _fallback_base(module))(module, query, key, value, attention_mask, **kwargs)
    active.called = True
    prefix_key, prefix_value = active.delta.key_value()
    count, q_length, k_length = prefix_key.shape[0], query.shape[-2], key.shape[-2]
    key = torch.cat([_heads(prefix_key, key), key], dim=2)
    value = torch.cat([_heads(prefix_value, value), value], dim=2)
    if attention_mask is not None:
        fill = True if attention_mask.dtype == torch.bool else 0.0
        pad = attention_mask.new_full((*attention_mask.shape[:-1], count), fill)
        attention_mask = torch.cat([pad, attention_mask], dim=-1)
    elif active.base != "eager" and q_length > 1:
        causal = kwargs.get("is_causal")
        if causal if causal is not None else getattr(module, "is_causal", True):
            # what the kernel's is_causal would do, aligned at the end, with the prefix visible to every query
            rows = torch.arange(q_length, device=query.device)[:, None] + (k_length - q_length)
            visible = torch.arange(k_length, device=query.device)[None, :] <= rows
            attention_mask = torch.cat([visible.new_ones(q_length, count), visible], dim=-1)[None, None]
    if attention_mask is not None and "is_causal" in kwargs:
        kwargs["is_causal"] = False  # the mask says it all; a kernel-side causal mask would hide the prefix
    if isinstance(kwargs.get("position_bias"), torch.Tensor):
        bias = kwargs["position_bias"]
        kwargs["position_bias"] = torch.cat([bias.new_zeros((*bias.shape[:-1], count)), bias], dim=-1)
    return _base_function(module, active.base)(module, query, key, value, attention_mask, **kwargs)


_FALLBACK_ATTR = "_opendelta_base_attn_implementation"


def _fallback_base(module: nn.Module) -> str:
    config = getattr(module, "config", None)
    return str(getattr(config, _FALLBACK_ATTR, "sdpa"))


_registered = False


def _register_interface() -> None:
    """Register :func:`_prefixed_attention` with transformers, once: when a prefix is first placed or runs.

    Not at import, which would import transformers (about a second) for every user of OpenDelta; a prefix that
    arrives by unpickling a model runs through its handler, which registers it too.
    """
    global _registered
    if _registered:
        return
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    if INTERFACE_KEY not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(INTERFACE_KEY, _prefixed_attention)
    _registered = True


def _switch(config: Any, implementation: str) -> None:
    config._attn_implementation_internal = implementation


# -------------------------------------------------------------------------------------------- the rows backend
@dataclass
class _RowsState:
    count: int
    length: int
    pending: set[str]


def _bias_hook_state(delta: nn.Module) -> int | None:
    """How many leading key positions are prefix in the current call (``None``: no prefix is active)."""
    state = delta.__dict__.get(_STATE_ATTR)
    if isinstance(state, _RowsState):
        return state.count
    return state if isinstance(state, int) else None


def _check_cache_lengths(cache_: Any, index: int, new_tokens: int, module: nn.Module) -> None:
    """Refuse a cache whose layers disagree in length: some layers hold a prefix the model cannot account for.

    When layer ``index`` is about to run, the layers before it already hold this step's ``new_tokens``.
    """
    lengths = [cache_.get_seq_length(i) for i in range(len(cache_))]
    before, after = lengths[:index], lengths[index:]
    if any(n != lengths[index] + new_tokens for n in before) or any(n != lengths[index] for n in after):
        raise DeltaStateError(
            f"the key/value cache has layers of different lengths {sorted(set(lengths))}: with this transformers "
            f"version {type(module).__name__} takes its prefix through placeholder positions that enter the cache, so "
            f"a cached generate() needs a prefix on every self-attention layer of the stack; add the missing layers "
            f"to modified_modules, or generate with use_cache=False"
        )


class _PrefixHandler:
    """The "prefix" slot on an attention module (both backends)."""

    def before(self, module: nn.Module, slot: _Slot, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        delta = module._modules[slot.attr]
        placement: PrefixPlacement = slot.option
        if placement.backend == "interface":
            _register_interface()
            config = _config_of(module)
            base = config._attn_implementation
            if base == INTERFACE_KEY:
                base = getattr(config, _FALLBACK_ATTR, "sdpa")
            marked = _FALLBACK_ATTR not in vars(config)
            setattr(config, _FALLBACK_ATTR, base)
            _switch(config, INTERFACE_KEY)
            delta.__dict__[_STATE_ATTR] = _ACTIVE.active
            _ACTIVE.active = _Active(delta, base, config, marked=marked)
            return None
        bound = bound_arguments(module, args, kwargs)
        cache_ = find_cache(bound)
        index = layer_index(module)
        if cache_ is not None and index is not None and cache_.get_seq_length(index) > 0:
            _check_cache_lengths(cache_, index, main_input(module, args, kwargs)[1].shape[-2], module)
            delta.__dict__[_STATE_ATTR] = delta.num_tokens  # the prefix entered the cache with the first step
            return None
        where, hidden = main_input(module, args, kwargs)
        name = list(bound.signature.parameters)[1 + where] if isinstance(where, int) else where
        count, length = delta.num_tokens, hidden.shape[-2]
        placeholder = hidden.new_zeros((*hidden.shape[:-2], count, hidden.shape[-1]))
        bound.arguments[name] = torch.cat([placeholder, hidden], dim=-2)
        delta.__dict__[_POSITIONLESS_ATTR] = takes_rotary_embeddings(bound)
        extend_arguments(bound, name, count, length, placement.relative_positions, where=type(module).__name__)
        delta.__dict__[_STATE_ATTR] = _RowsState(count, length, {"key", "value"})
        return unbind(bound)

    def after(self, module: nn.Module, slot: _Slot, args: Any, kwargs: Any, output: Any) -> Any:
        delta = module._modules[slot.attr]
        state = delta.__dict__.pop(_STATE_ATTR, None)
        placement: PrefixPlacement = slot.option
        if placement.backend == "interface":
            active = _ACTIVE.active
            _ACTIVE.active = state
            _switch(active.config, active.base)
            if active.marked:  # kept only while switched: else save_pretrained would write it into config.json
                vars(active.config).pop(_FALLBACK_ATTR, None)
            if not active.called:
                raise UnsupportedTargetError(
                    f"the prefix on {type(module).__name__} was never used: it does not compute its attention through "
                    f"transformers' attention interface with the config it carries"
                )
            return None
        if not isinstance(state, _RowsState):
            return None
        if state.pending:
            raise UnsupportedTargetError(
                f"the prefix on {type(module).__name__} could not place its {' and '.join(sorted(state.pending))}: the "
                f"projection(s) the common structure names attn.k/attn.v were not called on its input"
            )
        return strip_positions(output, state.count, state.length)


class _ProjectionHandler:
    """A "prefix_key"/"prefix_value" satellite slot on a projection: puts the prefix into the placeholder rows."""

    def __init__(self, role: str) -> None:
        self.role = role

    def before(self, module: nn.Module, slot: _Slot, args: Any, kwargs: Any) -> Any:
        return None

    def after(self, module: nn.Module, slot: _Slot, args: Any, kwargs: Any, output: Any) -> Any:
        delta = slot.ref
        state = delta.__dict__.get(_STATE_ATTR) if delta is not None else None
        if not isinstance(state, _RowsState) or self.role not in state.pending:
            return None  # not this attention's call (DeBERTa also projects its position embeddings)
        state.pending.discard(self.role)
        prefix = delta.key_value()[0 if self.role == "key" else 1].to(output.dtype)  # (P, features)
        index = slot.option
        rows = output[..., : state.count, :]
        if index is None:
            rows = prefix.expand_as(rows)
        else:
            rows = rows.clone()
            rows[..., index] = prefix.expand(*rows.shape[:-1], prefix.shape[-1])
        return torch.cat([rows, output[..., state.count :, :]], dim=-2)


class _RelativeBiasHandler:
    """A "prefix_bias" satellite slot on the module producing a relative position bias: prefix keys get none."""

    def before(self, module: nn.Module, slot: _Slot, args: Any, kwargs: Any) -> Any:
        return None

    def after(self, module: nn.Module, slot: _Slot, args: Any, kwargs: Any, output: Any) -> Any:
        count = _bias_hook_state(slot.ref) if slot.ref is not None else None
        if not count or not isinstance(output, torch.Tensor):
            return None
        axis = slot.option
        keep = torch.ones(output.shape[axis], dtype=output.dtype, device=output.device)
        keep[:count] = 0
        shape = [1] * output.dim()
        shape[axis] = -1
        return output * keep.view(shape)


class _RootHandler:
    """A "prefix_root" satellite slot on the backbone, for the rows backend under a key/value cache.

    The prefix entered the cache with the first step, so the cache is ``P`` longer than the tokens ``generate()``
    has counted: see :func:`opendelta.sequence.align_with_cache`.
    """

    def before(self, module: nn.Module, slot: _Slot, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            bound = bound_arguments(module, args, kwargs)
        except TypeError:  # a call the signature does not describe: nothing to adjust
            return None
        encoder_decoder = bool(getattr(getattr(module, "config", None), "is_encoder_decoder", False))
        masks = ("decoder_attention_mask",) if encoder_decoder else ("attention_mask",)
        count = getattr(slot.ref, "num_tokens", 0)
        # The placeholder rows took positions of their own (position_ids moved up by P in the first step) unless
        # their attention was handed rotary embeddings, which gave them the identity rotation instead.
        positional = not getattr(slot.ref, "__dict__", {}).get(_POSITIONLESS_ATTR, False)
        return unbind(bound) if align_with_cache(bound, count, masks, positional=positional) else None

    def after(self, module: nn.Module, slot: _Slot, args: Any, kwargs: Any, output: Any) -> Any:
        return None


SLOT_HANDLERS.update(
    {
        "prefix": _PrefixHandler(),
        "prefix_key": _ProjectionHandler("key"),
        "prefix_value": _ProjectionHandler("value"),
        "prefix_bias": _RelativeBiasHandler(),
        "prefix_root": _RootHandler(),
    }
)


# ------------------------------------------------------------------------------------------------- placing one
def insert_prefix(
    attention: nn.Module,
    delta_module: nn.Module,
    delta_name: str = "prefix",
    *,
    key: tuple[nn.Module, torch.Tensor | None],
    value: tuple[nn.Module, torch.Tensor | None],
    relative_bias: tuple[tuple[nn.Module, int], ...] = (),
    relative_positions: tuple[str, ...] = (),
    backend: str | None = None,
    root: nn.Module | None = None,
) -> Insertion:
    """Place a prefix (see :class:`PrefixSource`) on an attention module.

    Args:
        attention: the self-attention block (the common structure's ``attn``).
        delta_module: the prefix; it becomes a child of ``attention``.
        delta_name: its child name (``prefix``, then ``prefix_1``... when taken).
        key: the key projection inside ``attention``, and for a fused one the indices of its key features.
        value: the value projection, likewise.
        relative_bias: ``(module, key axis)`` of modules producing a relative position bias inside the attention.
        relative_positions: call arguments of ``attention`` holding relative positions (rows backend).
        backend: ``"interface"`` or ``"rows"``; chosen by :func:`attention_backend` when ``None``.
        root: the model ``generate()`` calls, to keep its cache positions in step with a cached prefix (rows
            backend; give it for one prefix of a delta model only).

    Raises:
        DeltaStateError: the module already carries a prefix.
        TypeError: ``delta_module`` is not a :class:`PrefixSource`.
    """
    _register_interface()
    if not isinstance(delta_module, PrefixSource):
        raise TypeError(
            f"a prefix must provide num_tokens and key_value() (opendelta.delta_protocols.PrefixSource); "
            f"{type(delta_module).__name__} does not"
        )
    if any(s.kind == "prefix" for s in getattr(attention, SLOTS_ATTR, None) or ()):
        raise DeltaStateError(
            f"{type(attention).__name__} already carries a prefix; detach that prefix model before adding another"
        )
    backend = backend or attention_backend(attention)
    if backend == "rows" and key[0] is value[0] and key[1] is None:
        raise UnsupportedTargetError(f"the key and value projections of {type(attention).__name__} are one module")
    placement = PrefixPlacement(backend, tuple(relative_positions), key[1], value[1])
    satellites: list[tuple[nn.Module, str, Any]] = []
    if backend == "rows":
        satellites += [(key[0], "prefix_key", key[1]), (value[0], "prefix_value", value[1])]
        satellites += [(module, "prefix_bias", axis) for module, axis in relative_bias]
        if root is not None:
            satellites.append((root, "prefix_root", None))
    return _insert(attention, delta_module, delta_name, "prefix", False, tuple(satellites), placement)


# ------------------------------------------------------------------------------------ reading the mapping for it
@dataclass(frozen=True)
class AttentionParts:
    """What the common structure says about one self-attention block, for placing a prefix on it."""

    key: tuple[nn.Module, torch.Tensor | None]
    value: tuple[nn.Module, torch.Tensor | None]
    key_features: int
    value_features: int
    relative_bias: tuple[tuple[nn.Module, int], ...]
    relative_positions: tuple[str, ...]


def _projection(
    backbone: nn.Module, common: dict[str, Any], wanted: str, attention_name: str
) -> tuple[nn.Module, torch.Tensor | None, int] | None:
    for real, names in common.items():
        if not (real == attention_name or real.startswith(attention_name + ".")):
            continue
        for name in names:
            if name.name == wanted:
                module = backbone.get_submodule(real)
                out = linear_features(module)[1]
                index = None
                if name.part is not None:
                    index = fused_output_index(
                        out, (name.part,), name.num_parts, module.weight.device, name.split, f"{real} ({name.name})"
                    )
                return module, index, out if index is None else int(index.numel())
    return None


def attention_parts(backbone: nn.Module, attention_name: str, method: str) -> AttentionParts:
    """The key and value projections of the self-attention block ``attention_name`` and the mapping's hints.

    Raises:
        UnsupportedTargetError: the block has no common name ending in ``attn``, or the mapping names no key or
            value projection inside it; the message names the model class and the module.
    """
    structure = structure_for_model(backbone)
    common = structure.common_names(backbone)
    attention = backbone.get_submodule(attention_name)
    own = [n.name for n in common.get(attention_name, []) if n.part is None]
    where = f"{type(attention).__name__} at {attention_name} of {type(backbone).__name__}"
    if not own or not own[0].endswith("attn"):
        raise UnsupportedTargetError(
            f"{method} places a prefix on self-attention blocks (common name ...attn); {where} is "
            f"{'named ' + repr(own[0]) if own else 'not in the ' + repr(structure.model_type) + ' common structure'}"
        )
    found = [_projection(backbone, common, f"{own[0]}.{part}", attention_name) for part in ("k", "v")]
    if found[0] is None or found[1] is None:
        raise UnsupportedTargetError(
            f"{method} cannot place a prefix on {where}: the {structure.model_type!r} common structure names no "
            f"{own[0]}.k / {own[0]}.v projection inside it"
        )
    (key, key_index, key_size), (value, value_index, value_size) = found
    bias = []
    for hint in structure.attention.get("relative_bias", []):
        try:
            bias.append((attention.get_submodule(hint["path"]), int(hint["key_axis"])))
        except AttributeError:
            continue  # only some blocks compute the bias (T5: the first of each stack)
    return AttentionParts(
        (key, key_index),
        (value, value_index),
        key_size,
        value_size,
        tuple(bias),
        tuple(structure.attention.get("relative_positions", [])),
    )


def place_prefix(delta_model: Any, target: Any, delta: nn.Module, parts: AttentionParts | None = None) -> Insertion:
    """The "prefix" placer for ``DeltaModel`` (see :func:`opendelta.insertion.register_placement`).

    ``parts``: the target's :func:`attention_parts`, when the delta model read them already (``PrefixModel`` does,
    in its ``_prepare``, to size its deltas); read here otherwise.
    """
    if parts is None:
        parts = attention_parts(delta_model.backbone_model, target.name, type(delta_model).__name__)
    backend = attention_backend(target.module)
    first_rows = backend == "rows" and not any(p.insertion.option.backend == "rows" for p in delta_model.placements())
    return insert_prefix(
        target.module,
        delta,
        delta_model.delta_name,
        key=parts.key,
        value=parts.value,
        relative_bias=parts.relative_bias,
        relative_positions=parts.relative_positions,
        backend=backend,
        root=delta_model.backbone_model if first_rows else None,
    )


register_placement("prefix", place_prefix)
