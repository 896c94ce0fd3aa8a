"""The learned prompt: ``P`` vectors in the space of the model's input embeddings.

Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning" (https://arxiv.org/abs/2104.08691).
Core puts the prompt in front of the embedded input and takes it out of the output (``opendelta.prompt``); this
module only holds it.
"""

from __future__ import annotations

import torch
from torch import nn


class SoftPromptLayer(nn.Module):
    """``prompt()`` gives the ``[P, hidden]`` prompt embeddings (parameter ``soft_embeds``, the original's name).

    Args:
        num_tokens: ``P``.
        embeddings: the model's input embedding matrix ``[vocab, hidden]``; with no rows for a model that embeds no
            tokens (an image or audio encoder), whose prompt then starts uniform whatever ``token_init`` says.
        token_init: copy the embeddings of ids ``0 .. P-1`` (wrapping around a smaller vocabulary) instead of a
            uniform initialisation.
        init_range: half-width of the uniform initialisation.
    """

    def __init__(self, num_tokens: int, embeddings: torch.Tensor, token_init: bool, init_range: float) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        with torch.no_grad():  # the prompt is allocated first, so an absurd P is refused before any other work
            start = torch.empty(num_tokens, embeddings.shape[1], device=embeddings.device, dtype=embeddings.dtype)
            if token_init and embeddings.shape[0]:  # vocabulary rows 0 .. P-1, wrapping around: copies, then the rest
                vocab = embeddings.shape[0]
                for begin in range(0, num_tokens, vocab):
                    rows = min(vocab, num_tokens - begin)
                    start[begin : begin + rows] = embeddings[:rows]
            else:
                start.uniform_(-init_range, init_range)
        self.soft_embeds = nn.Parameter(start)

    def prompt(self) -> torch.Tensor:
        """The prompt embeddings, ``[P, hidden]``."""
        return self.soft_embeds

    def extra_repr(self) -> str:
        return f"tokens={self.num_tokens}, hidden={self.soft_embeds.shape[1]}"
