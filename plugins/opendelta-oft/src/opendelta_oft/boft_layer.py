"""The BOFT delta: a butterfly-factorised orthogonal rotation of a layer's input and a scale of its output.

PEFT 0.21.2's ``boft.Linear``: ``y = s * (W (x M)) + b`` with ``M = M_m ... M_1``, ``M_i = P_i B_i P_i^T``, each
``B_i`` block-diagonal with Cayley-transformed blocks, and ``s`` one learned scale per output feature (the bias is
not scaled). Both sides change, so the delta is a *parallel* one that adds ``y' - y`` to the layer's output (it runs
the layer's own forward on the rotated input, without the deltas' hooks); core detaches, merges
(``W' = s * (W M^T)``) and routes it per row like any other parallel delta.

The block-diagonal step is plain PyTorch (``torch.block_diag`` per factor), for any number of factors: PEFT's CUDA
``fbd_cuda`` extension computes the same matrix faster, and PEFT without it silently uses one factor.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from opendelta.plugin_api import is_linear
from opendelta_oft.butterfly import permutations
from opendelta_oft.host import MergedUpdate, host_output
from opendelta_oft.orthogonal import cayley_exact, identity_blocks_dropout


class BOFTRotation(nn.Module):
    """What BOFT adds to a linear layer's output: ``s * (W (x M)) + b - (W x + b)``.

    Args:
        host: the linear layer (kept as a plain reference, not a child: it is the delta's parent).
        in_features: its input width.
        out_features: its output width.
        block_size: the size of each block.
        block_num: the number of blocks per factor (``block_size * block_num == in_features``).
        factors: the number of butterfly factors (PEFT's ``boft_n_butterfly_factor``).
        dropout: fraction of one random factor's blocks set to the identity in training.
        init_weights: the identity and scales of one; ``False``: ``R ~ N(0, 0.1)``, ``s ~ N(1, 0.1)`` (as PEFT).
        device: where the parameters live (the layer's device).
        dtype: their dtype (the layer's compute dtype).
    """

    def __init__(
        self,
        host: nn.Module,
        in_features: int,
        out_features: int,
        block_size: int,
        block_num: int,
        factors: int = 1,
        *,
        dropout: float = 0.0,
        init_weights: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "_host", host)
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.block_num, self.factors, self.dropout = block_size, block_num, factors, dropout
        self.boft_R = nn.Parameter(torch.zeros(factors, block_num, block_size, block_size, device=device, dtype=dtype))
        self.boft_s = nn.Parameter(torch.ones(out_features, 1, device=device, dtype=dtype))  # (out, 1)
        if not init_weights:
            nn.init.normal_(self.boft_R, mean=0.0, std=0.1)
            nn.init.normal_(self.boft_s, mean=1.0, std=0.1)
        perms = permutations(in_features, block_size, block_num, factors)
        self.register_buffer("perms", perms.to(device), persistent=False)  # (factors, in)
        self._merged = MergedUpdate()

    def rotation(self) -> torch.Tensor:
        """``M`` ``(in, in)``, the product of the permuted block-diagonal factors (the last factor leftmost)."""
        factors, blocks, size, _ = self.boft_R.shape
        data = self.boft_R.reshape(factors * blocks, size, size)
        orthogonal = cayley_exact(0.5 * (data - data.transpose(1, 2))).to(data.dtype)
        orthogonal = orthogonal.reshape(factors, blocks, size, size)
        if self.training and self.dropout > 0:
            chosen = int(torch.randint(0, factors, (1,)).item())
            orthogonal = torch.cat(
                [
                    orthogonal[:chosen],
                    identity_blocks_dropout(orthogonal[chosen], self.dropout).unsqueeze(0),
                    orthogonal[chosen + 1 :],
                ]
            )
        product = None
        for factor, perm in zip(orthogonal.unbind(0), self.perms.unbind(0), strict=True):
            permuted = torch.block_diag(*factor.unbind(0))[perm][:, perm]  # P B P^T  (in, in)
            product = permuted if product is None else permuted @ product
        assert product is not None
        return product

    def new_output(self, x: torch.Tensor) -> torch.Tensor:
        """``s * (W (x M)) + b``: what the layer outputs with BOFT, computed in ``x``'s dtype."""
        rotated = x @ self.rotation().to(x.dtype)
        out = host_output(self._host, rotated)
        bias = getattr(self._host, "bias", None)
        scale = self.boft_s.squeeze(-1).to(x.dtype)
        return out * scale if bias is None else (out - bias) * scale + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The change of the layer's output on ``x``: ``new_output(x) - layer(x)``."""
        return self.new_output(x) - host_output(self._host, x)

    # Mergeable -----------------------------------------------------------------------------------------------
    def can_merge(self, host: nn.Module) -> bool:
        """Linear layers (``nn.Linear``, ``Conv1D``, quantized ones): their weight can absorb ``M`` and ``s``."""
        return is_linear(host)

    def merge_update(self, host: nn.Module) -> Mapping[str, torch.Tensor]:
        """``s * (W M^T) - W`` (see :class:`~opendelta_oft.host.MergedUpdate` for why it is kept for unmerging)."""
        with torch.no_grad():
            rotation = self.rotation().detach().float()
            scale = self.boft_s.detach().float()
        return self._merged.update(self, host, lambda w: (w @ rotation.to(w.device).t()) * scale.to(w.device))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, factors={self.factors}, blocks={self.block_num}x{self.block_size}"
