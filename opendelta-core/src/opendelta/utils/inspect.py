"""0.3.2's ``opendelta.utils.inspect``: parameter statistics of a module and of an optimizer, as dicts.

The counts are :func:`opendelta.visualization.count_parameters`'s, the ones ``DeltaModel.log()`` prints: unique
parameters (tied embeddings once), delta parameters being those of every attached delta. 0.3.2's
``inspect_optimizer_statistics`` logged every parameter group but returned only the last group's figures; here it
returns what it logs, every group under ``param_group_<i>``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from opendelta.utils.logging import get_logger
from opendelta.visualization import count_parameters

__all__ = [
    "inspect_module_statistics",
    "inspect_optimizer_statistics",
    "num_delta_parameters",
    "num_total_parameters",
    "num_trainable_parameters",
]

_GIB = 1024**3


def num_trainable_parameters(module: nn.Module) -> int:
    """Parameters of ``module`` that require grad."""
    return count_parameters(module).trainable


def num_total_parameters(module: nn.Module) -> int:
    """Every unique parameter of ``module``."""
    return count_parameters(module).total


def num_delta_parameters(module: nn.Module) -> int:
    """Parameters of the deltas attached to ``module`` (by any delta model)."""
    return count_parameters(module).delta


def inspect_module_statistics(module: nn.Module, verbose: bool = True) -> dict[str, Any]:
    """Total, trainable and delta parameters of ``module``, their ratios, and the CUDA memory in use (GiB).

    Keys as in 0.3.2: ``total_parameters``, ``trainable_parameters``, ``trainable_ratio``, ``delta_parameters``,
    ``delta_ratio``, ``cudamem`` and ``maxcudamem`` (summed over the visible GPUs; 0 without CUDA). ``verbose``
    logs the dict at INFO on the ``opendelta`` logger.
    """
    counts = count_parameters(module)
    devices = range(torch.cuda.device_count())
    stat: dict[str, Any] = {
        "total_parameters": counts.total,
        "trainable_parameters": counts.trainable,
        "trainable_ratio": counts.trainable_ratio,
        "delta_parameters": counts.delta,
        "delta_ratio": counts.delta_ratio,
        "cudamem": sum(torch.cuda.memory_allocated(d) for d in devices) / _GIB,
        "maxcudamem": sum(torch.cuda.max_memory_allocated(d) for d in devices) / _GIB,
    }
    if verbose:
        get_logger(__name__).info(stat)
    return stat


def inspect_optimizer_statistics(optimizer: torch.optim.Optimizer, verbose: bool = True) -> dict[str, dict[str, Any]]:
    """What each parameter group of ``optimizer`` trains: ``{"param_group_0": {...}, "param_group_1": ...}``.

    Each group's entry has ``total_parameters``, ``trainable_parameters``, ``trainable_ratio`` (written as 0.3.2
    wrote it, ``"100.000000%"``) and the group's other options (``lr``, ``weight_decay``...). A frozen parameter
    handed to the optimizer shows as a ratio under 100%: the sign of a delta model set up wrong.
    """
    stats: dict[str, dict[str, Any]] = {}
    for index, group in enumerate(optimizer.param_groups):
        total = sum(p.numel() for p in group["params"])
        trainable = sum(p.numel() for p in group["params"] if p.requires_grad)
        stat: dict[str, Any] = {
            "total_parameters": total,
            "trainable_parameters": trainable,
            "trainable_ratio": f"{(trainable / total if total else 0.0) * 100:.6f}%",
        }
        stat.update((key, value) for key, value in group.items() if key != "params")
        stats[f"param_group_{index}"] = stat
    if verbose:
        get_logger(__name__).info(f"optimizer info: {stats}")
    return stats
