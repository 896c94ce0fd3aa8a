"""P-tuning's hyper-parameters, under PEFT's ``PromptEncoderConfig`` names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from opendelta.plugin_api import DeltaConfig, DeltaConfigError

ENCODER_TYPES = ("MLP", "LSTM")
"""PEFT's ``PromptEncoderReparameterizationType`` values."""

MLP_LAYERS = 2
"""PEFT's default ``encoder_num_layers``; the MLP encoder always has this many hidden layers."""


@dataclass(kw_only=True)
class PTuningConfig(DeltaConfig):
    """Configuration of :class:`~opendelta_p_tuning.PTuningModel` (PEFT's ``PromptEncoderConfig``).

    Attributes:
        num_virtual_tokens: ``P``, the number of virtual tokens put in front of the input; 20 by default. Each costs
            one position of the model's length limit.
        encoder_reparameterization_type: ``"MLP"`` (Linear-ReLU-Linear-ReLU-Linear, PEFT's recommendation) or
            ``"LSTM"`` (a bidirectional LSTM, then Linear-ReLU-Linear), run over the virtual token embeddings.
        encoder_hidden_size: the encoder's hidden width; 128 by default (PEFT has no default and needs it set; 128
            is its documentation's value).
        encoder_num_layers: the LSTM's number of layers (2). The MLP has exactly two hidden layers: PEFT ignores
            another value with a warning, this config refuses it (a setting that would do nothing).
        encoder_dropout: dropout between the LSTM's layers (0.0); the MLP has none.
        num_transformer_submodules: how many sets of ``P`` virtual token embeddings the encoder runs over: PEFT
            uses 2 for a seq2seq LM, whose first ``P`` outputs are the encoder's prompt (the second set is unused by
            PEFT's prompt placement, but a bidirectional LSTM reads it). ``None``: 2 on an encoder-decoder, else 1.
        inference_mode: hold only the computed prompt, no encoder (PEFT's inference mode, what its saved adapters
            hold). :meth:`~opendelta_p_tuning.PTuningModel.fold` switches a trained model to it.
    """

    delta_type: ClassVar[str] = "p_tuning"
    delta_aliases: ClassVar[tuple[str, ...]] = ("ptuning",)

    num_virtual_tokens: int = 20
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int = 128
    encoder_num_layers: int = MLP_LAYERS
    encoder_dropout: float = 0.0
    num_transformer_submodules: Literal[1, 2] | None = None
    inference_mode: bool = False

    def validate(self) -> None:
        """Refuse sizes below 1, an unknown encoder type, a dropout outside [0, 1) and more than two submodules."""
        super().validate()
        kind = self.encoder_reparameterization_type
        if not isinstance(kind, str) or kind.upper() not in ENCODER_TYPES:
            raise DeltaConfigError(
                f"PTuningConfig.encoder_reparameterization_type must be one of {ENCODER_TYPES}, got {kind!r}"
            )
        self.encoder_reparameterization_type = kind.upper()
        for name in ("num_virtual_tokens", "encoder_hidden_size", "encoder_num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DeltaConfigError(f"PTuningConfig.{name} must be an int >= 1, got {value!r}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise DeltaConfigError(f"PTuningConfig.encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")
        if isinstance(self.num_transformer_submodules, bool) or self.num_transformer_submodules not in (None, 1, 2):
            given = self.num_transformer_submodules
            raise DeltaConfigError(f"PTuningConfig.num_transformer_submodules must be 1, 2 or None, got {given!r}")
        if self.encoder_reparameterization_type == "MLP" and self.encoder_num_layers != MLP_LAYERS:
            if not self.inference_mode:  # (no encoder is built in inference mode: a PEFT folder's value is moot)
                raise DeltaConfigError(
                    f"PTuningConfig.encoder_num_layers={self.encoder_num_layers} does not apply to the MLP encoder, "
                    f"which always has {MLP_LAYERS} hidden layers (PEFT ignores the value with a warning); use "
                    f"encoder_reparameterization_type='LSTM' for a layer count, or leave it at {MLP_LAYERS}"
                )
