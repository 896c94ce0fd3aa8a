"""The AdaLoRA branch: an update in SVD form, ``x -> s / ranknum * dropout(x) (E * A)^T B^T``, beside a linear layer.

Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (https://arxiv.org/abs/2303.10512):
``delta W = P Lambda Q`` with ``P = B`` (left singular vectors, ``[out, r]``), ``Lambda = diag(E)`` (singular values,
``[r, 1]``) and ``Q = A`` (right singular vectors, ``[r, in]``). ``E`` starts at zero and ``A``, ``B`` at
``N(0, 0.02)`` (PEFT 0.21.2's ``SVDLinear``), so a fresh update is zero. A triplet ``(B[:, i], E[i], A[i])`` is
pruned by zeroing ``E[i]`` during training, and by dropping it when the ranks are fixed (a saved model).

The scale is ``lora_alpha / (ranknum + 1e-5)`` with ``ranknum`` the *initial* rank, which pruning never changes (as
PEFT keeps it on resize): a pruned layer computes exactly what the masked one did.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from opendelta.plugin_api import is_linear, stored_update

_EPS = 1e-5
"""PEFT's guard in ``scaling / (ranknum + 1e-5)``, kept so outputs agree to the last bit."""


class AdaLoraLayer(nn.Module):
    """A singular-value-form update of one linear layer (or of some output slices of a fused one).

    Args:
        in_features: input size of the modified layer.
        out_features: output size of the modified layer.
        init_r: the initial rank (``AdaLoraConfig.init_r``): the scale's denominator.
        alpha: the scale numerator (``lora_alpha``).
        pattern: which of the ``init_r`` initial triplets this layer holds (a saved ``rank_pattern`` entry);
            ``None``: all of them.
        dropout: dropout probability on the branch's input.
        out_index: for a fused layer, the output features the update writes to; ``None`` means all.
        device: where the parameters live (the layer's device).
        dtype: their dtype (the layer's compute dtype).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        init_r: int,
        alpha: float,
        pattern: Sequence[bool] | None = None,
        dropout: float = 0.0,
        out_index: torch.Tensor | None = None,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.init_r = in_features, out_features, init_r
        if pattern is not None and len(pattern) != init_r:
            raise ValueError(f"pattern has {len(pattern)} flags, init_r is {init_r}")
        # the rank first: the tensors below are where core's memory budget refuses an absurd init_r, before a
        # Python list of init_r flags is built (at 10**9, 8 GiB of list)
        self.r = init_r if pattern is None else sum(bool(p) for p in pattern)
        self.ranknum = float(init_r)
        self.scaling = float(alpha)
        rows = out_features if out_index is None else int(out_index.numel())
        self.lora_A = nn.Parameter(torch.empty(self.r, in_features, device=device, dtype=dtype))  # (r, in)
        self.lora_E = nn.Parameter(torch.zeros(self.r, 1, device=device, dtype=dtype))  # (r, 1)
        self.lora_B = nn.Parameter(torch.empty(rows, self.r, device=device, dtype=dtype))  # (out or slice, r)
        with torch.no_grad():
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("out_index", out_index, persistent=False)
        self.pattern = [True] * init_r if pattern is None else [bool(p) for p in pattern]

    def rows_kept(self, full_pattern: Sequence[bool]) -> list[bool]:
        """This layer's triplets that ``full_pattern`` (one flag per initial triplet) keeps, in its own order."""
        return [bool(keep) for keep, held in zip(full_pattern, self.pattern, strict=True) if held]

    def full_pattern(self, kept: Sequence[bool]) -> list[bool]:
        """The ``init_r`` flags of PEFT's ``rank_pattern`` for ``kept`` (one flag per triplet of this layer)."""
        flags = iter(kept)
        return [bool(next(flags)) if held else False for held in self.pattern]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The branch's contribution to the layer's output, shape ``(..., out_features)``."""
        x = x.to(self.lora_A.dtype)
        update = (self.lora_dropout(x) @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling
        update = update / (self.ranknum + _EPS)  # (..., in) -> (..., r) -> (..., rows)
        if self.out_index is None:
            return update
        full = update.new_zeros(*update.shape[:-1], self.out_features)
        return full.index_copy(-1, self.out_index, update)

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``B (A * E) * scaling / ranknum`` as an ``[out_features, in_features]`` matrix."""
        dense = self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + _EPS)  # (rows, in)
        if self.out_index is None:
            return dense
        return dense.new_zeros(self.out_features, self.in_features).index_copy(0, self.out_index, dense)

    def orthogonality(self) -> list[torch.Tensor]:
        """``||A A^T - I||_F`` and ``||B^T B - I||_F``: how far the singular vectors are from orthonormal."""
        out = []
        for cov in (self.lora_A @ self.lora_A.T, self.lora_B.T @ self.lora_B):  # (r, r) each
            eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
            out.append(torch.norm(cov - eye, p="fro"))
        return out

    # Mergeable -----------------------------------------------------------------------------------------------
    def can_merge(self, host: nn.Module) -> bool:
        """An additive change of the host's weight: it merges into any linear layer it was built for."""
        return is_linear(host)

    def merge_update(self, host: nn.Module) -> dict[str, torch.Tensor]:
        """The dense update, added to ``W`` in its storage layout (``[in, out]`` for GPT-2's Conv1D)."""
        return {"weight": stored_update(host, self.delta_weight().detach())}

    def extra_repr(self) -> str:
        sliced = "" if self.out_index is None else f", out_slice={self.out_index.numel()}"
        return f"in={self.in_features}, out={self.out_features}, r={self.r}/{self.init_r}{sliced}"
