"""The common-structure view of a model (``opendelta show --common``): its modules under their common names.

Each node is a common name component (``encoder`` > ``block`` > ``0`` > ``attn`` > ``q``) with the real module's
type and, when it differs from the common name, its real name relative to the repeated block it is in (else its
full name); a node with no real module of its own (BERT's ``ff.w1`` creates ``ff``) is marked ``virtual``.
Repeated blocks are folded (``0-11``) by bigmodelvis, as in the plain tree, so a model of any depth prints in a
screenful.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bigmodelvis import Visualization
from bigmodelvis.visualization import ModuleTree
from torch import nn

from opendelta.registry import structure_for_model
from opendelta.structures import CommonName
from opendelta.visualization import tidy_tree

__all__ = ["common_structure_tree"]


@dataclass
class _Node:
    real: str | None = None
    module: nn.Module | None = None
    part: str = ""
    children: dict[str, _Node] = field(default_factory=dict)


def _relative(real: str, block: str | None) -> str:
    """``real`` relative to the repeated block it is in (``attention.self.query``), else the full name.

    One parent for every row of a block, so siblings read alike (``ff.w1`` is ``intermediate.dense`` and ``ff.w2``
    ``output.dense``, not ``dense`` relative to ``ff``'s own module).
    """
    if block and real.startswith(block + "."):
        return real[len(block) + 1 :]
    return real


def _insert(root: _Node, real: str, module: nn.Module, common: CommonName) -> None:
    node = root
    for component in common.name.split("."):
        node = node.children.setdefault(component, _Node())
    node.real, node.module = real, module
    if common.part is not None:
        node.part = f"part {common.part + 1}/{common.num_parts}"


def _param_info(module: nn.Module, leaf: bool) -> list[str]:
    return [f"{name}:{list(param.shape)}" for name, param in module.named_parameters(recurse=leaf)]


def _render(node: _Node, tree: ModuleTree, block: str | None, vis: Visualization) -> None:
    for name, child in node.children.items():
        if child.module is None or child.real is None:
            info = "virtual"
        else:
            at_block = name.isdigit() and child.real.rsplit(".", 1)[-1] == name  # a block is named by its index
            relative = name if at_block else _relative(child.real, block)
            info = type(child.module).__name__ + ("" if relative == name else f": {relative}")
            info += f", {child.part}" if child.part else ""
        branch = tree.add(name, info=info, type_color=vis.virtual_color if child.module is None else vis.type_color)
        if child.module is not None:
            for param in _param_info(child.module, leaf=not child.children):
                branch.add(info=param, is_param_node=True, param_color=vis.param_color)
        _render(child, branch, child.real if name.isdigit() and child.real else block, vis)


def common_structure_tree(model: nn.Module, rootname: str | None = None) -> ModuleTree:
    """The rich tree of ``model``'s modules under their common names (see the module docstring).

    Raises:
        StructureNotFoundError: no registered mapping (nor ``resolve_common_structure`` plugin) covers the model.
    """
    structure = structure_for_model(model)
    root = _Node()
    for real, commons in structure.common_names(model).items():
        module = model.get_submodule(real)
        for common in commons:
            _insert(root, real, module, common)
    vis = Visualization(model)
    vis.keep_non_params = True  # a mapped module without parameters of its own is still part of the structure
    tree = ModuleTree(rootname or f"{type(model).__name__} (common structure of {structure.model_type!r})")
    _render(root, tree, None, vis)
    vis.prune_tree(tree)
    vis.fold_param_node(tree)
    return tidy_tree(tree)
