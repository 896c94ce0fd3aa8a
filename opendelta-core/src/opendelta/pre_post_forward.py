"""Sequential deltas in OpenDelta 0.3.2's protocol: ``pre_forward(*args, **kwargs)`` and ``post_forward(output)``.

The manual's sequential paradigm hands a module's whole output to the delta's ``post_forward`` (a tuple, a
``ModelOutput``: the delta picks what it changes) and its whole call to ``pre_forward``, which returns new
``(args, kwargs)``. This registers that protocol as a slot kind of :mod:`opendelta.insertion` (as prefix tuning
registers its own), so such a delta is placed, detached, attached, copied and frozen like every other one.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from opendelta.errors import DeltaConfigError
from opendelta.insertion import SLOT_HANDLERS, Insertion, _insert, _Slot

__all__ = ["PRE_POST_KIND", "has_pre_post", "insert_pre_post_module"]

PRE_POST_KIND = "pre_post_forward"
Hooks = Literal["both", "pre", "post"]


def has_pre_post(delta_module: nn.Module) -> bool:
    """Whether ``delta_module`` speaks 0.3.2's sequential protocol (has ``pre_forward`` or ``post_forward``)."""
    return callable(getattr(delta_module, "pre_forward", None)) or callable(getattr(delta_module, "post_forward", None))


class _PrePostHandler:
    """Runs the delta's ``pre_forward`` before the module and its ``post_forward`` after it (where it has them)."""

    def before(self, module: nn.Module, slot: _Slot, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        delta = module._modules.get(slot.attr)
        hook = getattr(delta, "pre_forward", None) if slot.option in ("both", "pre") else None
        if hook is None:
            return None
        new = hook(*args, **kwargs)
        if not (isinstance(new, tuple) and len(new) == 2 and isinstance(new[1], dict)):
            raise DeltaConfigError(
                f"{type(delta).__name__}.pre_forward must return (args, kwargs) for {type(module).__name__}, as in "
                f"OpenDelta 0.3.2; it returned {type(new).__name__}"
            )
        return tuple(new[0]), new[1]

    def after(self, module: nn.Module, slot: _Slot, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        delta = module._modules.get(slot.attr)
        hook = getattr(delta, "post_forward", None) if slot.option in ("both", "post") else None
        return None if hook is None else hook(output)


SLOT_HANDLERS[PRE_POST_KIND] = _PrePostHandler()


def insert_pre_post_module(
    module: nn.Module, delta_module: nn.Module, delta_name: str = "delta", strict: bool = False, hooks: Hooks = "both"
) -> Insertion:
    """Place ``delta_module`` on ``module`` in 0.3.2's protocol; ``hooks`` may limit it to ``pre`` or ``post``.

    Raises:
        DeltaConfigError: the delta has none of the hooks asked for.
    """
    wanted = ("pre_forward", "post_forward") if hooks == "both" else (f"{hooks}_forward",)
    if not any(callable(getattr(delta_module, name, None)) for name in wanted):
        raise DeltaConfigError(
            f"{type(delta_module).__name__} has no {' or '.join(wanted)}: a sequential delta of OpenDelta 0.3.2 "
            f"changes a module's input in pre_forward(*args, **kwargs) -> (args, kwargs) and its output in "
            f"post_forward(output) -> output"
        )
    return _insert(module, delta_module, delta_name, PRE_POST_KIND, strict, option=hooks)
