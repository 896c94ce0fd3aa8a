"""Per-task heads (PEFT's ``modules_to_save``): a delta model's own trainable copy of a backbone module.

Unfreezing a task head (``freeze_module(exclude=["deltas", "classifier"])``) trains the backbone's one copy, so a
second task's delta loaded onto the same backbone overwrites the first task's head. With
``modules_to_save=["classifier"]`` the delta model instead deep-copies the module once, marks the copy as a delta
(trained by ``freeze_module(exclude=["deltas"])``, saved by ``delta_state_dict``/``save_finetuned``, shown by
``log()``, moved by ``attach``/``detach``) and makes the backbone compute with the copy while it is attached.

How the copy takes the original's place, and why that way:

* The first head on a module swaps it, in its parent, for a :class:`HeadDispatcher` (core's "replace" primitive,
  :func:`~opendelta.insertion.replace_module`, wrapping the original under ``original``: the backbone's names and
  hash see through it). The dispatcher holds each attached delta model's copy in ``heads``, in attach order, and
  calls only one of them: the most recently attached, or the original when none is. The original's forward does
  not run beside a copy (an LM head is large).
* Each copy is placed on ``heads`` with the sequential primitive, so it is an ordinary
  :class:`~opendelta.insertion.Insertion` of its delta model: ``attach``/``detach``, ``insertions()`` (which
  ``route_rows`` keys rows by), freezing and the all-or-nothing switching all treat it like any delta. ``heads`` is
  a container that is never called, so that placement's forward hooks never fire: the dispatcher is what reads it.
* When no copy is attached any more the dispatcher swaps itself out again: the backbone is exactly the bare model
  (same module in the same place, same ``state_dict`` names, no attribute added). A registry outside the backbone,
  weak on both sides, remembers it by its original, so the next head on that module (of any delta model) joins it;
  a deep copy or unpickled copy registers itself for its own copy of the original.

Under :func:`opendelta.route_rows`, row ``i`` goes through the copy of its own delta model; rows routed to a delta
model without a head, or to ``None``, get the head that applies without routing (the newest copy of an attached
delta model that is not routed, else the original).

Tied weights: a copy of an LM head whose weight is tied to the input embeddings is untied (the copy owns a new
weight, initialised from the tied one); the embeddings are not changed, and training the copy leaves them alone.

Names are real module names matched at their end as ``modified_modules`` matches them (``"classifier"``,
``"lm_head"``, ``"score"``, ``"embed_tokens"``, or ``"[r]..."``), not common-structure names.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from opendelta.addressing import compile_patterns, suggest_names
from opendelta.errors import DeltaConfigError, DeltaStateError, ModuleNotFoundInStructureError
from opendelta.insertion import Insertion, insert_sequential_module, replace_module
from opendelta.markers import DELTA_MARK, SLOTS_ATTR, iter_delta_modules
from opendelta.module_io import main_input, with_input
from opendelta.routing import current_routing
from opendelta.targets import Target, backbone_module_names

if TYPE_CHECKING:
    from opendelta.routing import Routing

__all__ = ["TASK_HEAD_NAME", "HeadDispatcher", "TaskHead", "head_module_names", "resolve_heads"]

TASK_HEAD_NAME = "task_head"
"""The child name of a copy in ``HeadDispatcher.heads`` and the middle of its tensors' saved names."""
_DISPATCHERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref[HeadDispatcher]] = weakref.WeakKeyDictionary()
"""Each original module's dispatcher, kept while the dispatcher is out of the backbone; weak on both sides, so it
keeps neither alive (a dispatcher no delta model holds any more may be collected)."""
_PLACEMENT_ATTR = "_opendelta_head_placement"
"""On a dispatcher (in its ``__dict__``): the "replace" :class:`Insertion` that puts it in its parent."""


