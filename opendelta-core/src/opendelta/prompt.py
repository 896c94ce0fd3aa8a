"""Soft prompts' one mechanism: learned input embeddings in front of the sequence, on any architecture.

A prompt delta is an ``nn.Module`` with ``num_tokens`` (``P``) and ``prompt()`` returning ``[P, hidden]`` in the
space of the model's input embeddings. Core places it on the model's *input stack*: the base model of an encoder or
a decoder-only model (``BertModel``, ``GPT2Model``...), the encoder of an encoder-decoder (``T5Stack``,
``BartEncoder``). There, on each call:

* the token ids become embeddings through the stack's own input embeddings (so wrapped models and task heads, which
  may lack ``get_input_embeddings`` at the top, work) and the prompt is put in front;
* ``attention_mask`` and ``token_type_ids`` gain ``P`` leading entries (``other_expand_ids``; new tensors, the
  caller's are never modified), positions move up by ``P``;
* the base model's output loses the ``P`` prompt rows again, so task heads (pooling on the last real token,
  token classification, LM logits and their labels) see the bare model's shapes. An encoder-decoder keeps them in
  the encoder's output, which the decoder attends to; the mask its cross-attention uses is extended to match.

With a key/value cache, the prompt enters the cache with the first step of ``generate()``; later steps leave it
there and move positions and masks by ``P`` (:func:`opendelta.sequence.align_with_cache`).

A model that embeds no tokens (ViT, CLIP, Whisper's encoder) gets its prompt in front of each encoder layer stack's
first block instead (:mod:`opendelta.stack_prompt`); :func:`prompt_sites` says which place a model has.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from opendelta.delta_protocols import PromptSource
from opendelta.errors import DeltaConfigError, DeltaStateError, UnsupportedTargetError
from opendelta.insertion import SLOT_HANDLERS, Insertion, _insert, _Slot, register_placement
from opendelta.sequence import align_with_cache, bound_arguments, extend_arguments, find_cache, strip_positions, unbind
from opendelta.shapes import factory_kwargs
from opendelta.stack_prompt import StackSite, insert_stack_prompt, sequence_width, stack_sites
from opendelta.structures import base_model_of, find_config_model

__all__ = [
    "PromptPlacement",
    "check_prompt_length",
    "input_stack",
    "insert_soft_prompt",
    "place_soft_prompt",
    "prompt_embeddings",
    "prompt_sites",
]

_STATE_ATTR = "_opendelta_prompt_length"


@dataclass(frozen=True)
class PromptPlacement:
    """How a prompt is placed on an input stack."""

    expand: Mapping[str, float] = field(default_factory=lambda: {"attention_mask": 1, "token_type_ids": 0})
    """Arguments that grow with the sequence, and the value of their prompt entries."""
    strip: bool = True
    """Cut the prompt rows from the stack's output (not for an encoder-decoder's encoder)."""
    max_positions: int | None = None
    """The stack's learned-position limit, to refuse too long a sequence with a clear message."""


def input_stack(backbone: nn.Module) -> tuple[str, nn.Module, str | None]:
    """``(name, module, outer name)`` of the module that embeds the tokens, relative to ``backbone``.

    ``outer`` is the encoder-decoder model that hands the encoder's mask to the decoder (``None`` otherwise).

    Raises:
        UnsupportedTargetError: no transformers model inside ``backbone``, or its input stack has no input
            embeddings; the message names the model class.
    """
    located = find_config_model(backbone)
    if located is None:
        raise UnsupportedTargetError(
            f"a soft prompt needs a transformers model inside {type(backbone).__name__} (a module with a config)"
        )
    _prefix, config_model = located
    base = base_model_of(config_model)
    encoder_decoder = bool(getattr(config_model.config, "is_encoder_decoder", False))
    top = base.get_encoder() if encoder_decoder and hasattr(base, "get_encoder") else base
    stacks = [m for m in top.modules() if _embeds_tokens(m)]  # outermost first: the last is the innermost
    if not stacks:
        raise UnsupportedTargetError(
            f"a soft prompt needs a module in {type(backbone).__name__} that embeds tokens (a forward taking "
            f"input_ids, inputs_embeds and attention_mask, with get_input_embeddings); {type(top).__name__} has none"
        )
    names = {id(module): name for name, module in backbone.named_modules()}
    return names[id(stacks[-1])], stacks[-1], names[id(base)] if encoder_decoder else None


