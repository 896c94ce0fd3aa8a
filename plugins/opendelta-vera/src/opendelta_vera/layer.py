"""The VeRA branch: ``x -> lambda_b * (B (lambda_d * (A dropout(x))))``, added beside a frozen linear layer ``W x``.

Kopiczko et al., 2024, "VeRA: Vector-based Random Matrix Adaptation" (https://arxiv.org/abs/2310.11454). ``A`` and
``B`` are frozen random matrices shared by every adapted layer (each reads the slice its sizes need: the first
``in`` columns of ``A``, the first ``out`` rows of ``B``); only the vectors ``lambda_d`` ``(r,)`` and ``lambda_b``
``(out,)`` train. The math and the merge follow PEFT 0.21.2's ``vera.Linear``.

The shared pair is stored once: as buffers of the first layer of a delta model (the *owner*), which every other
layer of that model reads through a plain reference (not a registered submodule), so the backbone's
``state_dict()``, the delta's checkpoint and ``.to()`` see one copy, wherever the owner sits in the backbone.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from opendelta.plugin_api import is_linear, stored_update


class VeraLayer(nn.Module):
    """The VeRA update of one linear layer (or of some output slices of a fused one, like GPT-2's ``c_attn``).

    Args:
        in_features: input size of the modified layer.
        out_features: output size of the modified layer (all of it, for a fused one).
        r: rank of the shared matrices.
        projections: ``(vera_A, vera_B)`` for the owner, which stores them; ``None`` for any other layer.
        owner: for any other layer, the owner whose matrices it reads.
        save_projection: whether the owner's matrices are in its ``state_dict()`` (PEFT's ``save_projection``).
        dropout: dropout probability on the branch's input.
        out_index: for a fused layer, the output features the update writes to (rows of ``B`` it reads); ``None``:
            all of them.
        d_initial: the initial ``lambda_d`` (``lambda_b`` starts at zero) with ``init_weights``.
        init_weights: the identity start; ``False``: ``lambda_b`` ones and ``lambda_d`` ``N(0, 1)``, as PEFT's.
        device: where the vectors live (the layer's device).
        dtype: their dtype (the layer's compute dtype).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        *,
        projections: tuple[torch.Tensor, torch.Tensor] | None = None,
        owner: VeraLayer | None = None,
        save_projection: bool = True,
        dropout: float = 0.0,
        out_index: torch.Tensor | None = None,
        d_initial: float = 0.1,
        init_weights: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if (projections is None) == (owner is None):
            raise ValueError("a VeraLayer either stores the shared projections or reads an owner's, not both")
        self.in_features, self.out_features, self.r = in_features, out_features, r
        rows = out_features if out_index is None else int(out_index.numel())
        if init_weights:
            lambda_b, lambda_d = torch.zeros(rows), torch.full((r,), float(d_initial))
        else:
            lambda_b, lambda_d = torch.ones(rows), torch.randn(r)
        self.vera_lambda_b = nn.Parameter(lambda_b.to(device=device, dtype=dtype))  # (out or slice,)
        self.vera_lambda_d = nn.Parameter(lambda_d.to(device=device, dtype=dtype))  # (r,)
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("out_index", out_index, persistent=False)
        self.vera_A: torch.Tensor | None
        self.vera_B: torch.Tensor | None
        if projections is not None:
            vera_a, vera_b = (p.to(device=device, dtype=dtype) for p in projections)
            self.register_buffer("vera_A", vera_a, persistent=save_projection)  # (r, max in)
            self.register_buffer("vera_B", vera_b, persistent=save_projection)  # (max out, r)
        object.__setattr__(self, "_owner", owner)  # a plain reference: not a submodule, not in state_dict()

    @property
    def owner(self) -> VeraLayer:
        """The layer that stores the shared matrices (this one, or the first layer of its delta model)."""
        return self._owner if self._owner is not None else self  # type: ignore[no-any-return]

    def projections(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices of the shared matrices, ``A [r, in]`` and ``B [rows, r]``, on ``device`` in ``dtype``."""
        owner = self.owner
        vera_a, vera_b = owner.vera_A, owner.vera_B
        if vera_a is None or vera_b is None or vera_a.shape[1] < self.in_features:
            raise RuntimeError("the shared VeRA projections are missing or too small for this layer")
        sliced_a = vera_a[: self.r, : self.in_features]
        if self.out_index is None:
            sliced_b = vera_b[: self.out_features, : self.r]
        else:
            sliced_b = vera_b.index_select(0, self.out_index.to(vera_b.device))[:, : self.r]
        return sliced_a.to(device=device, dtype=dtype), sliced_b.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The branch's contribution to the layer's output, shape ``(..., out_features)``, in ``x``'s dtype."""
        lambda_b, lambda_d = self.vera_lambda_b, self.vera_lambda_d
        sliced_a, sliced_b = self.projections(x.device, lambda_d.dtype)
        low = lambda_d * functional.linear(self.vera_dropout(x.to(lambda_d.dtype)), sliced_a)  # (..., r)
        update = lambda_b * functional.linear(low, sliced_b)  # (..., rows)
        if self.out_index is not None:
            full = update.new_zeros(*update.shape[:-1], self.out_features)
            update = full.index_copy(-1, self.out_index, update)
        return update.to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``(lambda_b B) (lambda_d A)`` as an ``[out_features, in_features]`` matrix (for merging).

        Computed in float32 when the vectors are half precision (as PEFT does on CPU), returned in their dtype.
        """
        lambda_b, lambda_d = self.vera_lambda_b, self.vera_lambda_d
        compute = torch.float32 if lambda_b.dtype in (torch.float16, torch.bfloat16) else lambda_b.dtype
        sliced_a, sliced_b = self.projections(lambda_b.device, compute)
        dense = (lambda_b.to(compute)[:, None] * sliced_b) @ (lambda_d.to(compute)[:, None] * sliced_a)  # (rows, in)
        if self.out_index is not None:
            dense = dense.new_zeros(self.out_features, self.in_features).index_copy(0, self.out_index, dense)
        return dense.to(lambda_b.dtype)

    # Mergeable -----------------------------------------------------------------------------------------------
    def can_merge(self, host: nn.Module) -> bool:
        """VeRA is a change of the host's weight: it merges into any linear layer it was built for (quantized too)."""
        return is_linear(host)

    def merge_update(self, host: nn.Module) -> dict[str, torch.Tensor]:
        """The dense update, in the host's storage layout (``[out, in]``; ``[in, out]`` for GPT-2's ``Conv1D``)."""
        return {"weight": stored_update(host, self.delta_weight().detach())}

    def extra_repr(self) -> str:
        sliced = "" if self.out_index is None else f", out_slice={self.out_index.numel()}"
        shared = ", stores the shared projections" if self._owner is None else ""
        return f"in={self.in_features}, out={self.out_features}, r={self.r}{sliced}{shared}"
