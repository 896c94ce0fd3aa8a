"""``BOFTModel``: a butterfly-factorised orthogonal rotation of each modified layer's input, and a scale of its output.

Liu et al., 2024 (https://arxiv.org/abs/2311.06243), with PEFT 0.21.2's ``BOFTModel`` semantics. Each delta is a
parallel one on its layer (see :mod:`opendelta_oft.boft_layer`), so core detaches, merges (``W' = s * (W M^T)``) and
routes it per row like any other parallel delta.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from opendelta.plugin_api import (
    SHARED_POSITIONALS,
    DeltaConfigError,
    DeltaModel,
    Target,
    factory_kwargs,
    linear_features,
)
from opendelta_oft.boft_layer import BOFTRotation
from opendelta_oft.butterfly import butterfly_blocks
from opendelta_oft.config import BOFTConfig
from opendelta_oft.targeting import WholeLinearTargets


class BOFTModel(WholeLinearTargets, DeltaModel):
    """Butterfly Orthogonal Finetuning on a backbone (PEFT 0.21.2's ``BOFTModel`` semantics on linear layers).

    ``BOFTModel(backbone_model=model)`` rotates the input of every self-attention's query and value projections
    (common names ``attn.q``, ``attn.v``; on GPT-2 the whole fused ``c_attn``) with one factor of 4 x 4 blocks and
    scales their outputs, starting at the identity. ``modified_modules=[...]`` chooses other linear layers.
    """

    config_class = BOFTConfig
    default_modified_modules: ClassVar[tuple[str, ...]] = ("attn.q", "attn.v")
    insertion = "parallel"
    positional_args = SHARED_POSITIONALS
    identity_at_init = True
    config: BOFTConfig

    def _build_delta(self, target: Target) -> nn.Module:
        config = self.config
        in_features, out_features = linear_features(target.module)
        try:
            block_num = butterfly_blocks(
                in_features, config.boft_block_size, config.boft_n_butterfly_factor, target.name
            )
        except ValueError as exc:
            raise DeltaConfigError(
                f"BOFTModel: {exc}; choose a boft_block_size and boft_n_butterfly_factor that fit this "
                f"layer, or leave it out with exclude_modules (PEFT raises here too)"
            ) from exc
        return BOFTRotation(
            target.module,
            in_features,
            out_features,
            config.boft_block_size,
            block_num,
            config.boft_n_butterfly_factor,
            dropout=config.boft_dropout,
            init_weights=config.init_weights,
            **factory_kwargs(target.module),  # a quantized layer's compute dtype, never its storage dtype
        )

    def save_peft(self, path: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Export as a PEFT BOFT adapter folder (see :func:`opendelta_oft.peft_boft.save_peft_boft`)."""
        from opendelta_oft.peft_boft import save_peft_boft

        return save_peft_boft(self, path, **kwargs)
