"""The module tree the selection page shows: one node per module, repeated blocks folded into one.

Folding follows bigmodelvis (the tree ``DeltaModel.log()`` prints): siblings with the same structure (same class,
same parameter shapes, same subtree) are shown as one node labelled with their names, ``0-11`` for the layers of a
stack or ``query,key,value`` for same-shaped projections, and modules without parameters are left out. bigmodelvis
keeps only a colour-coded label per folded node, from which real names cannot be recovered reliably (a name may
itself hold ``-`` or ``,``), so the rule is re-implemented here on plain data: every node carries the real dotted
names of all the modules it stands for (``paths``), and a folded node also keeps its members one by one
(``repeats``), which the page shows when ``[*]`` unfolds it.

Selecting a node selects every module in its ``paths``: a folded block selected as a whole expands to the same
module in every repeat, by its full real name (no ``[r]`` regex), so what the delta model receives is exactly what
was clicked, however irregular the selection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from opendelta.targets import backbone_module_names

__all__ = ["ModuleNode", "build_tree", "fold_repeats", "range_label"]


@dataclass
class ModuleNode:
    """One row of the tree: a module, or several same-structured modules folded into one row."""

    label: str
    """What the row shows: the module's attribute name, or the folded names (``0-11``, ``query,key,value``)."""
    type: str
    """Class name of the module(s)."""
    params: list[str] = field(default_factory=list)
    """The module's own parameters, ``weight:[32, 32]``."""
    paths: list[str] = field(default_factory=list)
    """Real dotted names (relative to the backbone) of every module the row stands for; empty for the root."""
    selectable: bool = True
    """Whether the delta method can modify these modules (the page greys out the others)."""
    children: list[ModuleNode] = field(default_factory=list)
    repeats: list[ModuleNode] | None = None
    """For a folded row: its members, one node each, in module order."""

    def signature(self) -> tuple[Any, ...]:
        """The structure of the subtree without this node's own label: equal signatures fold together."""
        return (self.type, tuple(self.params), tuple((c.label, c.signature()) for c in self.children))

    def iter_paths(self) -> Iterator[str]:
        """Every real name in the subtree (folded or not), each once per node that shows it."""
        yield from self.paths
        for child in self.children:
            yield from child.iter_paths()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form served to the page."""
        out: dict[str, Any] = {
            "label": self.label,
            "type": self.type,
            "params": list(self.params),
            "paths": list(self.paths),
            "selectable": self.selectable,
            "children": [c.to_dict() for c in self.children],
        }
        if self.repeats is not None:
            out["repeats"] = [r.to_dict() for r in self.repeats]
        return out


def range_label(labels: Sequence[str]) -> str:
    """Join member names compactly: ``["0", "1", "2", "5"]`` -> ``"0-2,5"``; other names are joined with commas."""
    if not all(label.isdigit() and str(int(label)) == label for label in labels):
        return ",".join(labels)
    numbers = sorted({int(label) for label in labels})
    spans: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ",".join(spans)


def _merge(nodes: Sequence[ModuleNode]) -> ModuleNode:
    """Overlay same-structured nodes: one node whose paths (and children's, repeats') are the members' together."""
    first = nodes[0]
    return ModuleNode(
        label=first.label,
        type=first.type,
        params=list(first.params),
        paths=[p for n in nodes for p in n.paths],
        selectable=all(n.selectable for n in nodes),
        children=[_merge(group) for group in zip(*(n.children for n in nodes), strict=True)],
        repeats=None
        if first.repeats is None
        else [_merge(group) for group in zip(*(n.repeats or [] for n in nodes), strict=True)],
    )


def fold_repeats(node: ModuleNode) -> ModuleNode:
    """Fold, bottom-up, the siblings of equal :meth:`ModuleNode.signature` into one row each (first one's place)."""
    children = [fold_repeats(c) for c in node.children]
    groups: dict[tuple[Any, ...], list[ModuleNode]] = {}
    for child in children:
        groups.setdefault(child.signature(), []).append(child)
    folded = []
    for members in groups.values():
        if len(members) == 1:
            folded.append(members[0])
            continue
        row = _merge(members)
        row.label = range_label([m.label for m in members])
        row.repeats = members
        folded.append(row)
    return ModuleNode(node.label, node.type, node.params, node.paths, node.selectable, folded, node.repeats)


def build_tree(
    model: nn.Module,
    *,
    selectable: Callable[[nn.Module], bool] | None = None,
    fold: bool = True,
    root_label: str = "root",
) -> ModuleNode:
    """The tree of ``model``'s modules that hold parameters, repeated blocks folded.

    Modules inside deltas already attached to the model are left out (they are not targets), as are subtrees
    without any parameter (dropouts, activations).

    Args:
        model: the backbone.
        selectable: whether a module can be modified by the delta method at hand (default: every module).
        fold: fold repeated siblings (:func:`fold_repeats`); ``False`` gives the plain tree.
        root_label: the root row's label.

    Returns:
        The root node; it stands for the whole model and is not selectable (no name addresses it).
    """
    nodes = {"": ModuleNode(root_label, type(model).__name__, selectable=False)}
    for name in backbone_module_names(model):
        module = model.get_submodule(name)
        parent, _, attr = name.rpartition(".")
        if parent not in nodes:  # inside a module that was skipped: cannot happen for named_modules order
            continue
        node = ModuleNode(
            label=attr,
            type=type(module).__name__,
            params=[f"{n}:{list(p.shape)}" for n, p in module.named_parameters(recurse=False)],
            paths=[name],
            selectable=True if selectable is None else bool(selectable(module)),
        )
        nodes[parent].children.append(node)
        nodes[name] = node
    root = _prune(nodes[""]) or nodes[""]
    return fold_repeats(root) if fold else root


def _prune(node: ModuleNode) -> ModuleNode | None:
    """Drop the subtrees that hold no parameter; ``None`` when ``node``'s whole subtree has none."""
    node.children = [c for c in (_prune(c) for c in node.children) if c is not None]
    return node if node.params or node.children else None
