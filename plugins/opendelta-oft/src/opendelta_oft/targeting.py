"""What OFT and BOFT share about their targets: whole linear layers, sized by their input width.

An orthogonal rotation acts on a layer's *input*, which all the fused parts of a layer share (GPT-2's ``c_attn``
computes q, k and v from one input), so a target that is some parts of a fused layer becomes the whole layer, as
PEFT's ``target_modules=["c_attn"]`` would be. A mixture-of-experts block (no linear layer) is left out of the
defaults, as IA3 does; named explicitly, core refuses it as unsupported.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from opendelta.plugin_api import DeltaConfig, DeltaConfigError, Target, is_linear, linear_features


class WholeLinearTargets:
    """Mixin of :class:`~opendelta_oft.OFTModel` and :class:`~opendelta_oft.BOFTModel` (before ``DeltaModel``)."""

    config: DeltaConfig

    def supports(self, module: nn.Module) -> bool:
        """Linear layers: ``nn.Linear``, GPT-2's ``Conv1D``, a registered quantization backend's layers."""
        return is_linear(module)

    def _expand_target(self, target: Target) -> list[Target]:
        """A fused part becomes its whole layer; a non-linear default target (experts) is left out."""
        if self.config.modified_modules is None and not is_linear(target.module):
            return []
        if target.parts is not None:
            return [dataclasses.replace(target, parts=None, num_parts=None, split=None)]
        return [target]


def check_block_size(target: Target, block_size: int, owner: str) -> int:
    """``target``'s ``in_features``, checked to be a multiple of ``block_size`` (``oft_block_size``).

    Raises:
        DeltaConfigError: it is not; names the layer, its width and the block sizes that would fit.
    """
    in_features = linear_features(target.module)[0]
    if block_size > in_features or in_features % block_size:
        fits = [d for d in range(1, in_features + 1) if in_features % d == 0]
        shown = fits if len(fits) <= 12 else [*fits[:6], "...", *fits[-3:]]
        raise DeltaConfigError(
            f"{owner}: oft_block_size={block_size} does not divide the in_features ({in_features}) of {target.name}; "
            f"choose an oft_block_size dividing it ({', '.join(map(str, shown))}), or leave this layer out with "
            f"exclude_modules (PEFT would silently pick another block size)"
        )
    return in_features
