"""Soft prompts on models that embed no tokens: learned rows in front of an encoder's first block.

An image or audio encoder (ViT, CLIP's towers, Whisper's encoder) has no module that turns token ids into
embeddings, so :mod:`opendelta.prompt`'s place, in front of the embedded tokens, does not exist. Its sequence is
made inside the model (patches plus a class token plus positions; a convolutional front end plus positions), and
the first place every such model hands it to a module is its first block. There, on each call, the prompt's ``P``
rows go in front of the block's hidden-state input (Visual Prompt Tuning's shallow variant, Jia et al. 2022,
https://arxiv.org/abs/2203.12119; after the positions, so the prompt has none of its own), and the masks the stack
passes each block cover them. CLIP's text tower comes here too (its forward takes no ``inputs_embeds``) and passes
causal and padding masks, built for the bare sequence: every token attends to every prompt row; the prompt rows,
which stand before the first token, attend to each other (causally under a causal mask) and to the tokens only where
the mask is not causal, never to padding. So a padded row computes what it computes alone, with or without a mask
materialised (transformers 5 passes none for an unpadded batch and lets the attention be causal itself).

* An encoder alone (ViT, CLIP's towers) cuts the ``P`` rows from its last block's output again, so the final norm,
  the pooling (ViT's and CLIP's on the class token at row 0, CLIP's text tower on its eos token, found from
  ``input_ids``) and the heads see the bare model's sequence.
* The encoder of an encoder-decoder (Whisper's) keeps them, as T5's and BART's prompted encoders do: the decoder
  cross-attends to the prompt, and its own cache and generation are untouched.

Model layer: the layer stacks come from :func:`opendelta.structure_inference.layer_stacks`, one definition for
mapped and unmapped models alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from opendelta.errors import DeltaStateError
from opendelta.insertion import SLOT_HANDLERS, Insertion, _insert, _Slot
from opendelta.sequence import bound_arguments, extend_arguments, strip_positions, unbind
from opendelta.shapes import linear_features, linear_types
from opendelta.structure_inference import layer_stacks
from opendelta.structures import base_model_of, find_config_model

__all__ = ["StackSite", "insert_stack_prompt", "sequence_width", "stack_sites"]

_STATE_ATTR = "_opendelta_stack_prompt_length"


@dataclass(frozen=True)
class StackSite:
    """Where a prompt enters one encoder layer stack, and where it leaves again."""

    name: str
    """The first block's name, relative to the backbone."""
    blocks: tuple[nn.Module, ...]
    keep: bool
    """Whether the encoder's output keeps the prompt rows (an encoder-decoder's encoder: the decoder reads them)."""

    @property
    def first(self) -> nn.Module:
        return self.blocks[0]


def sequence_width(block: nn.Module) -> int:
    """The width of the sequence a block reads: the input of its first linear layer (its attention's projections).

    Raises:
        DeltaStateError: the block has no linear layer.
    """
    first_linear = next((m for m in block.modules() if isinstance(m, linear_types())), None)
    if first_linear is None:
        raise DeltaStateError(f"{type(block).__name__} has no linear layer to tell the width of its input")
    return linear_features(first_linear)[0]


def stack_sites(backbone: nn.Module) -> list[StackSite]:
    """The encoder layer stacks of ``backbone`` a prompt can go in front of, outermost first.

    Those of the encoder for an encoder-decoder (its decoder reads tokens, and its cache), every layer stack of the
    base model otherwise (CLIP has two, one per tower). Empty when ``backbone`` holds no transformers model.
    """
    located = find_config_model(backbone)
    if located is None:
        return []
    _prefix, config_model = located
    base = base_model_of(config_model)
    encoder_decoder = bool(getattr(config_model.config, "is_encoder_decoder", False))
    top = base.get_encoder() if encoder_decoder and hasattr(base, "get_encoder") else base
    names = {id(module): name for name, module in backbone.named_modules()}
    return [StackSite(names[id(stack[0])], tuple(stack), keep=encoder_decoder) for _path, stack in layer_stacks(top)]


def _extend_square_masks(bound: Any, count: int, length: int) -> None:
    """Extend, in place, every mask of the call that is square in the sequence (see the module docstring)."""
    for name, value in list(bound.arguments.items()):
        if isinstance(value, dict):
            for key, item in value.items():
                if "mask" in key and _is_square(item, length):
                    value[key] = _prompted_mask(item, count, length)
        elif "mask" in name and _is_square(value, length):
            bound.arguments[name] = _prompted_mask(value, count, length)