class HeadDispatcher(nn.Module):
    """Stands in for one backbone module while delta models hold copies of it; calls exactly one of them per row.

    ``original`` is the backbone's module (never called while a copy is attached); ``heads`` holds the attached
    copies in the order they were attached (an attach appends, a detach removes), the last one being the head
    that applies to every row no routing claims.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.heads = nn.ModuleDict()
        _DISPATCHERS[original] = weakref.ref(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A deep or unpickled copy is the dispatcher of its own copy of the original (see :data:`_DISPATCHERS`)."""
        super().__setstate__(state)
        _DISPATCHERS[self.original] = weakref.ref(self)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        live = list(self.heads._modules.values())
        if not live:
            return self.original(*args, **kwargs)
        routing = current_routing()
        if routing is None:
            return live[-1](*args, **kwargs)
        return self._routed(live, routing, args, kwargs)

    def _routed(self, live: list[nn.Module], routing: Routing, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Each routed copy on its rows, the unrouted head on the others, assembled in the batch's row order."""
        where, hidden = main_input(self, args, kwargs)
        batch, device = hidden.shape[0], hidden.device
        routed: list[tuple[nn.Module, torch.Tensor]] = []
        unrouted: nn.Module = self.original
        for head in live:
            rows = routing.rows(head, batch, device)
            if rows is None:
                unrouted = head
            elif rows.numel():
                routed.append((head, rows))
        if not routed:
            return unrouted(*args, **kwargs)
        if len(routed) == 1 and routed[0][1].numel() == batch:
            return routed[0][0](*args, **kwargs)
        taken = torch.zeros(batch, dtype=torch.bool, device=device)
        for _head, rows in routed:
            taken[rows] = True
        rest = (~taken).nonzero().flatten()
        if rest.numel():
            routed.append((unrouted, rest))
        parts = []
        for head, rows in routed:
            part_args, part_kwargs = with_input(args, kwargs, where, hidden.index_select(0, rows))
            part = head(*part_args, **part_kwargs)
            if not isinstance(part, torch.Tensor):
                raise DeltaStateError(
                    f"route_rows cannot split the output of the task head {type(head).__name__} by rows: it returned "
                    f"{type(part).__name__}, not a tensor; run these tasks in separate passes"
                )
            parts.append(part)
        order = torch.cat([rows for _head, rows in routed])
        return torch.cat(parts).index_select(0, torch.argsort(order))


class TaskHead:
    """One delta model's copy of one backbone module, and where it stands in for it.

    Kept by the delta model; ``insertion`` is the copy's placement on its dispatcher's ``heads``.
    """

    def __init__(self, name: str, dispatcher: HeadDispatcher, copy_: nn.Module) -> None:
        self.name = name
        self.dispatcher = dispatcher
        self.insertion: Insertion = insert_sequential_module(dispatcher.heads, copy_, TASK_HEAD_NAME, position="after")
        self.sync()

    @property
    def copy(self) -> nn.Module:
        return self.insertion.delta

    def sync(self) -> None:
        """Put the dispatcher in its parent while it holds a copy, and take it out when it holds none.

        A copy attached again follows its original's device and floating-point dtype (the backbone may have
        moved while the copy was out).
        """
        placement: Insertion = self.dispatcher.__dict__[_PLACEMENT_ATTR]
        holds = bool(self.dispatcher.heads._modules)
        if holds and not placement.attached:
            placement.attach()
        elif not holds and placement.attached:
            placement.detach()
        if self.insertion.attached:
            _follow(self.copy, self.dispatcher.original)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The copy's tensors under ``<module name>.task_head.<tensor>`` (stable whatever its child name is)."""
        return {f"{self.name}.{TASK_HEAD_NAME}.{k}": v for k, v in self.copy.state_dict().items()}

    def attached_name(self, backbone: nn.Module) -> str | None:
        """The copy's dotted name in ``backbone`` as it is (or would be) attached; ``None``: the module is gone."""
        names = {id(m): n for n, m in backbone.named_modules()}
        where = names.get(id(self.dispatcher), names.get(id(self.dispatcher.original)))
        return None if where is None else f"{where}.heads.{self.insertion.attr}"


def _follow(module: nn.Module, original: nn.Module) -> None:
    theirs = next((t for t in [*original.parameters(), *original.buffers()] if t.is_floating_point()), None)
    ours = next((t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()), None)
    if theirs is not None and ours is not None and (theirs.device, theirs.dtype) != (ours.device, ours.dtype):
        module.to(device=theirs.device, dtype=theirs.dtype)


def _dispatcher_at(backbone: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module, HeadDispatcher | None]:
    """``(parent, child name, module there, its dispatcher if one exists)`` for a resolved head name."""
    parent_name, _, child = name.rpartition(".")
    parent = backbone.get_submodule(parent_name)
    module = parent._modules[child]
    if isinstance(module, HeadDispatcher):
        return parent, child, module.original, module
    ref = _DISPATCHERS.get(module)
    known = ref() if ref is not None else None
    return parent, child, module, known if known is not None and known.original is module else None


def _carries_deltas(module: nn.Module) -> bool:
    return any(getattr(m, SLOTS_ATTR, None) or getattr(m, DELTA_MARK, False) for m in module.modules())


def head_module_names(backbone: nn.Module) -> list[str]:
    """The names ``modules_to_save`` may designate: the backbone's own modules, and those a head stands in for now.

    A module with a head copy attached is a dispatcher (a delta, so left out of
    :func:`~opendelta.targets.backbone_module_names`), yet another delta model may give it a head of its own.
    """
    dispatchers = [n for n, m in iter_delta_modules(backbone) if isinstance(m, HeadDispatcher)]
    return [*backbone_module_names(backbone), *dispatchers]


def resolve_heads(
    backbone: nn.Module, patterns: Sequence[str] | None, targets: Sequence[Target], owner: str
) -> list[str]:
    """The module names ``modules_to_save`` designates, checked before anything changes.

    Raises:
        ModuleNotFoundInStructureError: an entry matches no module (the closest names are suggested).
        DeltaConfigError: a designated module is (or contains, or is inside) a module this delta model's deltas
            modify; or two designated modules are nested; or it already carries another delta model's deltas.
    """
    if not patterns:
        return []
    compiled = compile_patterns(patterns, argument="modules_to_save")
    names = head_module_names(backbone)
    chosen: list[str] = []
    for pattern in compiled:
        hits = [n for n in names if pattern.matches(n)]
        if not hits:
            close = suggest_names([pattern.text], names)
            hint = f" Closest module names: {', '.join(map(repr, close))}." if close else ""
            raise ModuleNotFoundInStructureError(
                f"{owner}: modules_to_save entry {pattern.text!r} matches no module of {type(backbone).__name__}."
                f"{hint} An entry matches the end of a real module name on whole components ('classifier', "
                f"'lm_head'); start it with '[r]' for a regular expression."
            )
        chosen += [n for n in hits if n not in chosen]
    _check_nesting(chosen, owner)
    modified = [t.name for target in targets for t in (target, target.output) if t is not None]
    for name in chosen:
        clash = next((m for m in modified if _nested(m, name)), None)
        if clash is not None:
            raise DeltaConfigError(
                f"{owner}: modules_to_save names {name!r}, and this delta model's own deltas modify {clash!r}; a task "
                f"head is a whole copy of its module, so the deltas would be left on the original. Leave {name!r} "
                f"out of modified_modules (exclude_modules=[{name!r}]) or out of modules_to_save"
            )
        _parent, _child, module, dispatcher = _dispatcher_at(backbone, name)
        if dispatcher is None and _carries_deltas(module):
            raise DeltaConfigError(
                f"{owner}: modules_to_save names {name!r}, which carries another delta model's deltas; a copy would "
                f"copy them along. Build the delta model with the head first, or detach the other one first"
            )
    return chosen


def _nested(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _check_nesting(names: Sequence[str], owner: str) -> None:
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if _nested(a, b):
                raise DeltaConfigError(
                    f"{owner}: modules_to_save designates both {a!r} and {b!r}, one inside the other; name only the "
                    f"outer one (its copy holds the inner one)"
                )


def build_heads(backbone: nn.Module, names: Sequence[str]) -> list[TaskHead]:
    """Copy each named module and make the copy stand in for it (see the module docstring)."""
    heads = []
    for name in names:
        parent, child, module, dispatcher = _dispatcher_at(backbone, name)
        if dispatcher is None:
            dispatcher = HeadDispatcher(module)
            placement = replace_module(parent, child, module, dispatcher, wrapped="original")
            placement.detach()  # placed by TaskHead.sync, once it holds a copy
            dispatcher.__dict__[_PLACEMENT_ATTR] = placement
        duplicate = copy.deepcopy(module)  # a tied weight becomes the copy's own: the embeddings are left alone
        duplicate.requires_grad_(True)
        heads.append(TaskHead(name, dispatcher, duplicate))
    return heads


def sync_all(heads: Sequence[TaskHead]) -> None:
    """After an attach or detach: each dispatcher in its parent exactly while it holds an attached copy."""
    for head in heads:
        head.sync()


def state_dict(heads: Sequence[TaskHead]) -> dict[str, torch.Tensor]:
    """Every head copy's tensors under its stable names (see :meth:`TaskHead.state_dict`)."""
    return {k: v for head in heads for k, v in head.state_dict().items()}


def detached_heads(heads: Sequence[TaskHead], backbone: nn.Module) -> dict[str, nn.Module]:
    """Each detached copy under the name it has attached, for freezing it as it would be frozen attached."""
    named = ((h.attached_name(backbone), h.copy) for h in heads if not h.insertion.attached)
    return {name: module for name, module in named if name is not None}


def shadowed_parameter_names(backbone: nn.Module) -> set[str]:
    """Names of the backbone parameters a head copy stands in for now (``lm_head.original.weight``).

    They are not trained while a copy runs in their place, so a checkpoint never ships them as backbone tensors.
    """
    return {
        f"{prefix}.original.{name}" if prefix else f"original.{name}"
        for prefix, module in iter_delta_modules(backbone)
        if isinstance(module, HeadDispatcher)
        for name, _p in module.original.named_parameters(remove_duplicate=False)
    }


def iter_copies(heads: Sequence[TaskHead]) -> Iterator[nn.Module]:
    return (head.copy for head in heads)
