"""The prompt encoder: virtual token embeddings, reparameterised by an MLP or a bidirectional LSTM.

Liu et al., 2021, "GPT Understands, Too" (https://arxiv.org/abs/2103.10385), as PEFT 0.21.2's ``PromptEncoder``
computes it: the virtual tokens' embeddings go through the encoder and its outputs are the prompt. Core puts the
prompt in front of the embedded input and takes it out of the output (``opendelta.prompt``), as for a soft prompt;
this module only computes it. Parameter names are PEFT's (``embedding``, ``mlp_head``, ``lstm_head``), so a PEFT
prompt encoder's weights copy over by name.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


def _mlp(sizes: tuple[int, ...], device: torch.device | None, dtype: torch.dtype | None) -> nn.Sequential:
    """``Linear -> ReLU -> ... -> Linear`` through ``sizes`` (PEFT's ``mlp_head`` layout: ReLU at odd indices)."""
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(itertools.pairwise(sizes)):
        if index:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(width_in, width_out, device=device, dtype=dtype))
    return nn.Sequential(*layers)


class PromptEncoderLayer(nn.Module):
    """``prompt()`` gives the ``[P, token_dim]`` virtual token embeddings the encoder computes.

    Args:
        num_tokens: ``P``, the prompt's length.
        token_dim: the width of the model's input embeddings.
        total_tokens: how many virtual token embeddings the encoder runs over (``P`` times PEFT's
            ``num_transformer_submodules``); the prompt is the first ``P`` outputs.
        encoder_type: ``"MLP"``, ``"LSTM"``, or ``None`` for no encoder: the embeddings are the prompt (PEFT's
            inference mode, and a folded model).
        hidden_size: the encoder's hidden width.
        num_layers: the LSTM's layers.
        dropout: the LSTM's dropout between layers.
    """

    def __init__(
        self,
        num_tokens: int,
        token_dim: int,
        total_tokens: int,
        encoder_type: str | None,
        hidden_size: int,
        num_layers: int = 2,
        dropout: float = 0.0,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_tokens, self.total_tokens, self.encoder_type = num_tokens, total_tokens, encoder_type
        if encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(
                token_dim,
                hidden_size,
                num_layers=num_layers,
                dropout=dropout,
                bidirectional=True,
                batch_first=True,
                device=device,
                dtype=dtype,
            )
            self.mlp_head = _mlp((2 * hidden_size, 2 * hidden_size, token_dim), device, dtype)
        elif encoder_type == "MLP":
            self.mlp_head = _mlp((token_dim, hidden_size, hidden_size, token_dim), device, dtype)
        elif encoder_type is not None:
            raise ValueError(f"encoder_type must be 'MLP', 'LSTM' or None, got {encoder_type!r}")
        # N(0, 1), nn.Embedding's initialisation, as PEFT's; allocated last, so the encoder's weights are refused
        # first when a size is absurd
        self.embedding = nn.Embedding(total_tokens, token_dim, device=device, dtype=dtype)

    def encoded(self) -> torch.Tensor:
        """Every virtual token's output, ``[total_tokens, token_dim]``."""
        table = self.embedding.weight
        if self.encoder_type is None:
            return table
        if self.encoder_type == "LSTM":
            return self.mlp_head(self.lstm_head(table[None])[0])[0]
        return self.mlp_head(table)

    def prompt(self) -> torch.Tensor:
        """The prompt, ``[P, token_dim]``: the first ``P`` outputs."""
        return self.encoded()[: self.num_tokens]

    def fold(self) -> None:
        """Replace the encoder by the outputs it computes now: the same prompt, as PEFT saves and serves it."""
        if self.encoder_type is None:
            return
        with torch.no_grad():
            table = self.encoded().detach().clone()
        for name in ("lstm_head", "mlp_head"):
            if name in self._modules:
                del self._modules[name]
        self.encoder_type = None
        self.embedding.weight = nn.Parameter(table, requires_grad=self.embedding.weight.requires_grad)

    def extra_repr(self) -> str:
        return f"tokens={self.num_tokens}, total={self.total_tokens}, encoder={self.encoder_type or 'none'}"
