"""LoRA+: the ``B`` matrices learn ``loraplus_lr_ratio`` times faster than the ``A`` matrices.

Hayou et al., 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models" (https://arxiv.org/abs/2402.12354).

:func:`create_loraplus_optimizer` groups parameters as PEFT's ``peft.optimizers.create_loraplus_optimizer`` does:
every trainable parameter of the backbone (the deltas and whatever else trains, a task head) is in group A (``lr``,
``loraplus_weight_decay``) unless it is a LoRA ``B`` matrix or one-dimensional (a bias, a norm's scale): those get
``lr * loraplus_lr_ratio``, with ``loraplus_weight_decay`` where PEFT decays them (not a bias, not inside an
``nn.LayerNorm``) and none otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from opendelta.plugin_api import DeltaModel

__all__ = ["create_loraplus_optimizer"]


def _parameters(delta_model: DeltaModel) -> list[tuple[str, nn.Parameter, nn.Module]]:
    """Every trainable parameter of the backbone with its name and owning module; detached deltas' too."""
    found: list[tuple[str, nn.Parameter, nn.Module]] = []
    seen: set[int] = set()
    for module_name, module in delta_model.backbone_model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                found.append((f"{module_name}.{name}" if module_name else name, param, module))
    for module_name, module in delta_model.named_modules():  # deltas out of the backbone (detached) train too
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                found.append((f"{module_name}.{name}" if module_name else name, param, module))
    return found


def create_loraplus_optimizer(
    delta_model: DeltaModel,
    optimizer_cls: type[torch.optim.Optimizer],
    lr: float,
    loraplus_lr_ratio: float = 16,
    loraplus_weight_decay: float = 0.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An ``optimizer_cls`` over ``delta_model``'s trainable parameters with LoRA+'s learning rates.

    Args:
        delta_model: a LoRA delta model (its backbone frozen as wanted first: ``freeze_module``).
        optimizer_cls: the optimizer class (``torch.optim.AdamW``).
        lr: the learning rate of the ``A`` matrices (and of every other trainable matrix).
        loraplus_lr_ratio: ``lr_B / lr_A``; 16 by default (the paper's recommendation; PEFT has no default).
        loraplus_weight_decay: the weight decay of every group but the ``B`` group's biases and norms (0.0, PEFT's).
        kwargs: passed to ``optimizer_cls`` (``betas``, ``eps``...); a ``weight_decay`` there is overridden by each
            group's.

    Returns:
        The optimizer; its groups are A (``lr``), B (``lr * ratio``, decayed) and B without decay (``lr * ratio``),
        those that hold parameters, in that order.

    Raises:
        ValueError: nothing trains, or ``lr``/``loraplus_lr_ratio`` is not positive.
    """
    if not lr > 0 or not loraplus_lr_ratio > 0:
        raise ValueError(f"lr and loraplus_lr_ratio must be > 0, got lr={lr}, loraplus_lr_ratio={loraplus_lr_ratio}")
    b_matrices = {id(p) for name, p in delta_model.named_parameters() if name.rpartition(".")[2] == "lora_B"}
    groups: dict[str, list[nn.Parameter]] = {"A": [], "B": [], "B_no_decay": []}
    for name, param, module in _parameters(delta_model):
        if id(param) in b_matrices or param.ndim == 1:
            decays = "bias" not in name and not isinstance(module, nn.LayerNorm)  # PEFT's decay_parameters
            groups["B" if decays else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    if not any(groups.values()):
        raise ValueError(f"{type(delta_model).__name__} has no trainable parameter for LoRA+ to optimise")
    settings = {
        "A": {"lr": lr, "weight_decay": loraplus_weight_decay},
        "B": {"lr": lr * loraplus_lr_ratio, "weight_decay": loraplus_weight_decay},
        "B_no_decay": {"lr": lr * loraplus_lr_ratio, "weight_decay": 0.0},
    }
    param_groups = [{"params": params, **settings[key]} for key, params in groups.items() if params]
    return optimizer_cls(param_groups, lr=lr, **kwargs)