def prompt_sites(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every place a soft prompt goes by default, relative to ``backbone``.

    The module that embeds the tokens (:func:`input_stack`) when there is one; else, for a model that reads images
    or audio, the first block of each of its encoder layer stacks (:func:`opendelta.stack_prompt.stack_sites`: one
    for ViT and Whisper, one per tower for CLIP).

    Raises:
        UnsupportedTargetError: neither exists; the message names the model class.
    """
    try:
        name, stack, _outer = input_stack(backbone)
    except UnsupportedTargetError as exc:
        sites = stack_sites(backbone)
        if not sites:
            raise UnsupportedTargetError(f"{exc}, nor an encoder layer stack to put the prompt in front of") from exc
        return [(site.name, site.first) for site in sites]
    return [(name, stack)]


def prompt_embeddings(site: nn.Module) -> torch.Tensor:
    """The ``[vocabulary, width]`` matrix a prompt at ``site`` (from :func:`prompt_sites`) lives in and may start from.

    A stack that embeds tokens gives its input embeddings; a block (a model without tokens) a matrix of no rows, as
    wide as the sequence the block reads, on its device and in its dtype, so a prompt meant to start from token
    embeddings starts at random there.
    """
    if _has_vocabulary(site):
        return site.get_input_embeddings().weight
    return torch.empty(0, sequence_width(site), **factory_kwargs(site))


def _has_vocabulary(module: nn.Module) -> bool:
    return callable(getattr(module, "get_input_embeddings", None))


def _stack_site(first_block: nn.Module, backbone: nn.Module) -> StackSite:
    """The encoder layer stack of ``backbone`` that ``first_block`` starts."""
    found = next((site for site in stack_sites(backbone) if site.first is first_block), None)
    if found is None:
        raise UnsupportedTargetError(
            f"{type(first_block).__name__} neither embeds tokens (get_input_embeddings) nor starts an encoder layer "
            f"stack of {type(backbone).__name__}, so a soft prompt has no place there"
        )
    return found


def _embeds_tokens(module: nn.Module) -> bool:
    """Whether ``module`` is a stack a prompt can go in front of: it embeds ids itself and takes a mask.

    The innermost such module is chosen, because some task heads call it directly (``OPTForCausalLM`` runs
    ``model.decoder``, not ``model``).
    """
    if not callable(getattr(module, "get_input_embeddings", None)):
        return False
    try:
        parameters = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False
    if not {"input_ids", "inputs_embeds", "attention_mask"} <= set(parameters):
        return False
    try:
        return module.get_input_embeddings() is not None
    except NotImplementedError:
        return False


def _max_positions(stack: nn.Module) -> int | None:
    config = getattr(stack, "config", None)
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return None
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) else None


def check_prompt_length(stack: nn.Module, num_tokens: int, setting: str) -> None:
    """Refuse, before the prompt is allocated, one that leaves a learned-position model no room for any input token.

    Without it, ``soft_token_num=10**6`` on BERT (512 positions) builds a prompt of a million rows and fails only at
    the first forward pass. Models with relative or rotary positions (T5, LLaMA) have no such limit.

    Raises:
        DeltaConfigError: naming ``setting``, the limit and the largest value that leaves room for input.
    """
    limit = _max_positions(stack)
    if limit is not None and num_tokens >= limit:
        raise DeltaConfigError(
            f"{setting}={num_tokens} leaves no position for the input: {type(stack).__name__} has {limit} learned "
            f"positions, shared by the prompt and the input tokens; use {setting} < {limit} (a few dozen is usual)"
        )


class _PromptHandler:
    """The "soft_prompt" slot on the input stack."""

    def before(self, module: nn.Module, slot: _Slot, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        delta = module._modules[slot.attr]
        placement: PromptPlacement = slot.option
        count = delta.num_tokens
        bound = bound_arguments(module, args, kwargs)
        cache_ = find_cache(bound)
        if cache_ is not None and cache_.get_seq_length() > 0:  # the prompt entered the cache with the first step
            return unbind(bound) if align_with_cache(bound, count, tuple(placement.expand)) else None
        arguments = bound.arguments
        embeds = arguments.get("inputs_embeds")
        if embeds is None:
            ids = arguments.get("input_ids")
            if ids is None:
                raise DeltaStateError(f"{type(module).__name__} was called with neither input_ids nor inputs_embeds")
            embeds = module.get_input_embeddings()(ids)
            arguments["input_ids"] = None
        length = embeds.shape[-2]
        if placement.max_positions is not None and count + length > placement.max_positions:
            raise DeltaStateError(
                f"{count} prompt tokens + {length} input tokens exceed the {placement.max_positions} positions of "
                f"{type(module).__name__}; shorten the input or use fewer soft_token_num"
            )
        prompt = delta.prompt().to(embeds.dtype)  # (P, hidden)
        arguments["inputs_embeds"] = torch.cat([prompt.expand(*embeds.shape[:-2], *prompt.shape), embeds], dim=-2)
        for name, value in placement.expand.items():
            tensor = arguments.get(name)
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tensor.shape[-1] == length:
                arguments[name] = torch.cat([tensor.new_full((tensor.shape[0], count), value), tensor], dim=-1)
        extend_arguments(bound, "inputs_embeds", count, length, where=type(module).__name__)
        delta.__dict__[_STATE_ATTR] = length
        return unbind(bound)

    def after(self, module: nn.Module, slot: _Slot, args: Any, kwargs: Any, output: Any) -> Any:
        delta = module._modules[slot.attr]
        length = delta.__dict__.pop(_STATE_ATTR, None)
        if length is None or not slot.option.strip:
            return None
        return strip_positions(output, delta.num_tokens, length)


class _OuterHandler:
    """The "soft_prompt_outer" slot on an encoder-decoder: the decoder's cross-attention mask covers the prompt."""

    def before(self, module: nn.Module, slot: _Slot, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        count = slot.ref.num_tokens
        bound = bound_arguments(module, args, kwargs)
        arguments = bound.arguments
        mask = arguments.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return None
        encoded = arguments.get("encoder_outputs")
        if encoded is not None:
            hidden = encoded[0] if isinstance(encoded, (tuple, list)) else encoded.last_hidden_state
            if hidden.shape[-2] != mask.shape[-1] + count:
                return None
        elif arguments.get("input_ids") is None and arguments.get("inputs_embeds") is None:
            return None
        arguments["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], count), mask], dim=-1)
        return unbind(bound)

    def after(self, module: nn.Module, slot: _Slot, args: Any, kwargs: Any, output: Any) -> Any:
        return None


SLOT_HANDLERS.update({"soft_prompt": _PromptHandler(), "soft_prompt_outer": _OuterHandler()})


def insert_soft_prompt(
    stack: nn.Module,
    delta_module: nn.Module,
    delta_name: str = "soft_prompt",
    *,
    outer: nn.Module | None = None,
    expand: Mapping[str, float] | None = None,
) -> Insertion:
    """Place a prompt (``num_tokens``, ``prompt() -> [P, hidden]``) on an input stack (see :func:`input_stack`).

    Args:
        stack: the module that embeds the tokens.
        delta_module: the prompt; it becomes a child of ``stack``.
        delta_name: its child name.
        outer: the encoder-decoder model around ``stack`` (its cross-attention mask is extended), else ``None``.
        expand: arguments of ``stack`` that grow with the prompt, with the prompt entries' value
            (default ``{"attention_mask": 1, "token_type_ids": 0}``).
    """
    if not isinstance(delta_module, PromptSource):
        raise TypeError(
            f"a soft prompt must provide num_tokens and prompt() (opendelta.delta_protocols.PromptSource); "
            f"{type(delta_module).__name__} does not"
        )
    placement = PromptPlacement(
        dict(expand) if expand is not None else PromptPlacement().expand,
        strip=outer is None,
        max_positions=_max_positions(stack),
    )
    satellites = ((outer, "soft_prompt_outer", None),) if outer is not None else ()
    return _insert(stack, delta_module, delta_name, "soft_prompt", False, satellites, placement)


def place_soft_prompt(
    delta_model: Any, target: Any, delta: nn.Module, expand: Mapping[str, float] | None = None
) -> Insertion:
    """The "prompt" placer for ``DeltaModel`` (see :func:`opendelta.insertion.register_placement`)."""
    if not _has_vocabulary(target.module):  # a model that reads images or audio: in front of an encoder's blocks
        return insert_stack_prompt(
            _stack_site(target.module, delta_model.backbone_model), delta, delta_model.delta_name
        )
    _name, _stack, outer = input_stack(delta_model.backbone_model)
    outer_module = delta_model.backbone_model.get_submodule(outer) if outer is not None else None
    return insert_soft_prompt(target.module, delta, delta_model.delta_name, outer=outer_module, expand=expand)


register_placement("prompt", place_soft_prompt)
