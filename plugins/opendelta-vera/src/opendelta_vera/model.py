"""``VeraModel``: VeRA placed in parallel to every targeted linear layer, all of them sharing one pair of matrices."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from opendelta.plugin_api import (
    SHARED_POSITIONALS,
    DeltaModel,
    Target,
    factory_kwargs,
    is_linear,
    linear_features,
)
from opendelta_vera.config import VeraConfig
from opendelta_vera.layer import VeraLayer
from opendelta_vera.projections import draw_projections


class VeraModel(DeltaModel):
    """VeRA on a backbone (Kopiczko et al., 2024; PEFT 0.21.2's ``VeraModel`` semantics).

    ``VeraModel(backbone_model=model)`` adds ``lambda_b * B (lambda_d * A x)`` beside every self-attention's query
    and value projections (common names ``attn.q``, ``attn.v``; PEFT's VeRA defaults are LoRA's, the same ones). On a
    fused projection (GPT-2's ``c_attn``) only the q and v output rows get an update. ``A`` ``[r, max in]`` and ``B``
    ``[max out, r]`` are drawn once from ``projection_prng_key``, sized by the largest input and output over all
    targets, and shared: each layer reads its slices and trains only its two vectors.

    The matrices are buffers of the first layer (see :mod:`opendelta_vera.layer`): frozen, never counted as
    trainable or delta parameters, left out of the backbone hash, saved once with ``save_projection=True``
    (``<first target>.vera.vera_A``/``vera_B``) or drawn again from the seed on load otherwise.
    """

    config_class = VeraConfig
    default_modified_modules: ClassVar[tuple[str, ...]] = ("attn.q", "attn.v")
    insertion = "parallel"
    positional_args = ("r", *SHARED_POSITIONALS)
    """``VeraModel(model, 128)`` binds 128 to ``r``, then the addressing arguments every method takes."""
    supports_fused_targets = True
    config: VeraConfig

    def supports(self, module: nn.Module) -> bool:
        """Linear layers: ``nn.Linear``, GPT-2's ``Conv1D``, a registered quantization backend's layers."""
        return is_linear(module)

    def _expand_target(self, target: Target) -> list[Target]:
        """With the defaults, a module that is no linear layer (a mixture of experts' block) is left out.

        Named explicitly, such a module is refused as unsupported (VeRA's matrices slice a linear layer's sizes).
        """
        if self.config.modified_modules is None and not is_linear(target.module):
            return []
        return [target]

    def _prepare(self, targets: Sequence[Target]) -> None:
        """Draw the shared matrices, sized by the largest input and output over every target (PEFT's ``_find_dim``).

        Also record whether a fresh delta is the identity (not with ``init_weights=False``).
        """
        self.identity_at_init = self.config.init_weights
        sizes = [linear_features(t.module) for t in targets]
        max_in, max_out = max(s[0] for s in sizes), max(s[1] for s in sizes)
        self._projections: tuple[torch.Tensor, torch.Tensor] | None = draw_projections(
            self.config.r, max_in, max_out, self.config.projection_prng_key
        )
        self._owner: list[VeraLayer] = []  # a list, so that the first layer is not also a submodule of this model

    def _build_delta(self, target: Target) -> nn.Module:
        in_features, out_features = linear_features(target.module)
        placement = factory_kwargs(target.module)  # a quantized layer's compute dtype, never its storage dtype
        config = self.config
        layer = VeraLayer(
            in_features,
            out_features,
            config.r,
            projections=None if self._owner else self._projections,
            owner=self._owner[0] if self._owner else None,
            save_projection=config.save_projection,
            dropout=config.vera_dropout,
            out_index=target.output_index(out_features, device=placement.get("device")),
            d_initial=config.d_initial,
            init_weights=config.init_weights,
            **placement,
        )
        if not self._owner:
            self._owner.append(layer)  # the first layer stores the matrices; the others read them there
            self._projections = None  # the drawn CPU copy: not kept beside the first layer's (on a GPU, say)
        return layer

    def save_peft(self, path: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Export in PEFT's VeRA format (see ``peft_format.save_peft_vera``)."""
        from opendelta_vera.peft_format import save_peft_vera

        return save_peft_vera(self, path, **kwargs)
