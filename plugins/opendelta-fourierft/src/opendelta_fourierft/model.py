"""``FourierFTModel``: a spectral weight update placed in parallel to every targeted linear layer."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from opendelta.plugin_api import (
    SHARED_POSITIONALS,
    DeltaConfigError,
    DeltaModel,
    Target,
    factory_kwargs,
    is_linear,
    linear_features,
)
from opendelta_fourierft.config import FourierFTConfig
from opendelta_fourierft.layer import FourierFTLayer


def spectrum_shape(target: Target) -> tuple[int, int]:
    """``(rows, in_features)`` of a linear target's spectrum: the output rows it covers, by the input width."""
    in_features, out_features = linear_features(target.module)
    index = target.output_index(out_features)
    return (out_features if index is None else int(index.numel())), in_features


class FourierFTModel(DeltaModel):
    """FourierFT on a backbone (Gao et al., 2024; PEFT 0.21.2's ``FourierFTModel`` semantics).

    ``FourierFTModel(backbone_model=model)`` adds ``scaling * real(ifft2(F)) x`` beside the attention's query and
    value projections (common names ``attn.q``, ``attn.v``), ``F`` holding ``n_frequency`` trainable coefficients at
    locations drawn from ``random_loc_seed``. On a fused projection (GPT-2's ``c_attn``) only the q and v output
    rows get an update (a spectrum over those rows). ``modified_modules=[...]`` chooses other linear layers.

    With the default targets, a layer too small for its ``n_frequency`` (``in * out`` below it: only toy models have
    such attention projections) and a module that is no linear layer are left out; named explicitly, either is
    refused by name.
    """

    config_class = FourierFTConfig
    default_modified_modules: ClassVar[tuple[str, ...]] = ("attn.q", "attn.v")
    insertion = "parallel"
    positional_args = ("n_frequency", "scaling", *SHARED_POSITIONALS)
    supports_fused_targets = True
    config: FourierFTConfig

    def supports(self, module: nn.Module) -> bool:
        """Linear layers: ``nn.Linear``, GPT-2's ``Conv1D``, a registered quantization backend's layers."""
        return is_linear(module)

    def _resolve_targets(self) -> list[Target]:
        """The designated modules; with the defaults, refuse by size when every linear one is too small.

        Otherwise leaving them all out would end in core's "found nothing it can modify", which does not say why.
        """
        targets = super()._resolve_targets()
        linear = [t for t in targets if is_linear(t.module)]
        if self.config.modified_modules is None and linear and not any(map(self._fits, linear)):
            rows, in_features = spectrum_shape(linear[0])
            raise DeltaConfigError(
                f"FourierFTConfig.n_frequency={self.config.n_frequency_of(linear[0].name)} is more than every default "
                f"target has weight entries ({linear[0].name}: {rows} x {in_features} = {rows * in_features}); "
                f"lower n_frequency"
            )
        return targets

    def _fits(self, target: Target) -> bool:
        rows, in_features = spectrum_shape(target)
        return self.config.n_frequency_of(target.name) <= rows * in_features

    def _expand_target(self, target: Target) -> list[Target]:
        """With the defaults, leave out what FourierFT cannot serve (see the class docstring); else keep it."""
        if self.config.modified_modules is not None:
            return [target]
        return [target] if is_linear(target.module) and self._fits(target) else []

    def _prepare(self, targets: Sequence[Target]) -> None:
        """Refuse, before any delta is built, a layer with fewer weight entries than its ``n_frequency``.

        Also record whether a fresh delta is the identity (``init_weights=True``; ``False`` draws it at random).
        """
        self.identity_at_init = self.config.init_weights
        too_small = next((t for t in targets if not self._fits(t)), None)
        if too_small is not None:
            rows, in_features = spectrum_shape(too_small)
            where = "the covered rows of " if rows != linear_features(too_small.module)[1] else ""
            raise DeltaConfigError(
                f"FourierFTConfig.n_frequency={self.config.n_frequency_of(too_small.name)} is more than {where}"
                f"{too_small.name} has weight entries ({rows} x {in_features} = {rows * in_features}): each "
                f"coefficient needs its own location; lower n_frequency (or set it for this layer in "
                f"n_frequency_pattern), or leave the layer out"
            )

    def _build_delta(self, target: Target) -> nn.Module:
        in_features, out_features = linear_features(target.module)
        placement = factory_kwargs(target.module)  # a quantized layer's compute dtype, never its storage dtype
        return FourierFTLayer(
            in_features,
            out_features,
            n_frequency=self.config.n_frequency_of(target.name),
            scaling=self.config.scaling,
            random_loc_seed=self.config.random_loc_seed,
            out_index=target.output_index(out_features, device=placement.get("device")),
            init_weights=self.config.init_weights,
            **placement,
        )

    def save_peft(self, path: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Export in PEFT's FourierFT format (see ``peft_format.save_peft_fourierft``)."""
        from opendelta_fourierft.peft_format import save_peft_fourierft

        return save_peft_fourierft(self, path, **kwargs)
