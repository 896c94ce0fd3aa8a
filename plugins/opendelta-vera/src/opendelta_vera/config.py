"""VeRA's configuration, with PEFT's ``VeraConfig`` names (``target_modules`` is ``modified_modules`` here)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NewType

from opendelta.plugin_api import DeltaConfig, DeltaConfigError

PRNGKey = NewType("PRNGKey", int)
"""A seed, not a size: a type of its own so that it is never taken for one of the method's size fields (a seed of 0
is PEFT's default, and a huge one allocates nothing). Checked in :meth:`VeraConfig.validate`."""

SEED_RANGE = range(-(2**63), 2**64)
"""The seeds ``torch.Generator.manual_seed`` accepts."""


@dataclass(kw_only=True)
class VeraConfig(DeltaConfig):
    """Configuration of :class:`~opendelta_vera.VeraModel` (PEFT 0.21.2's ``VeraConfig`` names and defaults).

    Attributes:
        r: the rank of the shared random matrices (``vera_A`` is ``[r, max in]``, ``vera_B`` ``[max out, r]``).
            VeRA trains only ``r + out`` values per layer, so ranks far above LoRA's are usual (PEFT's default 256).
        projection_prng_key: the seed the shared matrices are drawn from (Kaiming-uniform, ``vera_A`` first, on a
            CPU ``torch.Generator``, as PEFT draws them): the same key gives the same matrices.
        save_projection: save the shared matrices with the checkpoint (PEFT's default). ``False`` saves only the
            seed (in the config) and draws them again on load: bit for bit on the same PyTorch, smaller files, but
            tied to PyTorch's generator.
        vera_dropout: dropout on each adapted layer's input to the VeRA branch.
        d_initial: the initial value of every ``lambda_d`` (``lambda_b`` starts at zero, so a fresh delta is the
            identity); PEFT and the paper recommend values <= 0.1.
        fan_in_fan_out: PEFT's flag for layers that store ``[in, out]`` (GPT-2's ``Conv1D``). Read from each layer's
            type here, as PEFT itself corrects it, so it changes nothing; kept so PEFT configs read as they are.
        bias: PEFT's bias training (``"none"``, ``"all"``, ``"vera_only"``). Only ``"none"``: to train biases, name
            them in ``unfrozen_modules``.
        init_weights: ``lambda_b = 0``, ``lambda_d = d_initial`` (the identity); ``False`` starts ``lambda_b`` at
            ones and ``lambda_d`` at ``N(0, 1)``, as PEFT does (for tests only).
    """

    delta_type: ClassVar[str] = "vera"

    r: int = 256
    projection_prng_key: PRNGKey = PRNGKey(0)
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    def validate(self) -> None:
        """Refuse values PEFT refuses or this method does not implement, naming the field."""
        super().validate()
        if self.r < 1:
            raise DeltaConfigError(f"VeraConfig.r must be a positive integer, got {self.r}")
        key = self.projection_prng_key
        if not isinstance(key, int) or isinstance(key, bool) or key not in SEED_RANGE:
            raise DeltaConfigError(
                f"VeraConfig.projection_prng_key must be an integer seed in [-2**63, 2**64), got {key!r:.100}"
            )
        if not 0.0 <= self.vera_dropout < 1.0:
            raise DeltaConfigError(f"VeraConfig.vera_dropout must be in [0, 1), got {self.vera_dropout}")
        if not math.isfinite(self.d_initial):
            raise DeltaConfigError(f"VeraConfig.d_initial must be finite, got {self.d_initial}")
        if self.bias != "none":
            raise DeltaConfigError(
                f"VeraConfig.bias={self.bias!r} is not supported (only 'none'): to train biases, list them in "
                f"unfrozen_modules, which saves them with the delta"
            )
