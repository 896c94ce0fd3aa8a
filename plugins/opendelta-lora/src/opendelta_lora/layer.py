"""The LoRA branch: ``x -> (alpha / r) * B A dropout(x)``, added beside a frozen linear layer ``W x``.

Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (https://arxiv.org/abs/2106.09685).
``A`` starts Kaiming-uniform and ``B`` at zero, so a fresh LoRA leaves the model's outputs unchanged.
The update it represents is the dense matrix :meth:`LoraLayer.delta_weight`, which is what merging adds to ``W``.

PEFT's other initialisations (``init_lora_weights``) are here too. PiSSA and OLoRA start ``B A`` from the base
weight and make the base a residual, ``W_res = W - s B0 A0``; this layer leaves ``W`` as it is stored and subtracts
its frozen initial update instead (buffers ``lora_A0``, ``lora_B0``): ``W x - s B0 A0 x + s B A dropout(x)`` is
``W_res x + s B A dropout(x)``, PEFT's output, and detaching gives back the untouched ``W``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from opendelta.plugin_api import CheckpointError, LoadPlan, LowRankFactors, is_linear, stored_update
from opendelta_lora.config import LoraConfig, init_kind, pissa_niter


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rank-stabilised LoRA (PEFT's ``use_rslora``)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def principal_init(
    weight: torch.Tensor, r: int, scaling: float, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's ``(A, B)`` from an ``[out, in]`` weight: ``s B A`` is its top-``r`` singular part, in float32.

    ``W = V S U^T``; with ``S_r`` divided by the scale, ``A = sqrt(S_r) U_r^T`` and ``B = V_r sqrt(S_r)``. ``niter``
    takes the singular part from ``torch.svd_lowrank`` with that many subspace iterations instead of a full SVD.
    """
    weight = weight.detach().to(torch.float32)
    if niter is None:
        left, values, right_t = torch.linalg.svd(weight, full_matrices=False)
        left, values, right_t = left[:, :r], values[:r], right_t[:r]
    else:
        left, values, right = torch.svd_lowrank(weight, q=r, niter=niter)
        right_t = right.t()
    root = torch.sqrt(values / scaling)
    return root[:, None] * right_t, left * root[None, :]