def _is_square(value: Any, length: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 3 and value.shape[-2:] == (length, length)


def _prompted_mask(mask: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """A ``(..., length, length)`` mask grown to ``count`` leading prompt positions: boolean, integer or additive."""
    if mask.dtype == torch.bool:
        attend, block, blocked = True, False, ~mask
    elif mask.is_floating_point():
        attend, block, blocked = 0.0, torch.finfo(mask.dtype).min, mask < 0
    else:
        attend, block, blocked = 1, 0, mask == 0
    above = torch.ones(length, length, dtype=torch.bool, device=mask.device).triu(1)
    causal = bool(blocked[..., above].all())
    lead = mask.shape[:-2]
    among_prompt = mask.new_full((*lead, count, count), attend)
    if causal:
        later = torch.ones(count, count, dtype=torch.bool, device=mask.device).triu(1)
        among_prompt = among_prompt.masked_fill(later, block)
    prompt_to_tokens = (
        mask.new_full((*lead, count, length), block) if causal else mask[..., :1, :].expand(*lead, count, length)
    )
    tokens_to_prompt = mask.new_full((*lead, length, count), attend)
    return torch.cat([torch.cat([among_prompt, prompt_to_tokens], -1), torch.cat([tokens_to_prompt, mask], -1)], -2)


def _hidden_states(module: nn.Module, bound: Any) -> tuple[str, torch.Tensor]:
    """The name and value of a block call's hidden states: its first floating-point argument, 3-d."""
    name, hidden = next(
        ((n, v) for n, v in bound.arguments.items() if isinstance(v, torch.Tensor) and v.is_floating_point()),
        (None, None),
    )
    if name is None or hidden is None or hidden.dim() != 3:
        raise DeltaStateError(
            f"a soft prompt in front of {type(module).__name__} needs its hidden states (batch, positions, width) as "
            f"the first floating-point argument; got {None if hidden is None else tuple(hidden.shape)}"
        )
    return name, hidden


class _EntryHandler:
    """The "stack_prompt" slot on a stack's first block: the prompt goes in front of its hidden-state input."""

    def before(self, module: nn.Module, slot: _Slot, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        delta = module._modules[slot.attr]
        bound = bound_arguments(module, args, kwargs)
        name, hidden = _hidden_states(module, bound)
        count, length = delta.num_tokens, hidden.shape[-2]
        prompt = delta.prompt().to(hidden.dtype)
        bound.arguments[name] = torch.cat([prompt.expand(hidden.shape[0], *prompt.shape), hidden], dim=-2)
        _extend_square_masks(bound, count, length)
        extend_arguments(bound, name, count, length, where=type(module).__name__)
        delta.__dict__[_STATE_ATTR] = length  # for the later blocks' masks, and the last block's output
        return unbind(bound)

    def after(self, module: nn.Module, slot: _Slot, args: Any, kwargs: Any, output: Any) -> Any:
        return None


class _RowsHandler:
    """The "stack_prompt_rows" slot on each later block: the masks its stack passes it cover the prompt rows too.

    A stack hands every block the masks it made for the bare sequence (CLIP's text tower: its causal and padding
    masks), so each block's call is extended like the first's, when its hidden states carry the prompt.
    """

    def before(self, module: nn.Module, slot: _Slot, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        length, count = slot.ref.__dict__.get(_STATE_ATTR), slot.ref.num_tokens
        bound = bound_arguments(module, args, kwargs)
        name, hidden = _hidden_states(module, bound)
        if length is None or hidden.shape[-2] != length + count:
            return None
        _extend_square_masks(bound, count, length)
        extend_arguments(bound, name, count, length, where=type(module).__name__)
        return unbind(bound)

    def after(self, module: nn.Module, slot: _Slot, args: Any, kwargs: Any, output: Any) -> Any:
        return None


class _ExitHandler:
    """The "stack_prompt_exit" slot on a stack's last block: the prompt rows leave its output."""

    def before(self, module: nn.Module, slot: _Slot, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return None

    def after(self, module: nn.Module, slot: _Slot, args: Any, kwargs: Any, output: Any) -> Any:
        length = slot.ref.__dict__.pop(_STATE_ATTR, None)
        return None if length is None else strip_positions(output, slot.ref.num_tokens, length)


SLOT_HANDLERS.update(
    {"stack_prompt": _EntryHandler(), "stack_prompt_rows": _RowsHandler(), "stack_prompt_exit": _ExitHandler()}
)


def insert_stack_prompt(site: StackSite, delta_module: nn.Module, delta_name: str = "soft_prompt") -> Insertion:
    """Place a prompt (``num_tokens``, ``prompt() -> [P, width]``) in front of a layer stack (see :func:`stack_sites`).

    The prompt becomes a child of the stack's first block; every later block carries a slot that extends the masks
    of its call, and unless ``site.keep`` the last block one that takes the rows out of the stack's output.
    """
    satellites = tuple((block, "stack_prompt_rows", None) for block in site.blocks[1:])
    if not site.keep:
        satellites += ((site.blocks[-1], "stack_prompt_exit", None),)
    return _insert(site.first, delta_module, delta_name, "stack_prompt", False, satellites)
