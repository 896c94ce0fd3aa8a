"""``log()``: the bigmodelvis tree of a (modified) backbone, then its parameter ratios.

Ratios follow the original's printouts: both divide by every unique parameter of the backbone, deltas and task
head included (tied embeddings counted once). "Delta Parameter Ratio" counts the parameters of every delta
attached to the backbone, whichever delta model added it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from opendelta.markers import delta_parameter_names

__all__ = ["LOG_WIDTH", "ParameterCounts", "count_parameters", "log_model"]

LOG_WIDTH = 160
"""Columns of the printed tree when the output is not a terminal (a terminal's own width is used otherwise)."""


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter totals of a backbone."""

    total: int
    trainable: int
    delta: int

    @property
    def trainable_ratio(self) -> float:
        """Trainable parameters / all parameters."""
        return self.trainable / self.total if self.total else 0.0

    @property
    def delta_ratio(self) -> float:
        """Delta parameters / all parameters."""
        return self.delta / self.total if self.total else 0.0


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Count ``model``'s unique, trainable and delta parameters."""
    deltas = delta_parameter_names(model)
    total = trainable = delta = 0
    for name, param in model.named_parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
        delta += param.numel() if name in deltas else 0
    return ParameterCounts(total, trainable, delta)


_GLUED_TYPE = re.compile(r"(?<=\S)(\[\w+\]\()")
_GLUED_ROWS = re.compile(r"\),(?=\[)")


def tidy_tree(tree: Any) -> Any:
    """Put back the spaces bigmodelvis drops in folded rows: ``0-11 (BertLayer)``, ``q (Linear: ...), k (...)``.

    bigmodelvis writes ``name (Type)`` for a plain row but glues the type to the name of a folded one
    (``query,value(Linear)``); the labels are rich markup, so the fix is on the markup, node by node.
    """
    if isinstance(tree.label, str):
        tree.label = _GLUED_ROWS.sub("), ", _GLUED_TYPE.sub(r" \1", tree.label))
    for child in tree.children:
        tidy_tree(child)
    return tree


def log_model(
    model: nn.Module,
    delta_ratio: bool = True,
    trainable_ratio: bool = True,
    visualization: bool = True,
    cuda_memory: bool = True,
) -> ParameterCounts:
    """Print the structure tree of ``model`` followed by the requested ratios; returns the counts."""
    from bigmodelvis import Visualization
    from rich.console import Console
    from rich.tree import Tree

    console = Console()
    if not console.is_terminal:  # a log file or a captured stream: don't fold long lines at 80 columns
        console = Console(width=max(console.width, LOG_WIDTH))

    counts = count_parameters(model)
    lines = []
    if trainable_ratio:
        lines.append(f"Trainable Ratio: {counts.trainable}/{counts.total}={counts.trainable_ratio:.6%}")
    if delta_ratio:
        lines.append(f"Delta Parameter Ratio: {counts.delta}/{counts.total}={counts.delta_ratio:.6%}")
    if cuda_memory and torch.cuda.is_available():
        lines.append(f"Static Memory {torch.cuda.memory_allocated() / 2**30:.2f} GB")
    if visualization:
        tree = tidy_tree(Visualization(model).structure_graph(printTree=False))
        if lines:
            tree.add("\n".join(lines))
        console.print(tree)
    elif lines:
        console.print(Tree("\n".join(lines)))
    return counts
