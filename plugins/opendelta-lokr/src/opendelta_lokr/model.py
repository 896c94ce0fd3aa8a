"""``LoKrModel``: a LoKr update placed in parallel to every targeted linear layer."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from torch import nn

from opendelta.plugin_api import DeltaModel, Target, factory_kwargs, is_linear, linear_features, linear_types
from opendelta_lokr.config import LoKrConfig
from opendelta_lokr.layer import LoKrLayer


class LoKrModel(DeltaModel):
    """LoKr on a backbone (LyCORIS's low-rank Kronecker product, as PEFT's ``LoKrModel``).

    ``LoKrModel(backbone_model=model, modified_modules=["query", "value"], r=4)`` adds
    ``(kron(w1, w2) * alpha / r) x`` beside each matched linear layer (``nn.Linear``, GPT-2's ``Conv1D``, a
    registered quantization backend's). With ``modified_modules=None`` it modifies the attention's
    query and value projections (common names ``attn.q``, ``attn.v``), LoRA's defaults (PEFT has no LoKr defaults
    for language models); on a fused projection (GPT-2's ``c_attn``) only the q and v output rows get an update (a
    Kronecker product over those rows).
    Convolutions are not modified. The update merges into the weights (``merge()``, ``merge_and_unload()``).
    """

    config_class = LoKrConfig
    default_modified_modules: ClassVar[tuple[str, ...]] = ("attn.q", "attn.v")
    insertion = "parallel"
    positional_args = (
        "r",
        "alpha",
        "rank_dropout",
        "module_dropout",
        "modified_modules",
        "unfrozen_modules",
        "exclude_modules",
        "common_structure",
        "interactive_modify",
        "backend",
    )
    """``LoKrModel(model, 4, 8)`` binds ``r=4, alpha=8`` (PEFT's order of the fields)."""
    supported_layer_types = linear_types
    supports_fused_targets = True
    config: LoKrConfig

    def _expand_target(self, target: Target) -> list[Target]:
        """With the defaults, a match that is no linear layer is left out; named explicitly, it is refused."""
        if self.config.modified_modules is None and not is_linear(target.module):
            return []
        return [target]

    def _prepare(self, targets: Sequence[Target]) -> None:
        """Record whether a fresh delta leaves the outputs unchanged (not with ``init_weights=False``)."""
        self.identity_at_init = self.config.init_weights is not False

    def _build_delta(self, target: Target) -> nn.Module:
        in_features, out_features = linear_features(target.module)
        placement = factory_kwargs(target.module)  # a quantized layer's compute dtype, never its storage dtype
        r, alpha = self.config.rank_and_alpha(target.name)
        return LoKrLayer(
            in_features,
            out_features,
            r,
            alpha,
            decompose_both=self.config.decompose_both,
            decompose_factor=self.config.decompose_factor,
            rank_dropout=self.config.rank_dropout,
            rank_dropout_scale=self.config.rank_dropout_scale,
            module_dropout=self.config.module_dropout,
            out_index=target.output_index(out_features, device=placement.get("device")),
            init_weights=self.config.init_weights,
            **placement,
        )

    def save_peft(self, path: str | os.PathLike[str]) -> Path:
        """Export in PEFT's LoKr format (see :func:`opendelta_lokr.peft_format.save_peft_lokr`)."""
        from opendelta_lokr.peft_format import save_peft_lokr

        return save_peft_lokr(self, path)
