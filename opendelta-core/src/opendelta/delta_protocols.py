"""The optional behaviours a delta module may declare, each one ``Protocol`` (core checks them with ``isinstance``).

Foundation layer: the mechanisms that use a behaviour (merging, parallel insertion, replacement, prefixes, prompts)
import it from here, and a plugin author reads in one place what each means. A delta module is any ``nn.Module``;
it implements none, some or all of these:

* :class:`Mergeable`: an additive change of the host's parameters, so ``merge()`` can fold it into the weights;
* :class:`FusedParallel`: a parallel delta that adds its output to the host's in one fused step (``add_to``);
* :class:`WrapsReplaced`: a replacement that keeps the module it replaced as a child (``wrapped_name``), so the
  backbone's own parameters keep their names inside it;
* :class:`PrefixSource`: keys and values placed in front of an attention's (the ``"prefix"`` insertion kind);
* :class:`PromptSource`: embeddings placed in front of a model's input (the ``"prompt"`` insertion kind);
* :class:`LowRankBranch`: a parallel delta that is, right now, exactly ``scale * x A^T B^T`` (LoRA), so core can run
  many of them as one batched product (per-row serving) and combine several (``combine_deltas``);
* :class:`LoadsLowRankFactors`: a low-rank branch whose factors core may overwrite (the combined ones);
* :class:`ParameterUpdate`: a change of one parameter of its host as the host's forward reads it (a low-rank update
  of a stack of expert weights), placed on a target whose ``parameter`` is set;
* :class:`HotLoadable`: a delta that says how another checkpoint's tensors and hyper-parameters go into it in
  place (``DeltaModel.load_weights``): which dimensions a smaller tensor is zero-padded along (a LoRA allocated at
  ``max_rank`` holding a lower rank), which buffers the checkpoint's config sets (its scaling).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = [
    "FusedParallel",
    "HotLoadable",
    "LoadPlan",
    "LoadsLowRankFactors",
    "LowRankBranch",
    "LowRankFactors",
    "Mergeable",
    "ParameterUpdate",
    "PrefixSource",
    "PromptSource",
    "WrapsReplaced",
    "class_implements",
    "wrapped_name",
]


@runtime_checkable
class Mergeable(Protocol):
    """A delta module that is an additive change of its host's parameters (LoRA's ``s B A``, BitFit's bias)."""

    def can_merge(self, host: nn.Module) -> bool:
        """Whether the host has parameters that can express this delta (T5's bias-less layer norm cannot)."""
        ...

    def merge_update(self, host: nn.Module) -> Mapping[str, torch.Tensor]:
        """What merging adds to each of the host's parameters, by name, shaped like them.

        A name the host lacks, or holds as ``None``, is created with this value and removed again on unmerge.
        """
        ...


