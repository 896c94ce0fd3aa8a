"""``LoraModel``: LoRA placed in parallel to every targeted linear layer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from opendelta.plugin_api import DeltaModel, Target, linear_features, linear_types
from opendelta_lora.config import LoraConfig
from opendelta_lora.layer import LoraLayer


class LoraModel(DeltaModel):
    """LoRA on a backbone (manual section 1.21.1).

    ``LoraModel(backbone_model=model, modified_modules=["key"], lora_r=1)`` adds ``(alpha/r) B A x`` beside each
    matched linear layer (``nn.Linear`` or GPT-2's ``Conv1D``). With ``modified_modules=None`` it modifies the
    attention's query and value projections (common names ``attn.q``, ``attn.v``), as the paper does; on a fused
    projection (GPT-2's ``c_attn``, Phi-3's ``qkv_proj``, GPT-NeoX's per-head interleaved ``query_key_value``) only
    the q and v output rows get an update, wherever the mapping's split says they lie.
    """

    config_class = LoraConfig
    default_modified_modules: ClassVar[tuple[str, ...]] = ("attn.q", "attn.v")
    insertion = "parallel"
    positional_args = (
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "modified_modules",
        "unfrozen_modules",
        "exclude_modules",
        "common_structure",
        "interactive_modify",
        "backend",
    )
    """The manual's positional order: ``LoraModel(model, x)`` binds x to ``lora_r``."""
    supported_layer_types = linear_types
    supports_fused_targets = True
    config: LoraConfig

    def _build_delta(self, target: Target) -> nn.Module:
        in_features, out_features = linear_features(target.module)
        weight = target.module.weight
        return LoraLayer(
            in_features,
            out_features,
            r=self.config.lora_r,
            alpha=self.config.lora_alpha,
            dropout=self.config.lora_dropout,
            out_index=target.output_index(out_features, device=weight.device),
            device=weight.device,
            dtype=weight.dtype,
        )

    def save_peft(self, path: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Export in PEFT's format (see ``peft_format.save_peft_adapter``; warns when vLLM/TGI would refuse it)."""
        from opendelta_lora.peft_format import save_peft_adapter

        return save_peft_adapter(self, path, **kwargs)
