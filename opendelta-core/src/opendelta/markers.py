"""The marks a placed delta leaves on modules, and the queries that read them (which modules and parameters are deltas).

Foundation layer: every other layer asks "is this a delta?" here, so merging, routing, freezing, hashing and
visualization need not import the insertion machinery that sets the marks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch import nn

__all__ = [
    "CAPTURED_ATTR",
    "DELTA_MARK",
    "HANDLES_ATTR",
    "SLOTS_ATTR",
    "WRAPPED_ATTR",
    "backbone_submodules",
    "bare_parameter_names",
    "delta_parameter_names",
    "iter_delta_modules",
    "mark_delta",
]

SLOTS_ATTR = "_opendelta_slots"
"""On a modified module: its list of slots (one per delta placed on it), read by its hooks at call time."""
HANDLES_ATTR = "_opendelta_hook_handles"
"""On a modified module: the handles of the one pair of forward hooks that dispatch to its slots."""
DELTA_MARK = "_opendelta_delta"
"""On a delta module: ``True``. What makes it a delta for every query below."""
WRAPPED_ATTR = "_opendelta_wrapped"
"""On a replacement delta: the child name under which it holds the module it replaced (``None``: it holds none)."""
CAPTURED_ATTR = "_opendelta_captured_input"
"""On a spanning parallel delta: the input its first module received, until its second module's output uses it."""


def mark_delta(delta: nn.Module, wrapped: str | None = None) -> None:
    """Mark ``delta`` (and its parameters, for bigmodelvis) as a delta; ``wrapped``: see :data:`WRAPPED_ATTR`."""
    setattr(delta, DELTA_MARK, True)
    setattr(delta, WRAPPED_ATTR, wrapped)
    skip = {id(p) for p in delta.get_submodule(wrapped).parameters()} if wrapped else set()
    for p in delta.parameters():
        if id(p) not in skip:
            p._is_delta = True  # bigmodelvis colours these; deepcopy drops it, so core never relies on it


def iter_delta_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every delta module attached anywhere in ``model`` (by any delta model), outermost only."""
    seen: set[str] = set()
    for name, module in model.named_modules():
        if getattr(module, DELTA_MARK, False) and not any(name.startswith(s + ".") for s in seen):
            seen.add(name)
            yield name, module


def backbone_submodules(
    module: nn.Module,
    prefix: str,
    where: Callable[[nn.Module], bool],
    enter: Callable[[str, nn.Module], bool] | None = None,
) -> Iterator[tuple[str, nn.Module]]:
    """Every submodule strictly inside ``module`` for which ``where`` holds, with its dotted name under ``prefix``.

    In module order; deltas already attached (an adapter's projections, a LoRA branch) are not part of the backbone,
    so the walk does not enter them, nor a child for which ``enter(name, child)`` is false. For methods that
    broadcast a target to the layers inside it (BitFit's bias sites, LoRA's linear layers of a list of experts).
    """
    for name, child in module.named_children():
        full_name = f"{prefix}.{name}"
        if getattr(child, DELTA_MARK, False) or (enter is not None and not enter(full_name, child)):
            continue
        if where(child):
            yield full_name, child
        yield from backbone_submodules(child, full_name, where, enter)


def delta_parameter_names(model: nn.Module) -> set[str]:
    """Every name (as in ``model.state_dict()``) of every parameter that belongs to an attached delta.

    A parameter shared by several layers of a delta (Compacter's shared rule) has several names; all are listed.
    """
    names: set[str] = set()
    for prefix, module in iter_delta_modules(model):
        wrapped = getattr(module, WRAPPED_ATTR, None)
        for name, _p in module.named_parameters(remove_duplicate=False):
            if wrapped and (name == wrapped or name.startswith(wrapped + ".")):
                continue
            names.add(f"{prefix}.{name}" if prefix else name)
    return names


def bare_parameter_names(model: nn.Module) -> dict[str, str]:
    """Each parameter name of ``model`` mapped to the name it has with every delta taken out.

    Only a replacement that wraps the module it replaced renames anything: ``value.original.weight`` is the
    backbone's ``value.weight`` (see :func:`replace_module`'s ``wrapped``).
    """
    renames = [
        (f"{prefix}.{wrapped}." if prefix else f"{wrapped}.", f"{prefix}." if prefix else "")
        for prefix, module in iter_delta_modules(model)
        if (wrapped := getattr(module, WRAPPED_ATTR, None))
    ]
    out = {}
    for name, _p in model.named_parameters():
        old, new = next(((o, n) for o, n in renames if name.startswith(o)), ("", ""))
        out[name] = new + name[len(old) :] if old else name
    return out
