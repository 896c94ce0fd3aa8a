"""LoRA's hyper-parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from opendelta.plugin_api import DeltaConfig, DeltaConfigError


@dataclass(kw_only=True)
class LoraConfig(DeltaConfig):
    """Configuration of :class:`~opendelta_lora.LoraModel` (manual section 1.21.1).

    Attributes:
        lora_r: rank ``r`` of the update ``B A``; 8 by default. Smaller means fewer parameters (``r * (in + out)``
            per modified layer); 1-16 is the usual range.
        lora_alpha: scale numerator: the update is multiplied by ``lora_alpha / lora_r``, so changing ``r`` does not
            change the effective learning rate much. 16 by default.
        lora_dropout: dropout applied to the LoRA branch's input during training; 0.0 by default.
    """

    delta_type: ClassVar[str] = "lora"

    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0

    def validate(self) -> None:
        """Refuse ranks below 1, a non-positive alpha and a dropout outside [0, 1)."""
        super().validate()
        if self.lora_r < 1:
            raise DeltaConfigError(f"LoraConfig.lora_r must be >= 1, got {self.lora_r}")
        if self.lora_alpha <= 0:
            raise DeltaConfigError(f"LoraConfig.lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise DeltaConfigError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
