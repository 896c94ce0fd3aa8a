"""Prefix tuning's hyper-parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from opendelta.plugin_api import DeltaConfig, DeltaConfigError


@dataclass(kw_only=True)
class PrefixConfig(DeltaConfig):
    """Configuration of :class:`~opendelta_prefix.PrefixModel` (manual section 1.21.6).

    Attributes:
        prefix_token_num: ``P``, the number of learned key/value positions put in front of each attention's own; 6 by
            default. Each adds ``key + value`` size parameters per layer (without reparameterisation).
        reparameterize: train the prefixes through a small network (Li & Liang's reparameterisation, which they found
            more stable), shared by all layers: an embedding ``[P, embed_dim]`` and an MLP ``embed_dim -> mid_dim ->
            every layer's keys and values``. ``PrefixModel.fold()`` replaces it by the plain prefixes it computes
            (for saving and serving); True by default.
        embed_dim: width of the reparameterisation's embedding; 512 by default.
        mid_dim: width of its hidden layer; 512 by default.
        peft_positions: give the real tokens positions ``P, P+1, ...`` (their own ``position_ids`` moved up by
            ``P``), as PEFT's prefix tuning does: its prefix occupies the first ``P`` key/value cache positions, so
            learned positions (GPT-2, BERT) and rotary queries (Llama) count it. False by default (the prefix takes
            no position, as in the original); the PEFT folder reader sets it. Decoder-only and encoder models only.
    """

    delta_type: ClassVar[str] = "prefix"

    prefix_token_num: int = 6
    reparameterize: bool = True
    embed_dim: int = 512
    mid_dim: int = 512
    peft_positions: bool = False

    def validate(self) -> None:
        """Refuse sizes below 1."""
        super().validate()
        for name in ("prefix_token_num", "embed_dim", "mid_dim"):
            if getattr(self, name) < 1:
                raise DeltaConfigError(f"PrefixConfig.{name} must be >= 1, got {getattr(self, name)}")
