"""``LNTuningModel``: a trainable offset on the weight and bias of every layer norm of the blocks.

Targets "broadcast" to the layer norms inside them, as BitFit's do: targeting ``attn`` means every layer norm in the
attention. Each norm yields one target per parameter it has (``weight``, and ``bias`` where it is not ``None``),
placed by core's "parameter" placement, so the norm's own forward runs with ``(w + dw, b + db)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from opendelta.plugin_api import (
    SHARED_POSITIONALS,
    DeltaModel,
    Target,
    backbone_submodules,
    is_norm,
)
from opendelta_ln_tuning.config import LNTuningConfig
from opendelta_ln_tuning.layer import AffineAfterNorm, NormOffset

NORM_PARAMETERS: tuple[str, ...] = ("weight", "bias")
"""The parameters of a norm that LN tuning trains, where the norm has them."""


def norm_parameters(module: nn.Module) -> list[str]:
    """The parameters of ``module`` LN tuning trains: its ``weight`` and ``bias``, those it has."""
    return [n for n in NORM_PARAMETERS if isinstance(module._parameters.get(n), torch.Tensor)]


def is_layer_norm(module: nn.Module) -> bool:
    """A layer norm, with parameters (``is_norm``) or without (OLMo's non-affine ``OlmoLayerNorm``)."""
    return (
        is_norm(module) or isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))
    )


class LNTuningModel(DeltaModel):
    """LN tuning on a backbone (Zhao et al., 2023; PEFT's ``LNTuningModel`` semantics).

    ``LNTuningModel(backbone_model=model)`` trains every layer norm the common structure names (common name
    ``layer_norm``: the attention's, the feed-forward block's and the stacks' final norms; LayerNorm and RMSNorm
    alike). ``modified_modules=[...]`` chooses other norms, or modules whose norms are all trained.

    Each norm parameter gets a :class:`~opendelta_ln_tuning.NormOffset` (child ``ln_tuning_weight`` /
    ``ln_tuning_bias``, zero at init): the norm computes with ``w + dw`` and ``b + db``, as PEFT's trained copy does,
    while the backbone's parameters are never written (``detach()`` is exact; ``merge()`` adds the offsets).
    """

    config_class = LNTuningConfig
    default_modified_modules: ClassVar[tuple[str, ...]] = ("layer_norm",)
    insertion = "after"
    positional_args = SHARED_POSITIONALS
    identity_at_init = True
    config: LNTuningConfig

    def supports(self, module: nn.Module) -> bool:
        """Layer norms (torch's LayerNorm/RMSNorm, transformers' ``*LayerNorm``/``*RMSNorm``), affine or not."""
        return is_layer_norm(module)

    def _expand_target(self, target: Target) -> list[Target]:
        """A norm yields one target per parameter (one after it when it has none); another module, its norms'."""
        if is_layer_norm(target.module):
            found = [(target.name, target.module)]
        else:
            found = backbone_submodules(target.module, target.name, is_layer_norm)
        targets = []
        for name, module in found:
            common = target.common_name if module is target.module else None
            parameters = norm_parameters(module) or [None]  # a non-affine norm: an affine transform after it
            targets += [Target(name, module, common, parameter=parameter) for parameter in parameters]
        return targets

    def _build_delta(self, target: Target) -> nn.Module:
        """A zero offset shaped like the norm's parameter; after a norm without parameters, a zero affine map."""
        if target.parameter is None:
            _in, out = self.features(target.module)
            return AffineAfterNorm(out)
        param = target.module._parameters[target.parameter]
        return NormOffset(target.parameter, param.numel(), device=param.device, dtype=param.dtype)

    def save_peft(self, path: str | os.PathLike[str], *, task_type: str | None = None) -> Path:
        """Export in PEFT's LN tuning format (see ``peft_format.save_peft_ln_tuning``)."""
        from opendelta_ln_tuning.peft_format import save_peft_ln_tuning

        return save_peft_ln_tuning(self, path, task_type=task_type)
