"""The tensor arithmetic of combining task tensors: task arithmetic, TIES, DARE, magnitude pruning, a truncated SVD.

Foundation layer for :func:`opendelta.combine_deltas`, knowing nothing of delta models: each function takes the
same tensor of several deltas (one per delta, same shape) and their weights, and returns one tensor. The semantics
are PEFT 0.21.2's ``peft.utils.merge_utils`` (so a combination made here equals PEFT's ``add_weighted_adapter``):

* ``linear``: task arithmetic, ``sum_i w_i t_i``;
* ``magnitude_prune``: each ``t_i`` keeps its ``int(density * numel)`` largest entries in magnitude, then the sum;
* ``dare_linear``: each ``t_i`` keeps each entry with probability ``density`` (a Bernoulli draw per entry, in the
  order of the deltas) and is divided by ``density``, so its expectation is unchanged; then the sum;
* ``ties`` / ``dare_ties``: pruned as ``magnitude_prune`` / ``dare_linear``, then every entry elects a sign (the sign
  of the pruned tensors' sum, ``"total"``, or of their signs' sum, ``"frequency"``; zero elects ``+``), and the
  weighted entries that agree with it are averaged (divided by how many agree, at least one).

The weights are a float32 tensor (PEFT's ``torch.tensor(weights)``), applied after pruning and after the sign
election. A density of 1 prunes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

__all__ = ["BASE_KINDS", "combine_tensors", "majority_sign_mask", "prune_largest", "prune_random", "svd_factors"]

BASE_KINDS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
"""The combinations of tensors; a combination of low-rank deltas adds ``cat`` and each of these ``_svd``."""

SignMethod = Literal["total", "frequency"]


def prune_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``int(density * numel)`` largest-magnitude entries set to zero."""
    if density >= 1:
        return tensor
    keep = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True).indices
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[keep] = 1
    return tensor * mask.view_as(tensor)


def prune_random(tensor: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: each entry kept with probability ``density`` (one Bernoulli draw per entry), the rest divided by it."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """For ``[n, ...]`` tensors, where each one's sign agrees with the sign elected across them (zero elects ``+``)."""
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def combine_tensors(
    kind: str,
    tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    density: float | None = None,
    majority_sign_method: SignMethod = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One tensor from several of one shape, by ``kind`` (one of :data:`BASE_KINDS`; see the module docstring).

    ``weights`` is ``[n]``; ``density`` is needed by every kind but ``linear``; DARE's draws come from ``generator``
    (the default generator when ``None``), one tensor after the other.
    """
    if kind == "linear":
        pruned = list(tensors)
    elif kind in ("ties", "magnitude_prune"):
        pruned = [prune_largest(t, _density(density)) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        pruned = [prune_random(t, _density(density), generator) for t in tensors]
    else:
        raise ValueError(f"unknown combination {kind!r}; one of {', '.join(BASE_KINDS)}")
    stacked = torch.stack(pruned, dim=0)
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    if kind not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    agree = majority_sign_mask(stacked, majority_sign_method)
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)


def svd_factors(
    dense: torch.Tensor, rank: int, clamp: float | None = None, full_matrices: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down, up)``, ``[rank, in]`` and ``[out, rank]``, whose product is ``dense``'s best rank-``rank`` part.

    ``up`` carries the singular values (``U S``), ``down`` is ``Vh``. With ``clamp`` both are clipped to the
    ``clamp`` quantile of their entries taken together, ``[-q, q]``. Half precision is decomposed in float32 (the
    CPU's SVD has no half kernels). A rank beyond ``dense``'s smaller side is padded with zeros.
    """
    work = dense.float() if dense.dtype in (torch.float16, torch.bfloat16) else dense
    left, values, right_t = torch.linalg.svd(work, full_matrices=full_matrices)
    kept = min(rank, values.numel())
    up = left[:, :kept] @ torch.diag(values[:kept])
    down = right_t[:kept, :]
    if clamp is not None:
        limit = torch.quantile(torch.cat([up.flatten(), down.flatten()]), clamp)
        up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    missing = rank - kept
    if missing > 0:
        up = torch.cat([up, up.new_zeros(up.shape[0], missing)], dim=1)
        down = torch.cat([down, down.new_zeros(missing, down.shape[1])], dim=0)
    return down.to(dense.dtype), up.to(dense.dtype)


def _density(density: float | None) -> float:
    if density is None:
        raise ValueError("pruning needs a density (the fraction of entries kept)")
    return density
