"""The low-rank adapter's hyper-parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from opendelta.plugin_api import ACTIVATIONS, INITIALISERS, DeltaConfig, DeltaConfigError

TRAINABLE_INITIALISERS: tuple[str, ...] = tuple(m for m in INITIALISERS if m != "zeros")
"""Core's initialisers minus ``"zeros"``: with every factor at zero no gradient reaches any factor (only the
up-sampler's bias would ever train), so a zero-initialised low-rank adapter is refused rather than left stuck."""


@dataclass(kw_only=True)
class LowRankAdapterConfig(DeltaConfig):
    """Configuration of :class:`~opendelta_low_rank_adapter.LowRankAdapterModel` (manual section 1.21.4).

    Attributes:
        reduction_factor: the bottleneck is ``hidden // reduction_factor`` wide; 32 by default (768 -> 24 on a
            base-size model). Raise it for fewer parameters; it must not exceed the hidden size of any target.
        non_linearity: activation between the down- and the up-sampler (``gelu_new`` by default; see
            ``opendelta.layers.ACTIVATIONS``).
        low_rank_w_init: how both factors of each projection's weight are initialised (``glorot-uniform`` by
            default; one of ``opendelta.layers.INITIALISERS`` except ``zeros``). Whatever it is, the up-sampler's
            right factor and bias start at zero, so a fresh adapter is exactly the identity.
        low_rank_rank: rank ``r`` of each projection's weight ``W_left @ W_right``; 1 by default (the Compacter
            paper's baseline). Parameters per adapter: ``r * 2 * (hidden + bottleneck) + hidden + bottleneck``.
    """

    delta_type: ClassVar[str] = "low_rank_adapter"  # what 0.3.2 wrote into config.json
    delta_aliases: ClassVar[tuple[str, ...]] = ("lowrankadapter",)  # what earlier builds of this plugin wrote

    reduction_factor: int = 32
    non_linearity: str = "gelu_new"
    low_rank_w_init: str = "glorot-uniform"
    low_rank_rank: int = 1

    def validate(self) -> None:
        """Refuse a reduction factor or rank below 1, an unknown activation and an unusable initialiser."""
        super().validate()
        name = type(self).__name__
        if self.reduction_factor < 1:
            raise DeltaConfigError(f"{name}.reduction_factor must be >= 1, got {self.reduction_factor}")
        if self.low_rank_rank < 1:
            raise DeltaConfigError(f"{name}.low_rank_rank must be >= 1, got {self.low_rank_rank}")
        if self.non_linearity.lower() not in ACTIVATIONS:
            raise DeltaConfigError(
                f"{name}.non_linearity {self.non_linearity!r} is unknown; choose one of {sorted(ACTIVATIONS)}"
            )
        if self.low_rank_w_init == "zeros":
            raise DeltaConfigError(
                f"{name}.low_rank_w_init 'zeros' would leave every factor at zero, where no gradient reaches them; "
                f"choose one of {list(TRAINABLE_INITIALISERS)}"
            )
        if self.low_rank_w_init not in TRAINABLE_INITIALISERS:
            raise DeltaConfigError(
                f"{name}.low_rank_w_init {self.low_rank_w_init!r} is unknown; "
                f"choose one of {list(TRAINABLE_INITIALISERS)}"
            )
