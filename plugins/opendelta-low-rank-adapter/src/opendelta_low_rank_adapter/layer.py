"""The low-rank adapter's layers: a rank-``r`` factorised linear map, and the adapter built from two of them.

Karimi Mahabadi et al., 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers"
(https://arxiv.org/abs/2106.04647), section 3 and the "Low-rank adapter" baseline: each projection of a bottleneck
adapter is parameterised as the product of two thin matrices, ``W = W_left @ W_right``.
"""

from __future__ import annotations

import torch
from torch import nn

from opendelta.plugin_api import SamplerAdapter, init_weight_

__all__ = ["LowRankAdapter", "LowRankLinear"]


class LowRankLinear(nn.Module):
    """``x -> x @ (W_left @ W_right) + b``: a linear map whose ``[in, out]`` weight has rank at most ``rank``.

    Parameter names and shapes are the original OpenDelta's (``W_left: [in, rank]``, ``W_right: [rank, out]``,
    ``b: [out]``), so its printed trees and checkpoint keys carry over. Unlike the original, which multiplied the
    factors element-wise and so only worked for rank 1, any rank works. The weight is stored ``[in, out]``
    (``x @ W``), like transformers' ``Conv1D`` and unlike ``nn.Linear``.

    Args:
        in_features: size of the input's last dimension.
        out_features: size of the output's last dimension.
        rank: inner dimension of the factorisation.
        w_init: initialiser of both factors (see ``opendelta.layers.INITIALISERS``); the bias starts at zero.
        device: where the parameters live.
        dtype: the parameters' dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 1,
        w_init: str = "glorot-uniform",
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.W_left = nn.Parameter(torch.empty(in_features, rank, device=device, dtype=dtype))  # (in, r)
        self.W_right = nn.Parameter(torch.empty(rank, out_features, device=device, dtype=dtype))  # (r, out)
        self.b = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))  # (out,)
        init_weight_(self.W_left, w_init)
        init_weight_(self.W_right, w_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(..., in_features)`` to ``(..., out_features)``.

        Multiplies by the factors one after the other, never forming the dense ``[in, out]`` weight: that costs
        ``r * (in + out)`` per row instead of ``in * out``.
        """
        return (x @ self.W_left) @ self.W_right + self.b  # (..., r) -> (..., out)

    def delta_weight(self) -> torch.Tensor:
        """The dense weight ``W_left @ W_right`` as an ``[in_features, out_features]`` matrix."""
        return self.W_left @ self.W_right

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


class LowRankAdapter(SamplerAdapter):
    """``h -> h + up(act(down(h)))`` with rank-``r`` projections ``hidden -> bottleneck -> hidden``.

    Core's :class:`~opendelta.layers.SamplerAdapter` with :class:`LowRankLinear` samplers; the subclass only builds
    them (and keeps the original's class name in printed trees). Every factor is initialised with ``w_init``
    except the up-sampler's right factor, which starts at zero like its bias: the up-projection is then exactly
    zero, so a fresh adapter is exactly the identity (the original was not), while the first gradient step on that
    factor, ``W_left^T`` times the bottleneck activations times the output gradient, is non-zero, so the adapter
    starts learning at once.

    Args:
        hidden_size: size of the hidden state the adapter reads and writes.
        bottleneck_dim: size of the bottleneck (``hidden_size // reduction_factor``).
        rank: rank of each sampler's weight.
        w_init: initialiser of the factors (see ``opendelta.layers.INITIALISERS``).
        non_linearity: activation between the samplers (see ``opendelta.layers.ACTIVATIONS``).
        device: where the parameters live.
        dtype: the parameters' dtype.
    """

    def __init__(
        self,
        hidden_size: int,
        bottleneck_dim: int,
        rank: int = 1,
        w_init: str = "glorot-uniform",
        non_linearity: str = "gelu_new",
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        down = LowRankLinear(hidden_size, bottleneck_dim, rank, w_init, device=device, dtype=dtype)
        up = LowRankLinear(bottleneck_dim, hidden_size, rank, w_init, device=device, dtype=dtype)
        nn.init.zeros_(up.W_right)  # up(z) == 0 for every z: exactly the identity at init
        super().__init__(down, up, non_linearity)
