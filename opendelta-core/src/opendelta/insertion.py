"""The three insertion primitives: sequential (before/after a module), parallel (beside it), and replacement.

None of them edits the backbone's source, class or ``forward``: a delta becomes a registered child of the module it
modifies (so ``parameters()``, ``state_dict()``, ``.to()``, ``deepcopy`` and ``pickle`` all carry it), and one pair of
PyTorch forward hooks per modified module dispatches to the deltas listed in the module's ``_opendelta_slots``. The
hooks are small picklable objects that look deltas up by attribute name at call time, so a deep copy or a
``DataParallel`` replica runs its *own* deltas, and detaching is removing a child and a slot: no tensor is copied.

A detached delta is outside the backbone, so ``backbone.to(...)``, ``.half()`` or ``.cuda()`` do not reach it;
:meth:`Insertion.attach` applies to it the move its module made meanwhile (device, floating-point dtype), as
``.to()`` would have done had it been attached, so re-attaching after a move runs instead of failing in a matmul.

Order of insertion (manual, "Order of Insertion"): deltas inserted *after* a module run in the order they were
added; deltas inserted *before* it run last-added first; a parallel delta adds ``delta(x)`` to the output at its
place in that order, where ``x`` is the input the module itself receives.

A parallel delta may also *span* two modules (the parallel adapter around a feed-forward block: from the input of
its first linear layer to the output of its second): the first module gets a "capture" slot that hands its input
to the delta, which lives on, and adds to the output of, the second.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from opendelta import dynamo_guard
from opendelta.concurrency import forward_sees_deltas
from opendelta.errors import DeltaStateError
from opendelta.markers import (  # re-exported: these names were insertion's before the layers were split
    CAPTURED_ATTR,
    DELTA_MARK,
    HANDLES_ATTR,
    SLOTS_ATTR,
    bare_parameter_names,
    delta_parameter_names,
    iter_delta_modules,
    mark_delta,
)
from opendelta.merging import is_mergeable, merged_after
from opendelta.module_io import main_input, main_output, with_input, with_output
from opendelta.routing import current_routing
from opendelta.row_groups import Step, add_parallel, run_routed

__all__ = [
    "CAPTURED_ATTR",
    "DELTA_MARK",
    "HANDLES_ATTR",
    "SLOTS_ATTR",
    "Insertion",
    "bare_parameter_names",
    "delta_parameter_names",
    "insert_parallel_module",
    "insert_sequential_module",
    "iter_delta_modules",
    "main_input",
    "main_output",
    "replace_module",
]

Kind = str
""""before", "after", "parallel", "replace", or a kind with a registered :class:`SlotHandler` ("prefix")."""
EXCLUSIVE_KINDS: set[str] = {"prefix"}
"""Slot kinds a module carries at most one of: a prefix's handler keeps one active prefix per attention call. Their
placers refuse a second one; :meth:`Insertion.attach` refuses re-attaching one where another took its place."""

_sequence = itertools.count()


dynamo_guard.install()  # torch.compile checks module hooks, so it sees attach/detach (see opendelta.dynamo_guard)


@dataclass(frozen=True)
class _Slot:
    seq: int
    kind: str
    """"before", "after", "parallel", "capture", or a kind handled by a registered :class:`SlotHandler`."""
    attr: str
    ref: nn.Module | None = None
    """The delta a satellite slot serves (it lives on another module); for a "parallel" slot, set when a "capture"
    slot elsewhere feeds it its input."""
    option: Any = None
    """Whatever a registered handler needs to know about this placement."""


class SlotHandler(Protocol):
    """Behaviour for a slot kind core does not know (prefix tuning registers "prefix" and its satellites).

    ``before`` runs in the module's forward pre-hook, before the "before" deltas, and may return new
    ``(args, kwargs)``; ``after`` runs in its forward hook after the "after"/"parallel" deltas and may return a new
    output. Either returns ``None`` to change nothing. A handler may also have ``released(module, option)``, called
    when a delta of its kind is detached from ``module``, to take away what its hooks may have left there.
    """

    def before(self, module: nn.Module, slot: _Slot, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any: ...

    def after(
        self, module: nn.Module, slot: _Slot, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any: ...


SLOT_HANDLERS: dict[str, SlotHandler] = {}
"""Handlers by slot kind; registered at import by the core module that defines the kind."""

PLACERS: dict[str, Callable[..., Insertion]] = {}
"""How ``DeltaModel`` places a delta of an ``insertion`` kind beyond the primitives here ("prefix", "prompt"):
``placer(delta_model, target, delta, **delta_model.placement_options(target)) -> Insertion``."""

_CORE_KINDS = frozenset({"before", "after", "parallel", "capture"})

PRIMITIVE_PLACEMENTS = ("after", "before", "parallel", "replace")
"""The ``insertion`` kinds ``DeltaModel`` places with the primitives of this module."""


def placement_kinds() -> tuple[str, ...]:
    """Every ``insertion`` a ``DeltaModel`` may declare: the primitives', then each registered placer's kind."""
    return (*PRIMITIVE_PLACEMENTS, *sorted(PLACERS))


def register_placement(kind: str, placer: Callable[..., Insertion]) -> None:
    """Add an ``insertion`` kind, placed by ``placer``; register it before defining a class that declares it.

    ``placer(delta_model, target, delta, **delta_model.placement_options(target))`` returns the :class:`Insertion`
    it made.

    Raises:
        ValueError: ``kind`` is a primitive's, or another placer's already.
    """
    if kind in PRIMITIVE_PLACEMENTS or (kind in PLACERS and PLACERS[kind] is not placer):
        raise ValueError(f"insertion kind {kind!r} is already taken; choose another name")
    PLACERS[kind] = placer


_UNGATED: Any = object()
"""What a hook receives in place of its last argument when torch calls it as a plain hook.

