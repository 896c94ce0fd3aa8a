"""``LNTuningModel``: a trainable offset on the weight and bias of every layer norm of the blocks.

Targets "broadcast" to the layer norms inside them, as BitFit's do: targeting ``attn`` means every layer norm in the
attention. Each norm yields one target per parameter it has (``weight``, and ``bias`` where it is not ``None``),
placed by core's "parameter" placement, so the norm's own forward runs with ``(w + dw, b + db)``.
"""

from __future__ import annotations

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
from opendelta_ln_tuning.layer import NormOffset

NORM_PARAMETERS: tuple[str, ...] = ("weight", "bias")
"""The parameters of a norm that LN tuning trains, where the norm has them."""


def _norm_parameters(module: nn.Module) -> list[str]:
    return [n for n in NORM_PARAMETERS if isinstance(module._parameters.get(n), torch.Tensor)]


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
        """Layer norms (torch's LayerNorm/RMSNorm, transformers' ``*LayerNorm``/``*RMSNorm``) with a weight."""
        return is_norm(module) and bool(_norm_parameters(module))

    def _expand_target(self, target: Target) -> list[Target]:
        """A norm yields one target per parameter; another module, those of every norm inside it."""
        if is_norm(target.module):
            found = [(target.name, target.module)]
        else:
            found = backbone_submodules(target.module, target.name, is_norm)
        return [
            Target(name, module, target.common_name if module is target.module else None, parameter=parameter)
            for name, module in found
            for parameter in _norm_parameters(module)
        ]

    def _build_delta(self, target: Target) -> nn.Module:
        """A zero offset shaped like the norm's parameter."""
        name = target.parameter or "weight"
        param = target.module._parameters[name]
        return NormOffset(name, param.numel(), device=param.device, dtype=param.dtype)
