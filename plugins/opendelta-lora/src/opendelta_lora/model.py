"""``LoraModel``: LoRA placed in parallel to every targeted linear layer, or on every stacked expert weight."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from opendelta.plugin_api import (
    DeltaConfigError,
    DeltaModel,
    Target,
    expert_targets,
    factory_kwargs,
    is_linear,
    is_quantized,
    linear_features,
    linear_types,
    stack_layout,
    stacked_parameters,
    stored_update,
)
from opendelta_lora.config import LoraConfig
from opendelta_lora.dora import DoraLayer
from opendelta_lora.expert_layer import ExpertLoraLayer
from opendelta_lora.layer import LoraLayer


class LoraModel(DeltaModel):
    """LoRA on a backbone (manual section 1.21.1).

    ``LoraModel(backbone_model=model, modified_modules=["key"], lora_r=1)`` adds ``(alpha/r) B A x`` beside each
    matched linear layer (``nn.Linear`` or GPT-2's ``Conv1D``). With ``modified_modules=None`` it modifies the
    attention's query and value projections (common names ``attn.q``, ``attn.v``), as the paper does; on a fused
    projection (GPT-2's ``c_attn``, Phi-3's ``qkv_proj``, GPT-NeoX's per-head interleaved ``query_key_value``) only
    the q and v output rows get an update, wherever the mapping's split says they lie.

    The experts of a sparse mixture-of-experts block (``modified_modules=["ff.experts"]``, or the real
    ``mlp.experts``) get one update per expert and weight: on transformers 5, whose experts hold their weights as
    3-D parameters, an :class:`~opendelta_lora.expert_layer.ExpertLoraLayer` on each (``gate_up_proj``,
    ``down_proj``); on 4.57, whose experts are a list of MLPs, a :class:`LoraLayer` beside every linear layer of
    every expert. Either way each token is computed with the updated weights of the experts it was routed to.
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
    low_rank_fields = ("lora_r", "lora_alpha")
    config: LoraConfig

    def _expand_target(self, target: Target) -> list[Target]:
        """A module of experts becomes its stacked weights (transformers 5) or its experts' linear layers (4.57)."""
        if is_linear(target.module):
            return [target]
        return expert_targets(target) or [target]

    def supports(self, module: nn.Module) -> bool:
        """Linear layers, and experts modules holding stacked weights (each weight is then a target of its own)."""
        return is_linear(module) or bool(stacked_parameters(module))

    def _prepare(self, targets: Sequence[Target]) -> None:
        """Refuse dropout on stacked expert weights: the update is added to the weight, there is no branch input.

        Also refuse PiSSA and OLoRA where there is no float weight to start from (stacked expert weights, quantized
        layers), DoRA on stacked expert weights, and record whether a fresh delta leaves the outputs unchanged (not
        with ``init_lora_weights=False``).
        """
        self.identity_at_init = self.config.init_lora_weights is not False
        stacked = [f"{t.name}.{t.parameter}" for t in targets if t.parameter is not None]
        if self.config.rewrites_base:
            quantized = [t.name for t in targets if t.parameter is None and is_quantized(t.module)]
            refused = stacked + quantized
            if refused:
                raise DeltaConfigError(
                    f"LoraConfig.init_lora_weights={self.config.init_lora_weights!r} starts from a float weight, "
                    f"which {', '.join(refused[:3])}{'...' if len(refused) > 3 else ''} "
                    f"{'are stacked expert weights' if stacked else 'is quantized'} without; initialise these with "
                    f"True, False or 'gaussian' (or PiSSA the float model, as PEFT advises, then quantize)"
                )
        if self.config.max_rank is not None and (stacked or self.config.use_dora or self.config.rewrites_base):
            what = "stacked expert weights" if stacked else "DoRA" if self.config.use_dora else "PiSSA or OLoRA"
            raise DeltaConfigError(
                f"LoraConfig.max_rank={self.config.max_rank} applies to plain LoRA layers only, not to {what}; set "
                f"max_rank=None (their checkpoints hot-load at the same rank)"
            )
        if stacked and self.config.use_dora:
            raise DeltaConfigError(
                f"LoraConfig.use_dora=True cannot apply to stacked expert weights "
                f"({', '.join(stacked[:3])}{'...' if len(stacked) > 3 else ''}): DoRA rescales a layer's outputs, "
                f"and these weights are read inside the experts' own forward (PEFT refuses DoRA on target_parameters "
                f"too); set use_dora=False, or target linear layers"
            )
        if stacked and self.config.lora_dropout:
            raise DeltaConfigError(
                f"LoraConfig.lora_dropout={self.config.lora_dropout} cannot apply to stacked expert weights "
                f"({', '.join(stacked[:3])}{'...' if len(stacked) > 3 else ''}): their update is added to the weight "
                f"the experts read, with no separate branch input to drop; set lora_dropout=0 for the experts"
            )

    def _build_delta(self, target: Target) -> nn.Module:
        if target.parameter is not None:
            return ExpertLoraLayer(
                stack_layout(target.module, target.parameter),
                target.parameter,
                r=self.config.lora_r,
                alpha=self.config.lora_alpha,
                use_rslora=self.config.use_rslora,
                init_lora_weights=self.config.init_lora_weights,
                **factory_kwargs(target.module),
            )
        in_features, out_features = linear_features(target.module)
        placement = factory_kwargs(target.module)  # a quantized layer's compute dtype, never its storage dtype
        out_index = target.output_index(out_features, device=placement.get("device"))
        base = None
        if self.config.rewrites_base:  # the [out, in] rows the update writes to, read (never written)
            base = stored_update(target.module, target.module.weight.detach())
            base = base if out_index is None else base.index_select(0, out_index.to(base.device))
        layer_cls, extra = (DoraLayer, {"host": target.module}) if self.config.use_dora else (LoraLayer, {})
        return layer_cls(
            in_features,
            out_features,
            r=self.config.lora_r,
            alpha=self.config.lora_alpha,
            dropout=self.config.lora_dropout,
            out_index=out_index,
            use_rslora=self.config.use_rslora,
            init_lora_weights=self.config.init_lora_weights,
            base_weight=base,
            max_rank=self.config.max_rank,
            **extra,
            **placement,
        )

    def save_peft(self, path: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Export in PEFT's format (see ``peft_format.save_peft_adapter``; warns when vLLM/TGI would refuse it)."""
        from opendelta_lora.peft_format import save_peft_adapter

        return save_peft_adapter(self, path, **kwargs)
