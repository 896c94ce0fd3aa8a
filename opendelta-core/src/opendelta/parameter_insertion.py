"""The "parameter" placement: a delta that changes one parameter of its module as the module's forward reads it.

Engine layer. Some weights are not held by a submodule one could put a hook on: transformers 5's experts keep every
expert's weights in one 3-D parameter and index it inside their own forward (``F.linear(x, self.gate_up_proj[e])``
for the tokens routed to expert ``e``). A delta on such a weight has to change the weight the forward reads; then
every token is computed with the changed weight of the expert it was routed to, by the model's own code, whatever
experts implementation (eager loop, grouped or batched matmuls) it runs.

How, without touching the module's class, ``forward`` or stored parameter: the module's forward pre-hook (the same
pair of hooks every placement uses, see :mod:`opendelta.insertion`) puts the changed weight in the module's instance
``__dict__`` under the parameter's name, where attribute lookup finds it before ``nn.Module.__getattr__`` looks in
``_parameters``; the forward hook takes it out again. The stored ``nn.Parameter`` is never written: ``state_dict()``,
``parameters()``, their order and the backbone's hash stay the bare model's, and a detached delta leaves the weights
bit for bit as they were. Several parameter deltas on one parameter apply in the order they were added, computed once
per forward by the first. Forwards running through the module at once in several threads (serving) share the changed
weight, which is the same for all of them; it goes when the last one ends. A forward that raised leaves the changed
weight in place until the module's next forward replaces it, or until the delta is detached.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from opendelta.delta_protocols import ParameterUpdate, class_implements
from opendelta.insertion import SLOT_HANDLERS, Insertion, _insert, _live_slots, _Slot
from opendelta.markers import SLOTS_ATTR

__all__ = ["PARAMETER_KIND", "insert_parameter_delta"]

PARAMETER_KIND = "parameter"
"""The slot kind; the slot's ``option`` is the name of the parameter it changes."""

_DEPTH_ATTR = "_opendelta_parameter_depth"
"""On a module while forwards run through it: for each changed parameter, how many are running."""

_LOCK = threading.Lock()


def _chain(module: nn.Module, name: str) -> list[tuple[_Slot, nn.Module]]:
    """The live parameter deltas of ``module`` on ``name``, in the order they were added."""
    return [(s, d) for s, d in _live_slots(module) if s.kind == PARAMETER_KIND and s.option == name]


class _ParameterHandler:
    """Puts the changed parameter in place for the forward of its module, and takes it out after."""

    def before(self, module: nn.Module, slot: _Slot, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        chain = _chain(module, slot.option)
        if not chain or chain[0][0] is not slot:
            return None  # the first delta on this parameter computes the whole chain
        weight: torch.Tensor = module._parameters[slot.option]
        for _slot, delta in chain:
            weight = delta.updated(weight)
        with _LOCK:
            depth = module.__dict__.setdefault(_DEPTH_ATTR, {})
            depth[slot.option] = depth.get(slot.option, 0) + 1
            module.__dict__[slot.option] = weight
        return None

    def after(self, module: nn.Module, slot: _Slot, args: Any, kwargs: Any, output: Any) -> None:
        chain = _chain(module, slot.option)
        if not chain or chain[0][0] is not slot:
            return None
        with _LOCK:
            depth = module.__dict__.get(_DEPTH_ATTR, {})
            depth[slot.option] = depth.get(slot.option, 1) - 1
            if depth[slot.option] <= 0:
                _forget(module, slot.option)
        return None

    def released(self, module: nn.Module, name: str) -> None:
        """After a delta on ``name`` was detached: with none left there, no changed weight may stay behind."""
        remaining = [
            s for s in getattr(module, SLOTS_ATTR, None) or () if s.kind == PARAMETER_KIND and s.option == name
        ]
        if not remaining:
            with _LOCK:
                _forget(module, name)


def _forget(module: nn.Module, name: str) -> None:
    """Take the changed weight ``name`` out of ``module``, so the stored parameter is what attribute lookup finds."""
    module.__dict__.pop(name, None)
    depth = module.__dict__.get(_DEPTH_ATTR)
    if depth is not None:
        depth.pop(name, None)
        if not depth:
            del module.__dict__[_DEPTH_ATTR]


SLOT_HANDLERS[PARAMETER_KIND] = _ParameterHandler()


def insert_parameter_delta(module: nn.Module, parameter: str, delta_module: nn.Module, delta_name: str) -> Insertion:
    """Place ``delta_module`` so that ``module``'s forward reads ``delta_module.updated(module.<parameter>)``.

    Args:
        module: the backbone module that holds the parameter (an experts module).
        parameter: the parameter's name in ``module`` (``gate_up_proj``).
        delta_module: a :class:`~opendelta.delta_protocols.ParameterUpdate`.
        delta_name: the child name for the delta (``lora_gate_up_proj``; a suffix is added when taken).

    Raises:
        ValueError: ``module`` has no parameter ``parameter`` (the message names those it has).
        TypeError: ``delta_module`` does not implement ``updated(weight)``.
    """
    if module._parameters.get(parameter) is None:
        own = sorted(n for n, p in module._parameters.items() if p is not None)
        raise ValueError(
            f"{type(module).__name__} has no parameter {parameter!r} to place a delta on; its own are {own or 'none'}"
        )
    if not class_implements(delta_module, ParameterUpdate):
        raise TypeError(
            f"{type(delta_module).__name__} cannot change {type(module).__name__}.{parameter}: a delta on a parameter "
            f"must implement updated(weight) -> the weight the module's forward reads (opendelta.plugin_api."
            f"ParameterUpdate)"
        )
    return _insert(module, delta_module, delta_name, PARAMETER_KIND, False, option=parameter)
