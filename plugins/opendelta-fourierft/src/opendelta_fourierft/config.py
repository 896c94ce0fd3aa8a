"""FourierFT's configuration, with PEFT's ``FourierFTConfig`` names and defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from opendelta.plugin_api import DeltaConfig, DeltaConfigError

BIAS_KINDS = ("none",)
"""The ``bias`` values supported: PEFT's ``"all"`` and ``"fourier_only"`` train the backbone's biases, which is
``unfrozen_modules``' job here."""


@dataclass(kw_only=True)
class FourierFTConfig(DeltaConfig):
    r"""Configuration of :class:`~opendelta_fourierft.FourierFTModel` (PEFT 0.21.2's ``FourierFTConfig``).

    Attributes:
        n_frequency: how many spectral coefficients each modified layer trains (its whole parameter count); at most
            ``in_features * out_features`` of every modified layer. 1000 by default, as PEFT.
        scaling: the factor on the update ``real(ifft2(F))``, like LoRA's alpha; 150.0 by default (PEFT's; the paper
            uses 100-150 for RoBERTa, 300 for LLaMA and ViT).
        random_loc_seed: the seed that draws the spectral locations (the same for every layer, as PEFT); the
            locations are not saved but drawn again from it, exactly as PEFT draws them, so PEFT's files load.
        fan_in_fan_out: PEFT's flag for layers storing ``W`` as ``[in, out]``; read from the layer's type here (as
            PEFT corrects it for GPT-2's ``Conv1D`` and ``nn.Linear``), kept so PEFT configs carry over.
        init_weights: ``True`` (the default here): the spectrum starts at zeros, so a fresh delta is the identity
            (as every OpenDelta method's; the update is linear in the spectrum, so training starts from there);
            ``False``: at ``N(0, 1)``, PEFT's default and the paper's. PEFT's default is not taken because
            ``ifft2`` divides by ``out * in``: the random start is a small change of a large layer but swamps a small
            one (150 * sqrt(1000) / 1024, about 4.6 per entry, on a 32 x 32 layer). PEFT folders carry their spectra,
            so reading them does not depend on it.
        n_frequency_pattern: ``{pattern: n}``: another ``n_frequency`` for the layers a pattern designates, by
            PEFT's rule: the first key (in order) for which ``re.match(rf".*\.{key}$", name)`` holds on the layer's
            real module name, else the name itself as a key.
        bias: ``"none"`` only; PEFT's ``"all"`` and ``"fourier_only"`` are refused by name (train biases through
            ``unfrozen_modules`` instead).
    """

    delta_type: ClassVar[str] = "fourierft"

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = field(default=777, metadata={"size": False})  # a seed, not a size: any int64 is valid
    fan_in_fan_out: bool = False
    init_weights: bool = True
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    bias: str = "none"

    def validate(self) -> None:
        """Refuse a non-positive ``n_frequency``, a bad ``n_frequency_pattern`` and an unsupported ``bias``."""
        super().validate()
        if self.n_frequency < 1:
            raise DeltaConfigError(f"FourierFTConfig.n_frequency must be >= 1, got {self.n_frequency}")
        for key, value in self.n_frequency_pattern.items():
            if value < 1:
                raise DeltaConfigError(f"FourierFTConfig.n_frequency_pattern[{key!r}] must be >= 1, got {value}")
            try:
                re.compile(rf".*\.{key}$")
            except re.error as exc:
                raise DeltaConfigError(f"FourierFTConfig.n_frequency_pattern key {key!r} is no regex: {exc}") from exc
        if self.bias not in BIAS_KINDS:
            raise DeltaConfigError(
                f"FourierFTConfig.bias={self.bias!r} is not supported (only 'none'): PEFT's 'all' and 'fourier_only' "
                f"train the backbone's biases; name them in unfrozen_modules instead"
            )

    def n_frequency_of(self, name: str) -> int:
        """The ``n_frequency`` of the layer whose real module name is ``name`` (PEFT's ``n_frequency_pattern`` rule)."""
        pattern = self.n_frequency_pattern
        key = next((k for k in pattern if re.match(rf".*\.{k}$", name)), name)
        return pattern.get(key, self.n_frequency)