``register_forward_pre_hook(..., with_kwargs=True)`` stores the hook, then its with_kwargs flag: a forward that is
running through the module in another thread at that moment (one that began on a bare backbone, so no switching gate
holds it back: see :mod:`opendelta.concurrency`) can find the hook without the flag and call it without ``kwargs``.
That forward began without the delta and must finish without it, so the hook does nothing."""


class _BeforeHook:
    """Forward pre-hook: runs handler slots, then the "before" deltas (last added first), then captures.

    A spanning parallel delta thus sees the input the module itself receives, like a plain parallel delta does.
    """

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] = _UNGATED) -> Any:
        if kwargs is _UNGATED:  # torch saw the hook before its with_kwargs flag: see _UNGATED
            return None
        live = _live_slots(module)
        changed = False
        for slot, _delta in live:
            if slot.kind not in _CORE_KINDS:
                call = SLOT_HANDLERS[slot.kind].before(module, slot, args, kwargs)
                if call is not None:
                    (args, kwargs), changed = call, True
        befores = [delta for slot, delta in reversed(live) if slot.kind == "before"]
        captures = [delta for slot, delta in live if slot.kind == "capture"]
        if befores or captures:
            where, hidden = main_input(module, args, kwargs)
            routing = current_routing()
            if routing is None:
                for delta in befores:
                    hidden = delta(hidden)
            elif befores:
                hidden = run_routed([("sequential", delta, None) for delta in befores], hidden, routing)
            for delta in captures:
                setattr(delta, CAPTURED_ATTR, hidden)
            if befores:
                args, kwargs = with_input(args, kwargs, where, hidden)
                changed = True
        return (args, kwargs) if changed else None


class _AfterHook:
    """Forward hook: runs the "after" and "parallel" deltas, in the order added, then handler slots."""

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: Any, output: Any = _UNGATED) -> Any:
        if output is _UNGATED:  # torch saw the hook before its with_kwargs flag: see _UNGATED
            return None
        live = _live_slots(module)
        slots = [(slot, delta) for slot, delta in live if slot.kind in ("after", "parallel")]
        changed = False
        if slots:
            hidden = main_output(module, output)
            x = None
            steps: list[Step] = []
            for slot, delta in slots:
                if slot.kind == "after":
                    steps.append(("sequential", delta, None))
                elif slot.ref is not None:
                    steps.append(("parallel", delta, _take_captured(delta, module)))
                else:
                    if x is None:
                        x = main_input(module, args, kwargs)[1]
                    steps.append(("parallel", delta, x))
            routing = current_routing()
            if routing is None:
                for _kind, delta, source in steps:
                    hidden = delta(hidden) if source is None else add_parallel(delta, hidden, source)
            else:
                hidden = run_routed(steps, hidden, routing)
            output, changed = with_output(output, hidden), True
        for slot, _delta in live:
            if slot.kind not in _CORE_KINDS:
                new = SLOT_HANDLERS[slot.kind].after(module, slot, args, kwargs, output)
                if new is not None:
                    output, changed = new, True
        return output if changed else None


def _live_slots(module: nn.Module) -> list[tuple[_Slot, nn.Module]]:
    """The slots a hook acts on now, each with its delta, read once; none for a forward that must see no delta.

    Another thread may detach a delta while this forward runs outside the switching gate (a module called on its
    own): its slot may still be listed after its child is gone (a hook reads the list once; lists are replaced, never
    changed in place), and is skipped rather than failing with ``KeyError``. A forward that began before the
    backbone carried deltas sees none (see :func:`opendelta.concurrency.forward_sees_deltas`).
    """
    slots: list[_Slot] = getattr(module, SLOTS_ATTR, None) or []
    if not slots or not forward_sees_deltas():
        return []
    children = module._modules
    live = [(s, s.ref if s.ref is not None else children.get(s.attr)) for s in slots]
    return [(s, delta) for s, delta in live if delta is not None]


def _take_captured(delta: nn.Module, module: nn.Module) -> torch.Tensor:
    captured = delta.__dict__.pop(CAPTURED_ATTR, None)
    if captured is None:
        raise DeltaStateError(
            f"the spanning parallel delta on {type(module).__name__} got no input: the module that feeds it did not "
            f"run before {type(module).__name__} in this forward pass"
        )
    return captured


def _free_name(module: nn.Module, base: str) -> str:
    name, suffix = base, 0
    while name in module._modules or hasattr(module, name):
        suffix += 1
        name = f"{base}_{suffix}"
    return name


def _backbone_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """The parameters and buffers of ``module`` and of its submodules, deltas (of any delta model) left out."""
    yield from (t for t in module._parameters.values() if t is not None)
    yield from (t for t in module._buffers.values() if t is not None)
    for child in module._modules.values():
        if child is not None and not getattr(child, DELTA_MARK, False):
            yield from _backbone_tensors(child)


def _placement(module: nn.Module) -> tuple[torch.device, torch.dtype] | None:
    """Device and dtype of the first floating-point tensor of ``module`` outside deltas (``None``: it has none)."""
    for tensor in _backbone_tensors(module):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return None


@dataclass(eq=False)
class Insertion:
    """One delta placed on one backbone module; :meth:`detach` and :meth:`attach` toggle it without copying."""

    host: nn.Module
    """The modified module (for "replace": the parent whose child is swapped)."""
    attr: str
    """The child name the delta lives under while attached."""
    kind: Kind
    delta: nn.Module
    original: nn.Module | None = None
    """For "replace": the module the delta stands in for."""
    seq: int = field(default_factory=lambda: next(_sequence))
    attached: bool = False
    base_name: str = ""
    """The name asked for (``lora``); ``attr`` may carry a suffix (``lora_1``) when that was taken."""
    satellites: tuple[tuple[nn.Module, str, Any], ...] = ()
    """Slots on other modules that serve this delta, as ``(module, kind, option)``: the "capture" slot that feeds a
    spanning parallel delta the input of another module, or a prefix's key/value projections."""
    option: Any = None
    """The option of the host's own slot (what a handler needs to know)."""
    placement: tuple[torch.device, torch.dtype] | None = None
    """Device and dtype of the modified module when the delta was detached (see :meth:`attach`)."""
    merge_record: Any = None
    """While merged into the host's weights: what :meth:`DeltaModel.unmerge` needs to take exactly that out again
    (an :class:`opendelta.merging.MergeRecord`). Kept here, not by ``id``, so it survives ``deepcopy`` and pickle."""

    def __post_init__(self) -> None:
        self.base_name = self.base_name or self.attr

    def attach(self) -> None:
        """Put the delta back in place (a new child name is chosen if another delta took the old one).

        If the module was moved to another device or floating-point dtype while the delta was out (``.to()``,
        ``.half()``), the delta is moved likewise first: it runs as if it had been attached during the move. A delta
        deliberately kept in another dtype than its module (fp32 beside bf16 weights) keeps it when nothing moved.

        Raises:
            DeltaStateError: it is attached; or putting it back would change what other deltas compute (the
                module it replaced was replaced again, or carries another delta of an exclusive kind, or a delta
                merged into the weights would then run before it); nothing changes then.
        """
        if self.attached:
            raise DeltaStateError(f"delta {self.attr!r} on {type(self.host).__name__} is already attached")
        self._check_attachable()
        self._follow_move()
        if self.kind == "replace":
            self.delta.train(self.original.training if self.original is not None else self.host.training)
            self.host._modules[self.attr] = self.delta
            self.attached = True
            return
        if self.attr in self.host._modules or hasattr(self.host, self.attr):
            self.attr = _free_name(self.host, self.base_name)
        self.delta.train(self.host.training)  # a new module starts in training mode; follow the backbone's
        self.host.add_module(self.attr, self.delta)
        for module, kind, option in self.satellites:
            _add_slot(module, _Slot(self.seq, kind, self.attr, ref=self.delta, option=option))
        spanning = any(kind == "capture" for _m, kind, _o in self.satellites)
        _add_slot(
            self.host, _Slot(self.seq, self.kind, self.attr, ref=self.delta if spanning else None, option=self.option)
        )
        self.attached = True

    def detach(self) -> None:
        """Take the delta out: the module's children, parameters and outputs are as if it was never added."""
        if not self.attached:
            raise DeltaStateError(f"delta {self.attr!r} on {type(self.host).__name__} is already detached")
        if self.kind == "replace":
            if self.host._modules.get(self.attr) is not self.delta:
                raise DeltaStateError(
                    f"cannot detach the replacement of {self.attr!r} on {type(self.host).__name__}: another module "
                    f"({type(self.host._modules.get(self.attr)).__name__}) replaced it since; detach that one first"
                )
            self.placement = _placement(self.original) if self.original is not None else None
            self.host._modules[self.attr] = self.original
            self.attached = False
            return
        del self.host._modules[self.attr]
        self.placement = _placement(self.host)
        _remove_slot(self.host, lambda s: s.seq == self.seq)
        release = getattr(SLOT_HANDLERS.get(self.kind), "released", None)
        if release is not None:
            release(self.host, self.option)
        for module in {id(m): m for m, _kind, _option in self.satellites}.values():  # one module may hold two
            _remove_slot(module, lambda s: s.seq == self.seq)
        self.delta.__dict__.pop(CAPTURED_ATTR, None)
        self.attached = False

    def _check_attachable(self) -> None:
        """Refuse, before anything changes, an attach that would silently change what the module computes."""
        where = type(self.host).__name__
        if self.kind == "replace":
            if self.host._modules.get(self.attr) is not self.original:
                raise DeltaStateError(
                    f"cannot re-attach the replacement of {self.attr!r} on {where}: the module there "
                    f"({type(self.host._modules.get(self.attr)).__name__}) is not the one it replaced; another "
                    f"replacement took its place: detach that one first, or attach in the order they were added"
                )
            return
        slots = getattr(self.host, SLOTS_ATTR, None) or ()
        if self.kind in EXCLUSIVE_KINDS and any(s.kind == self.kind for s in slots):
            raise DeltaStateError(
                f"cannot attach this {self.kind} to {where}: it carries another delta model's {self.kind} now, and "
                f"a module takes one at a time; detach that delta model first"
            )
        if self.kind == "after" and not is_mergeable(self.delta, self.host) and merged_after(self.host, self.seq):
            raise DeltaStateError(
                f"cannot attach this delta to {where}: a delta added after it is merged into {where}'s weights, so it "
                f"would run before this one instead of after; unmerge() that delta model first"
            )

    def _follow_move(self) -> None:
        """Move the delta as its module moved while it was detached (device, floating-point dtype)."""
        module = self.original if self.kind == "replace" else self.host
        now = _placement(module) if module is not None else None
        if self.placement is None or now is None or now == self.placement:
            return
        (device, dtype), (old_device, old_dtype) = now, self.placement
        if device != old_device:
            self.delta.to(device=device)
        if dtype != old_dtype:
            self.delta.to(dtype=dtype)
        self.placement = now


