"""``SoftPromptModel``: learned embeddings in front of the input, on any mapped architecture."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opendelta.plugin_api import (
    SHARED_POSITIONALS,
    DeltaModel,
    Target,
    UnsupportedTargetError,
    check_prompt_length,
    prompt_embeddings,
    prompt_sites,
)
from opendelta_soft_prompt.config import SoftPromptConfig
from opendelta_soft_prompt.layer import SoftPromptLayer


class SoftPromptModel(DeltaModel):
    """Soft prompt tuning on a backbone (manual section 1.21.7).

    ``SoftPromptModel(backbone_model=model, soft_token_num=100)`` puts 100 learned embeddings in front of every
    input: of the base model for encoders and decoder-only models, of the encoder for encoder-decoders. Core does
    the placing (``opendelta.prompt``): through the input stack's own embeddings, so wrapped models and task heads
    without ``get_input_embeddings`` at the top work; with new, extended ``attention_mask``/``token_type_ids``
    tensors (the caller's are never modified, unlike the original); and with the prompt rows cut from the output, so
    heads and labels keep the bare model's shapes. ``generate()`` works with the key/value cache.

    ``modified_modules`` may name another module that embeds tokens (it must have ``get_input_embeddings``); by
    default the input stack is found from the model's config. A model that embeds no tokens (ViT, CLIP, Whisper)
    gets the prompt in front of the first block of each encoder layer stack instead (Visual Prompt Tuning), starting
    at random (``init_range``: there is no vocabulary for ``token_init`` to copy).
    """

    config_class = SoftPromptConfig
    insertion = "prompt"
    positional_args = (
        "soft_token_num",
        "init_range",
        "token_init",
        "other_expand_ids",
        *SHARED_POSITIONALS[:-1],  # the manual's signature has no backend
    )
    """The manual's positional order: ``SoftPromptModel(model, x)`` binds x to ``soft_token_num``."""
    identity_at_init = False
    config: SoftPromptConfig

    def _resolve_targets(self) -> list[Target]:
        """The input stack (each encoder's first block on a model without tokens), or what modified_modules names."""
        if self.config.modified_modules is None:
            return [Target(name, site) for name, site in prompt_sites(self.backbone_model)]
        targets = super()._resolve_targets()
        if len(targets) != 1 or not callable(getattr(targets[0].module, "get_input_embeddings", None)):
            raise UnsupportedTargetError(
                f"{type(self).__name__} needs exactly one module that embeds tokens (with get_input_embeddings); "
                f"modified_modules={self.config.modified_modules!r} designates {[t.name for t in targets]}"
            )
        return targets

    def placement_options(self, target: Target) -> dict[str, Any]:
        """Which inputs grow with the prompt (``other_expand_ids``)."""
        return {"expand": dict(self.config.other_expand_ids)}

    def _build_delta(self, target: Target) -> nn.Module:
        """The prompt, in the space of the stack's input embeddings."""
        check_prompt_length(target.module, self.config.soft_token_num, "soft_token_num")
        embeddings = prompt_embeddings(target.module)
        return SoftPromptLayer(self.config.soft_token_num, embeddings, self.config.token_init, self.config.init_range)

    def save_peft(self, path: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Export in PEFT's ``PROMPT_TUNING`` format (see ``peft_format.save_peft_prompt_tuning``)."""
        from opendelta_soft_prompt.peft_format import save_peft_prompt_tuning

        return save_peft_prompt_tuning(self, path, **kwargs)

    @classmethod
    def translate_legacy_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Read an OpenDelta 0.3.x config: it always recorded ``modified_modules=["root"]``, which it ignored."""
        if config.get("modified_modules") == ["root"]:
            config = {**config, "modified_modules": None, "common_structure": None}
        return config

    def translate_legacy_state_dict(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Read an OpenDelta 0.3.x checkpoint, whose one prompt tensor is under the original's name.

        That was ``<model or encoder>.soft_prompt_layer.soft_embeds``; here the prompt sits in front of the input
        stack, under :meth:`delta_state_dict`'s name.
        """
        legacy = [n for n in tensors if n.split(".")[-2:] == ["soft_prompt_layer", "soft_embeds"]]
        ours = [n for n in self.delta_state_dict() if n.endswith(".soft_embeds")]
        if len(legacy) != 1 or len(ours) != 1:
            return tensors  # not the original's layout: the names are checked (and refused) as they are
        out = {n: t for n, t in tensors.items() if n != legacy[0]}
        out[ours[0]] = tensors[legacy[0]]
        return out
