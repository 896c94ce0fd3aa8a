"""``modified_modules="all-linear"``: every linear layer inside the model's repeated blocks, never an output head.

PEFT users write ``target_modules="all-linear"``; here it works on any architecture. The blocks are the common
structure's ``block.N`` modules when the model has a mapping (so BERT's pooler and every task head stay out), and
otherwise the children of the model's ``nn.ModuleList``s of one repeated class (the layer stacks of any
transformer). The output embedding layer (``get_output_embeddings()``) is never a target, even where it sits inside
a block list.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from opendelta.errors import ModuleNotFoundInStructureError, StructureNotFoundError
from opendelta.shapes import linear_types
from opendelta.structure_inference import layer_stacks
from opendelta.structure_registry import structure_for_model
from opendelta.structures import find_config_model

__all__ = ["all_linear_names"]

_BLOCK = re.compile(r"(?:.*\.)?block\.[^.]+")


def _mapped_blocks(model: nn.Module) -> list[str] | None:
    """Real names of the mapping's ``block.N`` modules, or ``None`` when no mapping covers ``model``."""
    try:
        structure = structure_for_model(model)
    except StructureNotFoundError:
        return None
    common = structure.common_names(model)
    return [real for real, names in common.items() if any(_BLOCK.fullmatch(c.name) for c in names)]


def all_linear_names(model: nn.Module, names: Sequence[str], method: str) -> list[str]:
    """The names among ``names`` (the backbone's candidates, in module order) that ``"all-linear"`` designates.

    Raises:
        ModuleNotFoundInStructureError: the model has no repeated blocks, or no linear layer inside them.
    """
    blocks = _mapped_blocks(model)
    if blocks is None:
        blocks = [f"{path}.{i}" if path else str(i) for path, stack in layer_stacks(model) for i in range(len(stack))]
    if not blocks:
        raise ModuleNotFoundInStructureError(
            f"{method}: modified_modules='all-linear' found no repeated blocks in {type(model).__name__} (no "
            f"common-structure mapping, and no nn.ModuleList of layers of one class); name the modules instead"
        )
    located = find_config_model(model)
    head = located[1].get_output_embeddings() if located and hasattr(located[1], "get_output_embeddings") else None
    modules = dict(model.named_modules())
    types = linear_types()
    chosen = [
        name
        for name in names
        if isinstance(modules[name], types)
        and modules[name] is not head
        and any(name.startswith(block + ".") for block in blocks)
    ]
    if not chosen:
        raise ModuleNotFoundInStructureError(
            f"{method}: modified_modules='all-linear' found no linear layer inside the {len(blocks)} blocks of "
            f"{type(model).__name__}"
        )
    return chosen
