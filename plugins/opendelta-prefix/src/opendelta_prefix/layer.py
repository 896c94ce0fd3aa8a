"""Prefix keys and values, plain or produced by the reparameterisation network.

Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (https://arxiv.org/abs/2101.00190).
Every self-attention block attends to ``P`` extra key/value positions in front of its own; the keys and values are
learned directly (``past_key``/``past_value``, the original OpenDelta's names) or computed by an MLP from a small
embedding, shared by all layers (more stable to train). Core places the prefix (``opendelta.prefix``); this module
only says what the keys and values are.
"""

from __future__ import annotations

import torch
from torch import nn


class PrefixReparameterization(nn.Module):
    """``embedding [P, embed_dim] -> Linear -> tanh -> Linear -> [P, sum of every layer's key + value size]``.

    Args:
        num_tokens: ``P``.
        embed_dim: width of the embedding.
        mid_dim: width of the hidden layer.
        out_features: total key + value size over all layers.
    """

    def __init__(
        self,
        num_tokens: int,
        embed_dim: int,
        mid_dim: int,
        out_features: int,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        # The MLP is allocated before the embedding: an absurd embed_dim is then refused (opendelta.budget) at its
        # [mid_dim, embed_dim] weight, before [num_tokens, embed_dim] is allocated and filled. The random numbers are
        # still drawn embedding first, so a seed gives the same network as before.
        cuda = [device] if device is not None and torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            control_trans = nn.Sequential(
                nn.Linear(embed_dim, mid_dim, device=device, dtype=dtype),
                nn.Tanh(),
                nn.Linear(mid_dim, out_features, device=device, dtype=dtype),
            )
        self.wte = nn.Parameter(torch.randn(num_tokens, embed_dim, device=device, dtype=dtype))  # (P, embed_dim)
        control_trans[0].reset_parameters()
        control_trans[2].reset_parameters()
        self.control_trans = control_trans

    def forward(self, start: int, stop: int) -> torch.Tensor:
        """Columns ``start:stop`` of the generated prefixes, ``[P, stop - start]`` (one layer's keys or values).

        Only the needed slice of the last projection is computed, so each layer pays for its own part.
        """
        hidden = self.control_trans[1](self.control_trans[0](self.wte))  # (P, mid_dim)
        last = self.control_trans[2]
        return nn.functional.linear(hidden, last.weight[start:stop], last.bias[start:stop])


class PrefixLayer(nn.Module):
    """The prefix of one attention block: ``key_value()`` gives ``([P, key size], [P, value size])``.

    Args:
        num_tokens: ``P``.
        key_features: size of the block's keys (its key projection's output).
        value_features: size of its values.
        reparameterization: the shared network and this layer's column offset in its output; ``None`` for plain
            learned prefixes.
    """

    def __init__(
        self,
        num_tokens: int,
        key_features: int,
        value_features: int,
        reparameterization: tuple[PrefixReparameterization, int] | None = None,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_tokens, self.key_features, self.value_features = num_tokens, key_features, value_features
        if reparameterization is None:
            self.past_key = nn.Parameter(torch.randn(num_tokens, key_features, device=device, dtype=dtype))
            self.past_value = nn.Parameter(torch.randn(num_tokens, value_features, device=device, dtype=dtype))
        else:
            self.reparameterization, self.offset = reparameterization

    @property
    def reparameterized(self) -> bool:
        """Whether the keys and values come from the shared network rather than plain parameters."""
        return "reparameterization" in self._modules

    def key_value(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This block's prefix keys ``[P, key size]`` and values ``[P, value size]``."""
        if not self.reparameterized:
            return self.past_key, self.past_value
        start, middle = self.offset, self.offset + self.key_features
        network = self.reparameterization
        return network(start, middle), network(middle, middle + self.value_features)

    def fold(self) -> None:
        """Replace the network by the plain prefixes it computes now (same outputs, no network to save)."""
        if not self.reparameterized:
            return
        with torch.no_grad():
            key, value = (t.detach().clone() for t in self.key_value())
        del self.reparameterization
        self.past_key, self.past_value = nn.Parameter(key), nn.Parameter(value)

    def extra_repr(self) -> str:
        kind = "reparameterized" if self.reparameterized else "plain"
        return f"tokens={self.num_tokens}, key={self.key_features}, value={self.value_features}, {kind}"