def _add_slot(module: nn.Module, slot: _Slot) -> None:
    """Add ``slot`` to ``module``'s slots (kept in insertion order), registering the two hooks on the first one."""
    slots: list[_Slot] = getattr(module, SLOTS_ATTR, None) or []
    setattr(module, SLOTS_ATTR, sorted([*slots, slot], key=lambda s: s.seq))
    if getattr(module, HANDLES_ATTR, None) is None:
        handles = (
            module.register_forward_pre_hook(_BeforeHook(), with_kwargs=True),
            module.register_forward_hook(_AfterHook(), with_kwargs=True),
        )
        setattr(module, HANDLES_ATTR, handles)


def _remove_slot(module: nn.Module, matches: Any) -> None:
    """Drop the slots ``matches`` selects; with none left, remove the hooks too, leaving the module as it was."""
    slots = [s for s in getattr(module, SLOTS_ATTR) if not matches(s)]
    if slots:
        setattr(module, SLOTS_ATTR, slots)
        return
    for handle in getattr(module, HANDLES_ATTR):
        handle.remove()
    delattr(module, SLOTS_ATTR)
    delattr(module, HANDLES_ATTR)


def _insert(
    module: nn.Module,
    delta_module: nn.Module,
    delta_name: str,
    kind: Kind,
    strict: bool,
    satellites: tuple[tuple[nn.Module, str, Any], ...] = (),
    option: Any = None,
) -> Insertion:
    if not isinstance(delta_module, nn.Module):
        raise TypeError(f"delta_module must be an nn.Module, got {type(delta_module).__name__}")
    if strict and any(getattr(m, SLOTS_ATTR, None) for m in (module, *(s[0] for s in satellites))):
        raise DeltaStateError(f"{type(module).__name__} already carries deltas and strict=True")
    mark_delta(delta_module)
    insertion = Insertion(
        module,
        _free_name(module, delta_name),
        kind,
        delta_module,
        base_name=delta_name,
        satellites=satellites,
        option=option,
    )
    insertion.attach()
    return insertion


