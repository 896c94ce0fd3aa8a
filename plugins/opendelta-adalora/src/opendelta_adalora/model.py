"""``AdaLoraModel``: SVD-form LoRA beside every targeted linear layer, with AdaLoRA's rank allocation.

The training loop calls :meth:`AdaLoraModel.update_and_allocate` after ``backward()`` (and ``optimizer.step()``)
and before ``zero_grad()``, and adds :meth:`AdaLoraModel.orthogonal_regularization` to its loss, as PEFT's
``AdaLoraModel`` asks (PEFT adds the regulariser inside its forward; here it is an explicit term). Without those
calls the model is plain SVD-form LoRA. ``opendelta_adalora.AdaLoraTrainer`` does both for a transformers Trainer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from opendelta.plugin_api import (
    SHARED_POSITIONALS,
    DeltaConfigError,
    DeltaModel,
    DeltaStateError,
    Target,
    factory_kwargs,
    is_linear,
    linear_features,
    linear_types,
)
from opendelta_adalora.allocator import RankAllocator
from opendelta_adalora.config import AdaLoraConfig
from opendelta_adalora.layer import AdaLoraLayer

_PARTS = ("lora_A", "lora_E", "lora_B")


class AdaLoraModel(DeltaModel):
    """AdaLoRA on a backbone (Zhang et al., 2023; PEFT 0.21.2's ``AdaLoraModel`` semantics).

    ``AdaLoraModel(backbone_model=model, total_step=1000)`` adds ``lora_alpha / init_r * B (E * A) x`` beside the
    attention's query and value projections (common names ``attn.q``, ``attn.v``), each of rank ``init_r``; on a
    fused projection (GPT-2's ``c_attn``) only the q and v output rows get an update. ``modified_modules=[...]``
    chooses other linear layers.
    """

    config_class = AdaLoraConfig
    default_modified_modules: ClassVar[tuple[str, ...]] = ("attn.q", "attn.v")
    insertion = "parallel"
    positional_args = SHARED_POSITIONALS
    supported_layer_types = linear_types
    supports_fused_targets = True
    identity_at_init = True
    config: AdaLoraConfig

    def _expand_target(self, target: Target) -> list[Target]:
        """With the defaults, a module that is no linear layer is left out; named explicitly, core refuses it."""
        if self.config.modified_modules is None and not is_linear(target.module):
            return []
        return [target]

    def _build_delta(self, target: Target) -> nn.Module:
        in_features, out_features = linear_features(target.module)
        placement = factory_kwargs(target.module)  # a quantized layer's compute dtype, never its storage dtype
        pattern = (self.config.rank_pattern or {}).get(target.name)
        return AdaLoraLayer(
            in_features,
            out_features,
            self.config.init_r,
            self.config.lora_alpha,
            pattern=pattern,
            dropout=self.config.lora_dropout,
            out_index=target.output_index(out_features, device=placement.get("device")),
            **placement,
        )

    # ------------------------------------------------------------------------------------------ training
    def adalora_layers(self) -> dict[str, AdaLoraLayer]:
        """The placed layers by the name of the module each modifies, in the backbone's order."""
        return {t.name: i.delta for t, i in self.placements() if isinstance(i.delta, AdaLoraLayer)}

    def orthogonal_regularization(self) -> torch.Tensor:
        """``orth_reg_weight`` times the mean of ``||A A^T - I||_F`` and ``||B^T B - I||_F`` over the layers.

        The term PEFT's ``AdaLoraModel.forward`` adds to ``outputs.loss``: add it to the training loss
        (``loss = outputs.loss + delta_model.orthogonal_regularization()``). Zero when there is no layer.
        """
        terms = [term for layer in self.adalora_layers().values() for term in layer.orthogonality()]
        if not terms:
            return torch.zeros(())
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return self.config.orth_reg_weight * (total / len(terms))

    def update_and_allocate(self, global_step: int) -> None:
        """Score the triplets and mask them to this step's budget; call after ``backward()``, before ``zero_grad()``.

        ``global_step`` counts optimizer steps from 0. Before ``total_step - tfinal`` the scores are updated and,
        past ``tinit`` every ``deltaT`` steps, the least important triplets get ``E = 0``; at ``total_step -
        tfinal`` the final allocation is made and recorded as ``config.rank_pattern``; after it the pattern is
        applied again each step (the masked ``E`` entries are set back to zero).

        Raises:
            DeltaConfigError: ``config.total_step`` is not set.
            DeltaStateError: merged (masking ``E`` would change the update unmerging subtracts), or a step past the
                final allocation with no ``rank_pattern`` to apply.
        """
        if self.merged:
            raise DeltaStateError(
                "AdaLoraModel.update_and_allocate() while merged would change the update that unmerge() subtracts; "
                "unmerge() first (train unmerged)"
            )
        config = self.config
        if config.total_step is None:
            raise DeltaConfigError(
                "AdaLoraConfig.total_step is required to allocate ranks: set it to the number of training steps "
                "(AdaLoraModel(..., total_step=N), or delta_model.config.total_step = N)"
            )
        layers = self.adalora_layers()
        allocator: RankAllocator | None = getattr(self, "_allocator", None)
        if allocator is None:  # sized on the first call, from the layers as they are then (as PEFT at build)
            allocator = self._allocator = RankAllocator(config, layers)
        final = config.total_step - config.tfinal
        if global_step < final:
            allocator.update_ipt(layers)
            budget, mask = allocator.budget_schedule(global_step)
            if mask:
                self._record_pattern(layers, allocator.mask_to_budget(layers, budget))
        elif global_step == final:
            budget, _ = allocator.budget_schedule(global_step)
            self._record_pattern(layers, allocator.mask_to_budget(layers, budget))
            allocator.reset_ipt()
        else:
            self.mask_using_rank_pattern()

    def _record_pattern(self, layers: dict[str, AdaLoraLayer], kept: dict[str, list[bool]]) -> None:
        pattern = dict(self.config.rank_pattern or {})
        pattern.update({name: layers[name].full_pattern(flags) for name, flags in kept.items()})
        self.config.rank_pattern = pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self) -> None:
        """Zero ``E`` of every triplet ``config.rank_pattern`` does not keep.

        Raises:
            DeltaStateError: there is no ``rank_pattern`` (no allocation was made).
        """
        pattern = self.config.rank_pattern
        if not pattern:
            raise DeltaStateError(
                "AdaLoraModel has no rank_pattern to apply: update_and_allocate() must have been called at step "
                "total_step - tfinal (the final allocation) before the later steps"
            )
        for name, layer in self.adalora_layers().items():
            if name in pattern:
                kept = torch.tensor(layer.rows_kept(pattern[name]), dtype=torch.bool, device=layer.lora_E.device)
                layer.lora_E.masked_fill_(~kept.view(-1, 1), 0.0)

    # ------------------------------------------------------------------------------------------ saving
    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """The delta tensors, each layer's limited to the triplets ``config.rank_pattern`` keeps.

        A layer trained full size and then allocated is saved with its pruned triplets left out, the config
        recording ``rank_pattern``; a model rebuilt from that config gives each layer just those triplets (and the
        same scale, ``lora_alpha / init_r``), so it computes what the masked model did.
        """
        state = super().delta_state_dict()
        pattern = self.config.rank_pattern or {}
        for target, insertion in self.placements():
            layer = insertion.delta
            if not isinstance(layer, AdaLoraLayer) or target.name not in pattern:
                continue
            kept = layer.rows_kept(pattern[target.name])
            if all(kept):
                continue
            prefix = f"{target.host_name}.{insertion.base_name}" if target.host_name else insertion.base_name
            rows = torch.tensor(kept, dtype=torch.bool, device=layer.lora_A.device)
            state[f"{prefix}.lora_A"] = layer.lora_A.detach()[rows]
            state[f"{prefix}.lora_E"] = layer.lora_E.detach()[rows]
            state[f"{prefix}.lora_B"] = layer.lora_B.detach()[:, rows]
        return state

    def save_peft(self, path: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Export in PEFT's AdaLoRA format (see ``peft_format.save_peft_adalora``), which PEFT loads."""
        from opendelta_adalora.peft_format import save_peft_adalora

        return save_peft_adalora(self, path, **kwargs)