@runtime_checkable
class FusedParallel(Protocol):
    """A parallel delta that computes ``hidden + delta(x)`` itself, in fewer steps (LoRA's ``addmm``)."""

    def add_to(self, hidden: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``hidden + self(x)``, exactly as the unfused sum would be (not in place: autograd needs ``hidden``)."""
        ...


class LowRankFactors(NamedTuple):
    """A low-rank branch's factors: it adds ``scale * x @ down.T @ up.T`` to the ``out_index`` output features."""

    down: torch.Tensor
    """``[r, in_features]`` (LoRA's ``A``); the tensor itself (a parameter), so autograd reaches it."""
    up: torch.Tensor
    """``[rows, r]`` (LoRA's ``B``), unscaled; ``rows`` is the output size, or ``len(out_index)``."""
    scale: float | torch.Tensor
    """The branch's multiplier (LoRA's ``alpha / r``); a 0-d tensor where hot-loading changes it in place (LoRA's
    ``max_rank``)."""
    out_index: torch.Tensor | None = None
    """The output features ``up``'s rows write to (a slice of a fused projection); ``None``: all of them."""


@runtime_checkable
class LowRankBranch(Protocol):
    """A parallel delta whose output may be exactly a scaled low-rank product of its input (LoRA).

    Core uses it to run many such deltas of one module as one batched product (per-row serving: each row gathers its
    own factors) and to combine several into one (``combine_deltas``). Nothing else about the delta changes.
    """

    def low_rank_factors(self) -> LowRankFactors | None:
        """The factors when ``self(x)`` equals ``scale * x @ down.T @ up.T`` (on ``out_index``) now, else ``None``.

        ``None`` whenever anything else takes part in the output at this moment: dropout in training mode, a
        residual base (PiSSA), a weight-norm rescaling (DoRA). Core then calls the delta as usual.
        """
        ...


@runtime_checkable
class LoadsLowRankFactors(Protocol):
    """A low-rank branch whose factors core may overwrite in place: ``combine_deltas`` writes the combined ones.

    The branch keeps its own scale; the combined factors are computed for it (from the rank and alpha the method's
    ``low_rank_fields`` name), so the method needs no knowledge of how they were combined.
    """

    def load_low_rank_factors(self, down: torch.Tensor, up: torch.Tensor) -> None:
        """Copy ``down`` (``[r, in_features]``) and ``up`` (``[rows, r]``) into the factors; refuse other shapes."""
        ...


@runtime_checkable
class WrapsReplaced(Protocol):
    """A replacement delta holding the module it replaced as its child ``wrapped_name``."""

    wrapped_name: str


def wrapped_name(delta: nn.Module) -> str | None:
    """The child name under which a replacement delta holds the module it replaced, or ``None``."""
    return delta.wrapped_name if isinstance(delta, WrapsReplaced) else None


@runtime_checkable
class PrefixSource(Protocol):
    """What a prefix delta module provides."""

    num_tokens: int

    def key_value(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``([P, key size], [P, value size])`` in the projections' output space."""
        ...


@runtime_checkable
class PromptSource(Protocol):
    """What a soft-prompt delta module provides."""

    num_tokens: int

    def prompt(self) -> torch.Tensor:
        """``[P, hidden]`` embeddings, placed in front of the input's."""
        ...


@runtime_checkable
class ParameterUpdate(Protocol):
    """A delta that changes one parameter of its host for the host's forward, leaving the stored parameter alone.

    For weights no submodule computes with alone: transformers 5's experts index a 3-D parameter per expert inside
    their own forward, so a delta can only act by changing what that forward reads (see
    :mod:`opendelta.parameter_insertion`).
    """

    def updated(self, weight: torch.Tensor) -> torch.Tensor:
        """The parameter as the host's forward should see it, computed from the stored ``weight``.

        Autograd flows through it to the delta's own parameters; the stored ``weight`` is never written.
        """
        ...


_IMPLEMENTS: dict[tuple[type, type], bool] = {}


def class_implements(obj: Any, protocol: type) -> bool:
    """``isinstance(obj, protocol)`` for a protocol of methods, answered once per class (it runs in forward hooks).

    A runtime-checkable ``Protocol``'s ``isinstance`` looks every member up on each call (microseconds, per delta
    and per forward); methods are the class's, so the answer is the class's too.
    """
    key = (type(obj), protocol)
    found = _IMPLEMENTS.get(key)
    if found is None:
        found = _IMPLEMENTS[key] = isinstance(obj, protocol)
    return found


class LoadPlan(NamedTuple):
    """How one delta module takes another checkpoint's values in place (see :class:`HotLoadable`).

    Every field is what core may do beyond its generic rule (same tensor names, same shapes, same hyper-parameters).
    """

    padded: Mapping[str, tuple[int, ...]] = {}
    """Per tensor of the module's ``state_dict`` (its local name), the dimensions along which a checkpoint's tensor
    may be smaller: it is copied into the leading part and the rest is set to zero (a rank-4 ``A`` into a LoRA
    allocated at rank 16). Every other dimension must match."""
    values: Mapping[str, torch.Tensor] = {}
    """Buffers of the module (local names) set from the checkpoint's config, copied in place like the tensors
    (LoRA's ``scaling``: a tensor, so a compiled model reads it instead of guarding on a Python float)."""
    taken: tuple[str, ...] = ()
    """Config fields the checkpoint may set differently: they describe the values loaded (``lora_r``,
    ``lora_alpha``), so the delta model's config takes the checkpoint's after the load."""
    kept: tuple[str, ...] = ()
    """Config fields that may differ and stay the delta model's own: they describe the allocation (``max_rank``)
    or training only (dropout), not the loaded values."""


@runtime_checkable
class HotLoadable(Protocol):
    """A delta module that loads a checkpoint other than by the generic rule (``DeltaModel.load_weights``).

    Without it, a checkpoint loads in place when it has this module's tensor names and shapes and the delta model's
    hyper-parameters. Core does the checking, the padding and the copy; the module only describes them.
    """

    def load_plan(self, config: Any) -> LoadPlan:
        """How a checkpoint whose config is ``config`` (the method's ``DeltaConfig``) loads into this module.

        Raises:
            OpenDeltaError: (a subclass, naming the field and the fix) when that checkpoint cannot fit at all, such
                as a LoRA rank above the ``max_rank`` allocated.
        """
        ...