def insert_sequential_module(
    module: nn.Module,
    delta_module: nn.Module,
    delta_name: str = "delta",
    strict: bool = False,
    *,
    position: Literal["before", "after"] = "after",
) -> Insertion:
    """Run ``delta_module`` on the hidden state before or after ``module``.

    After: ``module(x)`` becomes ``delta(module(x))`` (for a tuple or ModelOutput, on its first element).
    Before: ``module(x)`` becomes ``module(delta(x))`` (``x``: first positional tensor, else first tensor keyword).

    Args:
        module: the backbone module to modify.
        delta_module: maps a hidden-state tensor to one of the same shape.
        delta_name: child name for the delta (``adapter``, then ``adapter_1``... when taken).
        strict: refuse a module that already carries a delta.
        position: ``"after"`` (default) or ``"before"``.
    """
    if position not in ("before", "after"):
        raise ValueError(f"position must be 'before' or 'after', got {position!r}")
    return _insert(module, delta_module, delta_name, position, strict)


def insert_parallel_module(
    module: nn.Module,
    delta_module: nn.Module,
    delta_name: str = "delta",
    strict: bool = False,
    *,
    output_module: nn.Module | None = None,
) -> Insertion:
    """Add ``delta_module(x)`` to the output of ``module(x)``: the shape of LoRA, ``W x + B A x``.

    Args:
        module: the module whose input ``x`` feeds the delta (and, by default, whose output it is added to).
        delta_module: maps the input hidden state to a tensor shaped like the output's.
        delta_name: child name for the delta (on ``output_module`` when given).
        strict: refuse modules that already carry a delta.
        output_module: span the delta from ``module``'s input to this module's output instead (it must run after
            ``module`` in the same forward pass), e.g. a feed-forward block's first and second linear layers.
    """
    if output_module is None or output_module is module:
        return _insert(module, delta_module, delta_name, "parallel", strict)
    return _insert(output_module, delta_module, delta_name, "parallel", strict, satellites=((module, "capture", None),))


