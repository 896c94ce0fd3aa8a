"""The OFT delta: a block-diagonal orthogonal rotation of a linear layer's input, ``W x -> W (R x)``.

Qiu et al., 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning" (https://arxiv.org/abs/2306.07280).
As in PEFT 0.21.2, the rotation acts on the input (``x`` split into blocks of ``oft_block_size``, each multiplied by
its ``R_i`` on the right), so the layer's bias is untouched and merging gives ``W' = W R^T`` (``R`` the block
diagonal); it is placed as a sequential delta before the layer, which core detaches, merges and routes per row.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from opendelta.plugin_api import is_linear
from opendelta_oft.host import MergedUpdate
from opendelta_oft.orthogonal import (
    cayley_exact,
    cayley_neumann,
    constrain_upper,
    identity_blocks_dropout,
    skew_from_upper,
)


class OFTRotation(nn.Module):
    """``x -> x R`` blockwise, for a ``(..., in_features)`` input (PEFT's ``OFTRotationModule``).

    Args:
        in_features: the layer's input width.
        block_size: the size of each block; divides ``in_features``.
        block_share: one stored block used for every block.
        coft: project the parameter onto COFT's ball (radius ``eps``) before each use.
        eps: COFT's radius.
        use_cayley_neumann: the truncated Neumann series instead of the exact inverse.
        num_cayley_neumann_terms: its number of terms.
        module_dropout: fraction of blocks set to the identity in training.
        init_weights: ``Q = 0`` (the identity); ``False``: ``N(0, 0.1)``, as PEFT's ``init_weights=False``.
        device: where the parameter lives (the layer's device).
        dtype: its dtype (the layer's compute dtype).
    """

    def __init__(
        self,
        in_features: int,
        block_size: int,
        *,
        block_share: bool = False,
        coft: bool = False,
        eps: float = 6e-5,
        use_cayley_neumann: bool = True,
        num_cayley_neumann_terms: int = 5,
        module_dropout: float = 0.0,
        init_weights: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features % block_size:
            raise ValueError(f"oft_block_size {block_size} does not divide in_features {in_features}")
        self.in_features, self.block_size = in_features, block_size
        self.num_blocks = in_features // block_size
        self.block_share, self.coft, self.eps = block_share, coft, eps
        self.use_cayley_neumann, self.num_cayley_neumann_terms = use_cayley_neumann, num_cayley_neumann_terms
        self.module_dropout = module_dropout
        stored = 1 if block_share else self.num_blocks
        upper = block_size * (block_size - 1) // 2
        self.oft_R = nn.Parameter(torch.zeros(stored, upper, device=device, dtype=dtype))  # (blocks or 1, H(H-1)/2)
        if not init_weights:
            nn.init.normal_(self.oft_R, mean=0.0, std=0.1)
        rows, cols = torch.triu_indices(block_size, block_size, 1, device=device)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self._merged = MergedUpdate()

    def blocks(self) -> torch.Tensor:
        """The orthogonal blocks ``(num_blocks, H, H)`` (one repeated with ``block_share``), in the param's dtype."""
        if self.coft:
            constrain_upper(self.oft_R, self.rows, self.cols, self.block_size, self.eps)
        skew = skew_from_upper(self.oft_R, self.rows, self.cols, self.block_size)
        if self.use_cayley_neumann:
            rotation = cayley_neumann(skew, self.num_cayley_neumann_terms)
        else:
            rotation = cayley_exact(skew)
        rotation = rotation.to(self.oft_R.dtype)
        if self.block_share:
            rotation = rotation.repeat(self.num_blocks, 1, 1)
        return rotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x R`` blockwise, computed in the parameter's dtype and returned in ``x``'s."""
        blocks = self.blocks()
        if self.training and self.module_dropout > 0:
            blocks = identity_blocks_dropout(blocks, self.module_dropout)
        shape = x.shape
        split = x.to(blocks.dtype).reshape(*shape[:-1], self.num_blocks, self.block_size)  # (..., D, H)
        rotated = torch.einsum("...rk,rkc->...rc", split, blocks)
        return rotated.reshape(shape).to(x.dtype)

    def matrix(self) -> torch.Tensor:
        """The whole block-diagonal ``R``, ``(in, in)``: the forward computes ``x @ R``."""
        return torch.block_diag(*self.blocks().unbind(0))

    # Mergeable -----------------------------------------------------------------------------------------------
    def can_merge(self, host: nn.Module) -> bool:
        """Linear layers (``nn.Linear``, ``Conv1D``, a quantization backend's), whose weight can absorb ``R``."""
        return is_linear(host)

    def merge_update(self, host: nn.Module) -> Mapping[str, torch.Tensor]:
        """``W R^T - W`` (see :class:`~opendelta_oft.host.MergedUpdate` for why it is kept for unmerging)."""
        with torch.no_grad():
            rotation = self.matrix().detach().float()
        return self._merged.update(self, host, lambda w: w @ rotation.to(w.device).t())

    def extra_repr(self) -> str:
        share = ", block_share" if self.block_share else ""
        return f"in_features={self.in_features}, blocks={self.num_blocks}x{self.block_size}{share}"
