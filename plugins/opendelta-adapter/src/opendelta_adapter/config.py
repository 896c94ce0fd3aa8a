"""The adapter's hyper-parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from opendelta.plugin_api import ACTIVATIONS, DeltaConfig, DeltaConfigError


@dataclass(kw_only=True)
class AdapterConfig(DeltaConfig):
    """Configuration of :class:`~opendelta_adapter.AdapterModel` (manual section 1.21.3).

    Attributes:
        bottleneck_dim: width of the bottleneck; 24 by default. Parameters per adapter: ``2 * hidden * dim``
            plus biases; raise it for harder tasks, lower it to save memory.
        non_linearity: activation between the projections (``gelu_new`` by default; see
            ``opendelta.layers.ACTIVATIONS``).
    """

    delta_type: ClassVar[str] = "adapter"

    bottleneck_dim: int = 24
    non_linearity: str = "gelu_new"

    def validate(self) -> None:
        """Refuse a bottleneck below 1 and an unknown activation."""
        super().validate()
        if self.bottleneck_dim < 1:
            raise DeltaConfigError(f"AdapterConfig.bottleneck_dim must be >= 1, got {self.bottleneck_dim}")
        if self.non_linearity.lower() not in ACTIVATIONS:
            raise DeltaConfigError(
                f"AdapterConfig.non_linearity {self.non_linearity!r} is unknown; choose one of {sorted(ACTIVATIONS)}"
            )
