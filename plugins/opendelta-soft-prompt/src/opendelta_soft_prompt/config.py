"""Soft prompt tuning's hyper-parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from opendelta.plugin_api import DeltaConfig, DeltaConfigError


@dataclass(kw_only=True)
class SoftPromptConfig(DeltaConfig):
    """Configuration of :class:`~opendelta_soft_prompt.SoftPromptModel` (manual section 1.21.7).

    Attributes:
        soft_token_num: number of learned prompt embeddings put in front of the input; 100 by default (Lester et
            al.'s setting). Each costs one hidden-size vector and one position of the model's length limit.
        init_range: half-width of the uniform initialisation when ``token_init`` is False; 0.5 by default.
        token_init: start from the model's own embeddings of the first ``soft_token_num`` vocabulary ids (as the
            original and Lester et al.'s simplest variant do); True by default.
        other_expand_ids: inputs that grow with the sequence and the value of their prompt entries; by default the
            attention mask (the prompt is attended to) and the token type ids (segment 0).
    """

    delta_type: ClassVar[str] = "soft_prompt"

    soft_token_num: int = 100
    init_range: float = 0.5
    token_init: bool = True
    other_expand_ids: dict[str, float] = field(default_factory=lambda: {"attention_mask": 1, "token_type_ids": 0})

    def validate(self) -> None:
        """Refuse a prompt of fewer than one token and a non-positive initialisation range."""
        super().validate()
        if self.soft_token_num < 1:
            raise DeltaConfigError(f"SoftPromptConfig.soft_token_num must be >= 1, got {self.soft_token_num}")
        if not self.init_range > 0:
            raise DeltaConfigError(f"SoftPromptConfig.init_range must be > 0, got {self.init_range}")