def olora_init(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA's ``(A, B)`` from an ``[out, in]`` weight: ``W = Q R``, ``A = R[:r]``, ``B = Q[:, :r]``, in float32."""
    q, upper = torch.linalg.qr(weight.detach().to(torch.float32))
    return upper[:r].contiguous(), q[:, :r].contiguous()


class LoraLayer(nn.Module):
    """A low-rank update of one linear layer (or of some output slices of a fused one, like GPT-2's ``c_attn``).

    Args:
        in_features: input size of the modified layer.
        out_features: output size of the modified layer.
        r: rank.
        alpha: scale numerator (the branch is scaled by ``alpha / r``).
        dropout: dropout probability on the branch's input.
        out_index: for a fused layer, the output features the update writes to; ``None`` means all.
        use_rslora: scale by ``alpha / sqrt(r)`` instead.
        init_lora_weights: PEFT's initialisations (see :class:`~opendelta_lora.LoraConfig`).
        base_weight: for ``"pissa..."`` and ``"olora"``, the ``[rows, in]`` weight the update starts from (the
            rows the update writes to).
        max_rank: allocate ``A`` and ``B`` at this rank, the part beyond ``r`` zero, with the scaling a tensor
            buffer: ``load_weights`` then loads any rank up to it in place (see ``LoraConfig.max_rank``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        out_index: torch.Tensor | None = None,
        *,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        base_weight: torch.Tensor | None = None,
        max_rank: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.r, self.max_rank = in_features, out_features, r, max_rank
        self.init_kind = init_kind(init_lora_weights)
        scaling = lora_scaling(alpha, r, use_rslora)
        self.scaling: float | torch.Tensor
        if max_rank is None:
            self.scaling = scaling
        else:  # a tensor, which a compiled graph reads, where it would guard on (and recompile for) a float
            if self.init_kind not in ("kaiming", "random", "gaussian"):
                raise ValueError(f"max_rank does not apply to init_lora_weights={init_lora_weights!r}")
            self.register_buffer("scaling", torch.tensor(scaling, device=device, dtype=dtype), persistent=False)
        width = r if max_rank is None else max_rank
        rows = out_features if out_index is None else int(out_index.numel())
        self.lora_A = nn.Parameter(torch.empty(width, in_features, device=device, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(rows, width, device=device, dtype=dtype))  # (out or slice, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("out_index", out_index, persistent=False)
        self.lora_A0: torch.Tensor | None
        self.lora_B0: torch.Tensor | None
        self.register_buffer("lora_A0", None)
        self.register_buffer("lora_B0", None)
        self._initialise(init_lora_weights, base_weight)

    def _initialise(self, init_lora_weights: bool | str, base_weight: torch.Tensor | None) -> None:
        """Set ``A`` and ``B`` as PEFT's ``init_lora_weights`` does; PiSSA and OLoRA also keep them as ``A0, B0``."""
        kind = self.init_kind
        with torch.no_grad():
            if kind in ("kaiming", "random", "gaussian"):
                if kind == "gaussian":
                    nn.init.normal_(self.lora_A, std=1 / self.r)
                else:
                    nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                if kind == "random":  # PEFT's False: both as nn.Linear initialises its weight
                    nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
                self.lora_A[self.r :].zero_()  # beyond the rank used (max_rank): zero in both, so no gradient either
                self.lora_B[:, self.r :].zero_()
                return
            if base_weight is None:
                raise ValueError(f"init_lora_weights={init_lora_weights!r} starts from the base weight; pass it")
            if kind == "olora":
                down, up = olora_init(base_weight, self.r)
            else:
                down, up = principal_init(base_weight, self.r, self.scaling, pissa_niter(init_lora_weights))
            self.lora_A.copy_(down)
            self.lora_B.copy_(up)
            # the initial update, frozen: subtracting it is the residual base weight (saved, so a load is exact)
            self.lora_A0 = self.lora_A.detach().clone()
            self.lora_B0 = self.lora_B.detach().clone()

    @property
    def rewrites_base(self) -> bool:
        """Whether the base weight is read as the residual ``W - s B0 A0`` (PiSSA, OLoRA)."""
        return self.lora_A0 is not None

    def _low_rank(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(low, up)`` with ``low @ up`` the branch output before scaling: ``[N, r]`` and ``[r, rows]``.

        With a residual base it is ``[B A dropout(x) | -B0 A0 x]``, ``2r`` wide: dropout never reaches the base.
        """
        flat = x.reshape(-1, self.in_features)
        low = self.lora_dropout(flat) @ self.lora_A.t()
        up = self.lora_B.t()
        if self.lora_A0 is None or self.lora_B0 is None:
            return low, up
        return torch.cat([low, flat @ self.lora_A0.t()], dim=1), torch.cat([up, -self.lora_B0.t()], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The branch's contribution to the layer's output, shape ``(..., out_features)``."""
        if self.rewrites_base:
            low, up = self._low_rank(x)
            update = (low @ up * self.scaling).view(*x.shape[:-1], -1)
        else:
            update = self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t() * self.scaling  # (..., r) -> (..., rows)
        if self.out_index is None:
            return update
        full = update.new_zeros(*update.shape[:-1], self.out_features)
        return full.index_copy(-1, self.out_index, update)

    def add_to(self, hidden: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``hidden + forward(x)`` as one fused multiply-add (``addmm``): no full-size intermediate tensors.

        ``hidden`` is the linear layer's fresh output, so without autograd it is updated in place.
        """
        if self.out_index is not None:
            return hidden + self.forward(x)
        low, up = self._low_rank(x)  # (N, r), (r, out)
        up = up * self.scaling  # scaled on the small matrix
        if not torch.is_grad_enabled() and hidden.is_contiguous():
            hidden.view(-1, self.out_features).addmm_(low, up)  # a view of the same memory: (N, out)
            return hidden
        return torch.addmm(hidden.reshape(-1, self.out_features), low, up).view_as(hidden)

    def low_rank_factors(self) -> LowRankFactors | None:
        """``(A, B, scaling, out_index)`` while the branch is just ``scaling * B A x``.

        Not with a residual base (PiSSA, OLoRA), nor with dropout in training mode: core then calls the layer itself.
        """
        if self.rewrites_base or (self.training and isinstance(self.lora_dropout, nn.Dropout)):
            return None
        return LowRankFactors(self.lora_A, self.lora_B, self.scaling, self.out_index)

    def load_low_rank_factors(self, down: torch.Tensor, up: torch.Tensor) -> None:
        """Overwrite ``A`` with ``down`` and ``B`` with ``up`` in place (``combine_deltas``); the scale stays."""
        if down.shape != self.lora_A.shape or up.shape != self.lora_B.shape:
            raise ValueError(
                f"factors of shapes {tuple(down.shape)}, {tuple(up.shape)} do not fit A {tuple(self.lora_A.shape)}, "
                f"B {tuple(self.lora_B.shape)}"
            )
        with torch.no_grad():
            self.lora_A.copy_(down)
            self.lora_B.copy_(up)

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scaling * B A`` as an ``[out_features, in_features]`` matrix (for merging).

        With a residual base (PiSSA, OLoRA) it is ``scaling * (B A - B0 A0)``: what turns ``W`` into ``W_res + s B A``.
        """
        dense = self.lora_B @ self.lora_A * self.scaling  # (rows, in)
        if self.lora_A0 is not None and self.lora_B0 is not None:
            dense = dense - self.lora_B0 @ self.lora_A0 * self.scaling
        if self.out_index is None:
            return dense
        full = dense.new_zeros(self.out_features, self.in_features)
        return full.index_copy(0, self.out_index, dense)

    def base_update(self) -> torch.Tensor | None:
        """What the residual base is minus the stored weight, ``-s B0 A0`` as ``[out, in]``; ``None`` without one."""
        if self.lora_A0 is None or self.lora_B0 is None:
            return None
        dense = -(self.lora_B0 @ self.lora_A0) * self.scaling
        if self.out_index is None:
            return dense
        return dense.new_zeros(self.out_features, self.in_features).index_copy(0, self.out_index, dense)

    def can_merge(self, host: nn.Module) -> bool:
        """LoRA is a change of the host's weight: it merges into any linear layer it was built for (quantized too)."""
        return is_linear(host)

    def merge_update(self, host: nn.Module) -> dict[str, torch.Tensor]:
        """``scale * B A``, added to ``W`` in its storage layout (``[out, in]``; ``[in, out]`` for GPT-2's Conv1D)."""
        return {"weight": stored_update(host, self.delta_weight().detach())}

    def load_plan(self, config: LoraConfig) -> LoadPlan:
        """How a checkpoint of ``config`` loads in place (``load_weights``): with ``max_rank``, any rank up to it.

        Dropout and the initialisation may differ always: neither changes what the loaded tensors compute (a
        residual initialisation brings tensors of its own, which the names check refuses).

        Raises:
            CheckpointError: the checkpoint's rank is above ``max_rank``.
        """
        kept = ("lora_dropout", "init_lora_weights", "max_rank")
        if self.max_rank is None:
            return LoadPlan(kept=kept[:2])
        if config.lora_r > self.max_rank:
            raise CheckpointError(
                f"the checkpoint's LoRA rank lora_r={config.lora_r} is above this LoRA's max_rank={self.max_rank}; "
                f"build the delta model with max_rank >= {config.lora_r}. Nothing was changed"
            )
        scaling = torch.tensor(lora_scaling(config.lora_alpha, config.lora_r, config.use_rslora))
        return LoadPlan(
            padded={"lora_A": (0,), "lora_B": (1,)},
            values={"scaling": scaling},
            taken=("lora_r", "lora_alpha", "use_rslora"),
            kept=kept,
        )

    def extra_repr(self) -> str:
        sliced = "" if self.out_index is None else f", out_slice={self.out_index.numel()}"
        init = "" if self.init_kind == "kaiming" else f", init={self.init_kind}"
        rank = f"r={self.r}" if self.max_rank is None else f"max_rank={self.max_rank}"
        scaling = float(self.scaling)
        return f"in={self.in_features}, out={self.out_features}, {rank}, scaling={scaling:g}{sliced}{init}"
