"""Freezing: which parameters train, and a ``state_dict`` that holds only those.

``freeze_module(exclude=["deltas", "classifier"])`` leaves trainable every delta parameter (the keyword
``"deltas"``) and every parameter under a module matched by the other patterns (name-based addressing rules, so
``"classifier"``, ``"bias"`` or ``"3.ffn.lin2"`` all work); everything else gets ``requires_grad=False``.

With ``set_state_dict=True`` the model's ``state_dict()`` keeps only parameters that require grad. This is a
``state_dict`` post-hook evaluated at each call, not a snapshot of names: freezing twice, or creating parameters
later, keeps it right.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from opendelta.addressing import compile_patterns, is_excluded
from opendelta.insertion import delta_parameter_names

__all__ = ["DELTAS_KEYWORD", "freeze_module", "trainable_only_state_dict", "trainable_parameter_names"]

DELTAS_KEYWORD = "deltas"
_STATE_DICT_HANDLE = "_opendelta_state_dict_handle"


def freeze_module(module: nn.Module, exclude: Sequence[str] | None = None, set_state_dict: bool = True) -> None:
    """Freeze ``module``'s parameters except the delta ones and those matched by ``exclude``.

    Args:
        module: usually the backbone.
        exclude: patterns of what stays trainable; ``"deltas"`` means every delta parameter.
            ``None`` means ``["deltas"]``.
        set_state_dict: make ``module.state_dict()`` return only the trainable parameters.
    """
    exclude = [DELTAS_KEYWORD] if exclude is None else list(exclude)
    keep_deltas = DELTAS_KEYWORD in exclude
    patterns = compile_patterns([e for e in exclude if e != DELTAS_KEYWORD], argument="exclude")
    deltas = delta_parameter_names(module)
    for name, param in module.named_parameters():
        param.requires_grad = (keep_deltas and name in deltas) or is_excluded(name, patterns)
    if set_state_dict:
        trainable_only_state_dict(module)


def trainable_parameter_names(module: nn.Module) -> set[str]:
    """Every name under which a trainable parameter appears in ``module.state_dict()`` (tied names included)."""
    return {n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}


class _KeepTrainable:
    """``state_dict`` post-hook that drops frozen parameters and buffers (picklable, so the model stays so)."""

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        keep = {prefix + n for n in trainable_parameter_names(module)}
        for key in [k for k in state_dict if k.startswith(prefix) and k not in keep]:
            del state_dict[key]


def trainable_only_state_dict(module: nn.Module, enable: bool = True) -> None:
    """Make ``module.state_dict()`` hold only trainable parameters (``enable=False`` restores the full one)."""
    handle = getattr(module, _STATE_DICT_HANDLE, None)
    if enable and handle is None:
        setattr(module, _STATE_DICT_HANDLE, module.register_state_dict_post_hook(_KeepTrainable()))
    elif not enable and handle is not None:
        handle.remove()
        delattr(module, _STATE_DICT_HANDLE)
