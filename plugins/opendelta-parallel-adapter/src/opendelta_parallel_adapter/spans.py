"""Addressing with spans: ``modified_modules`` entries that are a pattern *or* a ``[start, end]`` pair.

A parallel adapter reads a module's input and adds to a module's output. For an attention block one module holds
both ends; a feed-forward block has no such module on every architecture (BART and OPT keep ``fc1`` and ``fc2``
directly in the layer, next to the attention and the layer norms), so the adapter must *span* from the input of the
block's first linear layer to the output of its second. Each end is resolved with core's name-based addressing
(:func:`opendelta.targets.resolve_targets`), then every start is paired with the first end after it in module order
and before the next start; a start that does not pair up is an error, never a silent skip.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

from torch import nn

from opendelta.plugin_api import (
    AddressingError,
    ModuleNotFoundInStructureError,
    OpenDeltaAddressingWarning,
    Target,
    UnsupportedTargetError,
    compile_patterns,
    is_excluded,
    resolve_targets,
)

__all__ = ["Entry", "pair_span", "resolve_span_targets"]

Entry = str | Sequence[str]
"""One ``modified_modules`` entry: a pattern, or a ``[start, end]`` pair of patterns."""


def _find(model: nn.Module, pattern: str, common: bool | None, required: bool, method: str) -> list[Target]:
    """The modules one pattern designates (no exclusion yet); ``[]`` instead of an error when not ``required``."""
    try:
        return resolve_targets(model, [pattern], None, (), common, method)
    except ModuleNotFoundInStructureError:
        if required:
            raise
        return []


def pair_span(
    starts: Sequence[Target], ends: Sequence[Target], order: dict[int, int], span: Sequence[str], method: str
) -> list[Target]:
    """Pair each start with the first end at or after it in module order and before the next start.

    Ends that no start claims are left alone, so the end pattern may be broader than the start one
    (``["decoder.layers.1.fc1", "fc2"]``); a start without an end is an error.

    Args:
        starts: the modules the start pattern designates.
        ends: the modules the end pattern designates.
        order: ``id(module) -> position`` in ``model.named_modules()``.
        span: the ``[start, end]`` patterns, for messages.
        method: the delta model's class name, for messages.

    Returns:
        One target per start, its ``output`` the paired end (``None`` when the end is the start module itself).

    Raises:
        AddressingError: one side matched nothing, or a start has no end.
    """
    if not starts or not ends:
        side = span[0] if not starts else span[1]
        raise AddressingError(f"{method}: span {list(span)!r} does not pair up: {side!r} matched no module")
    starts = sorted(starts, key=lambda t: order[id(t.module)])
    ends = sorted(ends, key=lambda t: order[id(t.module)])
    paired: list[Target] = []
    for i, start in enumerate(starts):
        low = order[id(start.module)]
        high = order[id(starts[i + 1].module)] if i + 1 < len(starts) else math.inf
        end = next((e for e in ends if low <= order[id(e.module)] < high), None)
        if end is None:
            raise AddressingError(
                f"{method}: span {list(span)!r} does not pair up: {start.name} (matched by {span[0]!r}) has no "
                f"module matching {span[1]!r} after it and before the next {span[0]!r} module; in module order, "
                f"each start must be followed by its end"
            )
        if end.module is start.module:
            paired.append(start)
        else:  # the span reads only its start's input: the part of a fused start that was named is irrelevant
            paired.append(dataclasses.replace(start, output=end, parts=None, num_parts=None, split=None))
    return paired


def _describe(target: Target) -> str:
    return f"{target.name} -> {target.output.name}" if target.output is not None else target.name


def _check_one_adapter_per_end(targets: Sequence[Target], method: str) -> None:
    """Refuse two adapters reading the same module's input or adding to the same module's output.

    Core keeps one target per start module and names saved tensors after the end module, so a second adapter on
    either end would be silently dropped or would overwrite the first one's tensors in a checkpoint.
    """
    for role in ("input", "output"):
        owner: dict[int, Target] = {}
        for target in targets:
            end = target.module if role == "input" or target.output is None else target.output.module
            other = owner.setdefault(id(end), target)
            if other is not target:
                raise AddressingError(
                    f"{method}: two parallel adapters would use the {role} of the same module: "
                    f"{_describe(other)} and {_describe(target)}. One delta model puts at most one adapter on each "
                    f"module's input and output; use a second ParallelAdapterModel for the other one"
                )


def resolve_span_targets(
    model: nn.Module,
    entries: Sequence[Entry],
    exclude_modules: Sequence[str] | None,
    common_structure: bool | None,
    *,
    defaults: bool,
    method: str,
) -> list[Target]:
    """The adapters' targets for ``entries``, in module order; a spanning target's ``output`` is its end.

    Args:
        model: the backbone.
        entries: patterns and ``[start, end]`` pairs.
        exclude_modules: real-name patterns; an adapter is dropped when either of its ends is excluded.
        common_structure: whether the patterns are common names (``attn``, ``ff.w1``).
        defaults: ``entries`` are the method's defaults: an entry matching nothing at all is skipped (not every
            architecture has every default), as core does for defaults. The user's entries that match nothing
            while others match are named in an :class:`~opendelta.errors.OpenDeltaAddressingWarning` (a list written
            for several architectures); half a span matching is an error.
        method: the delta model's class name, for messages.

    Raises:
        ModuleNotFoundInStructureError: every entry matched nothing, one side of a user's span did, or exclusion
            removed everything.
        AddressingError: a span does not pair up, or two adapters would share an end.
        UnsupportedTargetError: a span ends on one slice of a fused module (GPT-2's ``c_attn`` as ``attn.q``).
    """
    if not entries:
        raise ModuleNotFoundInStructureError(f"{method} got an empty modified_modules list; name the modules to modify")
    order = {id(module): i for i, (_name, module) in enumerate(model.named_modules())}
    found: dict[tuple[int, int | None], Target] = {}
    unmatched: list[Entry] = []
    for entry in entries:
        if isinstance(entry, str):
            targets = _find(model, entry, common_structure, False, method)
        else:
            starts, ends = (_find(model, p, common_structure, False, method) for p in entry)
            if not defaults and bool(starts) != bool(ends):  # half a span: name the missing side as core does
                _find(model, entry[1] if starts else entry[0], common_structure, True, method)
            targets = pair_span(starts, ends, order, entry, method) if starts or ends else []
        if not targets:
            unmatched.append(entry)
        for target in targets:
            if target.output is not None and target.output.parts is not None:
                raise UnsupportedTargetError(
                    f"{method} cannot end a span on one slice of the fused {type(target.output.module).__name__} "
                    f"{target.output.name} (common name {target.output.common_name!r}); end it on a whole module"
                )
            key = (id(target.module), None if target.output is None else id(target.output.module))
            found.setdefault(key, target)
    if not found:
        raise ModuleNotFoundInStructureError(
            f"{method}: modified_modules={list(entries)!r} matched no module of {type(model).__name__}"
        )
    if unmatched and not defaults:  # a list written for several architectures: fine while one entry matches
        warnings.warn(
            f"{method}: modified_modules entries {unmatched!r} matched no module of {type(model).__name__}; the "
            f"others matched and are used; drop the unmatched ones if they are not meant for another architecture",
            OpenDeltaAddressingWarning,
            stacklevel=2,
        )
    exclude = compile_patterns(exclude_modules, argument="exclude_modules")
    kept = [
        t
        for t in found.values()
        if not is_excluded(t.name, exclude) and not (t.output is not None and is_excluded(t.output.name, exclude))
    ]
    if not kept:
        raise ModuleNotFoundInStructureError(
            f"{method}: modified_modules={list(entries)!r} matched {len(found)} place(s) of {type(model).__name__}, "
            f"but exclude_modules={list(exclude_modules or [])!r} excluded all of them"
        )
    kept.sort(key=lambda t: (order[id(t.module)], order[id(t.output.module if t.output else t.module)]))
    _check_one_adapter_per_end(kept, method)
    return kept
