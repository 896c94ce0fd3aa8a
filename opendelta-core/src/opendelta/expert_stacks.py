"""Mixture-of-experts weights stored as stacks: what a delta on "the experts" has to know about them.

Foundation layer. transformers 5 keeps a sparse block's experts in one module whose weights are 3-D parameters, one
slice per expert (Mixtral's ``gate_up_proj`` ``[experts, 2 * intermediate, hidden]`` and ``down_proj``
``[experts, hidden, intermediate]``), and runs expert ``e`` on its tokens as ``F.linear(x, weight[e])``; transformers
4.57 keeps an ``nn.ModuleList`` of one MLP per expert, made of ordinary linear layers. A delta that modifies an expert
weight must change each slice as the experts' own code reads it, so the per-token routing stays the model's.

Some implementations store each slice transposed (``[experts, in, out]``, run as ``x @ weight[e]``) and say so with
``is_transposed = True`` on the module (transformers' ``use_experts_implementation``); :func:`stack_layout` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["StackLayout", "is_expert_list", "stack_layout", "stacked_parameters"]

EXPERTS_NAME = "experts"
"""The attribute name every transformers MoE block gives its experts, and the common name ``ff.experts`` ends in."""


def stacked_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The module's own 3-D floating-point parameters whose first dimension is the same: its stacked expert weights.

    Empty for any other module (a linear layer's weight is 2-D; a stack's biases ``[experts, out]`` are 2-D too and
    are left out). Parameters of submodules are not the module's own and are not looked at.
    """
    stacked = {
        name: param
        for name, param in module._parameters.items()
        if param is not None and param.dim() == 3 and param.is_floating_point()
    }
    if len({param.shape[0] for param in stacked.values()}) > 1:
        return {}  # 3-D parameters of different leading sizes are not one stack of experts
    return stacked


@dataclass(frozen=True)
class StackLayout:
    """How one stacked parameter holds its experts' weights."""

    num_experts: int
    in_features: int
    out_features: int
    transposed: bool
    """``True``: each slice is ``[in, out]`` (run as ``x @ w``); ``False``: ``[out, in]`` (``F.linear(x, w)``)."""


def stack_layout(module: nn.Module, name: str) -> StackLayout:
    """The layout of ``module``'s stacked parameter ``name``.

    Raises:
        ValueError: ``name`` is not one of :func:`stacked_parameters` of ``module`` (the message names them).
    """
    stacked = stacked_parameters(module)
    if name not in stacked:
        raise ValueError(
            f"{type(module).__name__}.{name} is not a stacked expert weight (a 3-D parameter [experts, out, in]); "
            f"its stacked parameters are {sorted(stacked) or 'none'}"
        )
    num_experts, first, second = stacked[name].shape
    transposed = bool(getattr(module, "is_transposed", False))
    in_features, out_features = (first, second) if transposed else (second, first)
    return StackLayout(int(num_experts), int(in_features), int(out_features), transposed)


def is_expert_list(name: str, module: nn.Module) -> bool:
    """Whether ``module`` (named ``name`` in its model) is a list of experts: an ``nn.ModuleList`` called ``experts``.

    transformers 4.57's sparse blocks hold their experts so (``block_sparse_moe.experts.3.w1``); a delta addressed to
    the experts then modifies the linear layers of every expert in it.
    """
    return isinstance(module, nn.ModuleList) and name.rpartition(".")[2] == EXPERTS_NAME
