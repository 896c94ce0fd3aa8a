"""A per-backbone switching gate, so that a forward pass in one thread and a detach in another do not mix.

Switching a delta model (``attach``, ``detach``, ``merge``, ``unmerge``, building one) rewires many modules one
after another; a forward pass running meanwhile in another thread would run some layers with the deltas and some
without. The gate is a readers-writer lock per backbone: forward passes of the backbone enter it as readers (any
number at once), a switch takes it as the writer, waiting for running forwards to finish and holding new ones back
until it is done. A forward thus sees the whole old state or the whole new one; switches serialise.

Readers enter through a forward pre-hook and leave through an always-called forward hook on the backbone's root
module, installed only while the backbone carries a delta of ours (a detached or merged backbone has no hook at
all, as before). A forward that began while the backbone carried none (so without a gate to enter) and meets a
delta attached meanwhile must still see the old state: :func:`forward_sees_deltas` tells the delta hooks so, from
the call stack, at the cost of a stack walk only on that rare path.

The gate itself is kept beside the backbone (in a weak dictionary), not on it: the backbone's attributes, a deep
copy and a pickle are as they were. A copy's root hooks find no gate of the copy's and do nothing until a delta
model on the copy switches, which gives the copy a gate of its own.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from opendelta.errors import DeltaStateError
from opendelta.markers import DELTA_MARK

__all__ = ["SwitchGate", "forward_sees_deltas", "gate_of", "switching"]

_GATES: weakref.WeakKeyDictionary[nn.Module, SwitchGate] = weakref.WeakKeyDictionary()
_GATES_LOCK = threading.Lock()
_inside = threading.local()
"""``depth``: how many gated forward passes (of any backbone) this thread is inside."""
_CALL_CODE = nn.Module._call_impl.__code__


class SwitchGate:
    """Readers (forward passes) share it; one writer (a switch) at a time excludes them.

    Writers are preferred: once one waits, new forwards wait behind it, so a stream of forwards cannot starve a
    detach. Both sides are re-entrant in their thread: a forward nested in a forward (``generate`` calling the model)
    does not wait, nor a switch nested in a switch (``detach`` unmerging first) or a forward the switching thread
    runs itself (measuring shapes while building). A switch from inside a forward of the same backbone in the same
    thread would wait for itself forever and is refused instead.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None
        self._writer_depth = 0
        self._waiting_writers = 0
        self._local = threading.local()  # ``stack``: per nested forward of this thread, whether it was counted

    def _stack(self) -> list[bool]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def enter_forward(self, root: nn.Module) -> None:
        """A forward pass of ``root`` begins: wait while a switch runs or waits, unless this thread is inside already.

        PyTorch reads a module's forward hooks after its forward ran: a forward that waited here for a switch
        taking the last delta out (and the gate hooks with it) would never be let out. It enters only if the
        leaving hook is still there once it holds the gate (no switch can remove it then), and otherwise runs as a
        forward of a bare backbone, which it is.
        """
        stack = self._stack()
        if stack or self._writer == threading.get_ident():
            counted = False
            if not _has_leave_hook(root):
                return
        else:
            with self._cond:
                while self._writer is not None or self._waiting_writers:
                    self._cond.wait()
                if not _has_leave_hook(root):
                    return
                self._readers += 1
            counted = True
        stack.append(counted)
        _inside.depth = getattr(_inside, "depth", 0) + 1

    def leave_forward(self) -> None:
        """A forward pass ended (returned or raised); a leave with no matching enter is ignored."""
        stack = self._stack()
        if not stack:
            return
        _inside.depth -= 1
        if stack.pop():
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def writing(self, what: str, backbone: nn.Module) -> Iterator[None]:
        """Hold the gate as the writer for one switch; on leaving, put the root hooks in line with the backbone."""
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._writer_depth += 1
            elif self._stack():
                raise DeltaStateError(
                    f"{what} was called inside a forward pass of the same {type(backbone).__name__} in the same thread "
                    f"(from a hook or a delta's forward); it would wait for that forward pass to finish, which waits "
                    f"for it: call {what} before or after the forward pass, or from another thread"
                )
            else:
                self._waiting_writers += 1
                try:
                    while self._writer is not None or self._readers:
                        self._cond.wait()
                finally:
                    self._waiting_writers -= 1
                self._writer, self._writer_depth = me, 1
        _inside.depth = getattr(_inside, "depth", 0) + 1  # the switching thread's own forwards see the current state
        try:
            yield
        finally:
            _inside.depth -= 1
            with self._cond:
                self._writer_depth -= 1
                outermost = not self._writer_depth
            if outermost:
                try:
                    _place_root_hooks(backbone)
                finally:
                    with self._cond:
                        self._writer = None
                        self._cond.notify_all()


def gate_of(backbone: nn.Module) -> SwitchGate:
    """The gate of ``backbone``, created on first use."""
    with _GATES_LOCK:
        gate = _GATES.get(backbone)
        if gate is None:
            gate = _GATES[backbone] = SwitchGate()
        return gate


def switching(backbone: nn.Module, what: str) -> Any:
    """A context in which to rewire ``backbone`` with no forward pass of it running: its gate, held as the writer.

    ``what`` names the call, for the error a switch from inside a forward pass gets.
    """
    return gate_of(backbone).writing(what, backbone)


class _EnterGate:
    """Root forward pre-hook: the forward pass enters its backbone's gate (a copy without a gate: nothing)."""

    def __call__(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():  # a compiled graph is not gated (dynamo cannot trace locks)
            return
        gate = _GATES.get(module)
        if gate is not None:
            gate.enter_forward(module)


class _LeaveGate:
    """Root forward hook, called even when the forward raised: the forward pass leaves the gate."""

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        gate = _GATES.get(module)
        if gate is not None:
            gate.leave_forward()


def _has_leave_hook(root: nn.Module) -> bool:
    return any(isinstance(hook, _LeaveGate) for hook in root._forward_hooks.values())


def _place_root_hooks(backbone: nn.Module) -> None:
    """Give the root the gate hooks iff it carries a delta: the pre-hook first, the leaving hook last of all."""
    for key, hook in list(backbone._forward_pre_hooks.items()):
        if isinstance(hook, _EnterGate):
            del backbone._forward_pre_hooks[key]
    for key, hook in list(backbone._forward_hooks.items()):
        if isinstance(hook, _LeaveGate):
            del backbone._forward_hooks[key]
            backbone._forward_hooks_always_called.pop(key, None)
    if any(getattr(m, DELTA_MARK, False) for m in backbone.modules()):
        backbone.register_forward_pre_hook(_EnterGate(), prepend=True)
        backbone.register_forward_hook(_LeaveGate(), always_call=True)


def forward_sees_deltas() -> bool:
    """Whether a delta hook running now should apply its deltas (almost always: ``True``).

    ``False`` only for a forward pass of a gated backbone that this thread runs without having entered its gate:
    it began while the backbone carried no delta (no gate hook to enter), so it must go on seeing none. A module
    called on its own, outside any backbone forward pass, applies its deltas.
    """
    if torch.compiler.is_compiling() or getattr(_inside, "depth", 0):
        return True
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _CALL_CODE and frame.f_locals.get("self") in _GATES:
            return False
        frame = frame.f_back
    return True
