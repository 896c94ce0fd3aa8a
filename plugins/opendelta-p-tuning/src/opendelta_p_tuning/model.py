"""``PTuningModel``: virtual tokens from a trained prompt encoder in front of the input, on any mapped architecture."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from opendelta.plugin_api import (
    SHARED_POSITIONALS,
    DeltaModel,
    DeltaStateError,
    Target,
    UnsupportedTargetError,
    check_prompt_length,
    factory_kwargs,
    prompt_embeddings,
    prompt_sites,
)
from opendelta_p_tuning.config import PTuningConfig
from opendelta_p_tuning.layer import PromptEncoderLayer


def _is_encoder_decoder(model: nn.Module) -> bool:
    return any(bool(getattr(getattr(m, "config", None), "is_encoder_decoder", False)) for m in model.modules())


class PTuningModel(DeltaModel):
    """P-tuning on a backbone, as PEFT's ``P_TUNING`` computes it.

    ``PTuningModel(backbone_model=model, num_virtual_tokens=20, encoder_hidden_size=128)`` puts 20 virtual tokens in
    front of every input: of the base model for encoders and decoder-only models, of the encoder for
    encoder-decoders. Their embeddings come from a prompt encoder (an MLP or a bidirectional LSTM over
    ``num_virtual_tokens`` learned embeddings) that trains with them. Core places them, as it places a soft prompt
    (``opendelta.prompt``): ``attention_mask`` gains ones and ``token_type_ids`` zeros in front, positions follow
    the prompt, and the prompt rows are cut from the base model's output (an encoder-decoder keeps them in the
    encoder's output, which the decoder attends to through an extended mask).

    ``modified_modules`` may name another module that embeds tokens (with ``get_input_embeddings``); by default the
    input stack is found from the model's config, and a model that embeds no tokens (ViT, CLIP, Whisper) gets the
    prompt in front of the first block of each encoder layer stack. :meth:`fold` replaces the encoder by the prompt
    it computes (PEFT's inference mode, what :meth:`save_peft` writes).
    """

    config_class = PTuningConfig
    insertion = "prompt"
    positional_args = (
        "num_virtual_tokens",
        "encoder_reparameterization_type",
        "encoder_hidden_size",
        *SHARED_POSITIONALS[:-1],
    )
    """``PTuningModel(model, x)`` binds x to ``num_virtual_tokens``."""
    identity_at_init = False
    config: PTuningConfig

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

    @property
    def submodules(self) -> int:
        """PEFT's ``num_transformer_submodules``: set, or 2 on an encoder-decoder (PEFT's seq2seq LM) and else 1."""
        given = self.config.num_transformer_submodules
        if given is not None:
            return given
        return 2 if _is_encoder_decoder(self.backbone_model) else 1

    def _build_delta(self, target: Target) -> nn.Module:
        """The prompt encoder, in the space of the stack's input embeddings."""
        config = self.config
        width = prompt_embeddings(target.module).shape[1]
        layer = PromptEncoderLayer(
            config.num_virtual_tokens,
            width,
            config.num_virtual_tokens * self.submodules,
            None if config.inference_mode else config.encoder_reparameterization_type,
            config.encoder_hidden_size,
            config.encoder_num_layers,
            config.encoder_dropout,
            **factory_kwargs(target.module),
        )
        # after building: an absurd count is refused by core's memory budget (ResourceLimitError, naming it) while
        # the encoder's tensors are requested; a merely too long prompt here, before anything is placed
        check_prompt_length(target.module, config.num_virtual_tokens, "num_virtual_tokens")
        return layer

    def placement_options(self, target: Target) -> dict[str, Any]:
        """The attention mask grows with ones, the token type ids with zeros (as PEFT's SEQ_CLS does)."""
        return {"expand": {"attention_mask": 1, "token_type_ids": 0}}

    def fold(self) -> None:
        """Replace each prompt encoder by the prompt it computes: identical outputs, only the prompt to save.

        The config records ``inference_mode=True`` afterwards, so a checkpoint saved now loads as a plain prompt.

        Raises:
            DeltaStateError: the delta model is detached (fold it while it is attached).
        """
        if not self.attached:
            raise DeltaStateError("fold() needs the prompt encoder attached; call attach() first")
        for layer in self.deltas:
            layer.fold()
        self.config.inference_mode = True

    def save_peft(self, path: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Export in PEFT's ``P_TUNING`` format (see ``peft_format.save_peft_p_tuning``)."""
        from opendelta_p_tuning.peft_format import save_peft_p_tuning

        return save_peft_p_tuning(self, path, **kwargs)