def replace_module(
    parent_module: nn.Module,
    child_name: str,
    child_module: nn.Module,
    new_module: nn.Module,
    delta_name: str = "delta",
    *,
    wrapped: str | None = None,
) -> Insertion:
    """Swap ``parent_module.<child_name>`` for ``new_module``; :meth:`Insertion.detach` swaps it back.

    Args:
        parent_module: the module holding the child.
        child_name: the child's attribute name.
        child_module: the child being replaced (checked, so a stale reference is caught).
        new_module: the replacement; it keeps the child's docstring.
        delta_name: kept for API compatibility with the original (the replacement lives under ``child_name``).
        wrapped: if ``new_module`` keeps the original child as its own submodule, that submodule's name in
            ``new_module``, so that the original's parameters are not counted as delta parameters.
    """
    del delta_name
    if parent_module._modules.get(child_name) is not child_module:
        raise DeltaStateError(f"{child_name!r} is not the child {type(child_module).__name__} of the given parent")
    if wrapped is not None and new_module.get_submodule(wrapped) is not child_module:
        raise ValueError(f"wrapped={wrapped!r} does not name the original module inside the replacement")
    new_module.__doc__ = child_module.__doc__
    mark_delta(new_module, wrapped)
    insertion = Insertion(parent_module, child_name, "replace", new_module, original=child_module)
    insertion.attach()
    return insertion
