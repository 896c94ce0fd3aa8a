"""The orthogonal matrices OFT and BOFT multiply a frozen weight with: Cayley transforms of skew-symmetric blocks.

Qiu et al., 2023 (https://arxiv.org/abs/2306.07280): a block-diagonal ``R`` whose blocks are ``(I - Q)(I + Q)^-1``
for skew-symmetric ``Q`` is orthogonal and is the identity at ``Q = 0``. PEFT 0.21.2's OFT stores each ``Q`` as its
strict upper triangle and offers a truncated Neumann series for the inverse; its BOFT stores full square blocks and
uses the exact inverse. The functions here compute exactly what PEFT computes, in the same order of operations.
"""

from __future__ import annotations

import torch


def skew_from_upper(vec: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(b, n)`` strict-upper-triangle entries -> ``(b, H, H)`` skew-symmetric ``Q - Q^T``."""
    matrix = vec.new_zeros(vec.shape[0], block_size, block_size)
    matrix[:, rows, cols] = vec
    return matrix - matrix.transpose(-2, -1)


def cayley_exact(skew: torch.Tensor) -> torch.Tensor:
    """``(I - Q)(I + Q)^-1`` for a ``(b, H, H)`` skew-symmetric batch (``solve(..., left=False)``, as PEFT)."""
    size = skew.shape[-1]
    eye = torch.eye(size, device=skew.device).unsqueeze(0).expand(skew.shape[0], size, size)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


def cayley_neumann(skew: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT 0.21.2's Cayley-Neumann approximation with ``terms`` terms (``use_cayley_neumann=True``).

    ``I + 2Q + 2Q^2 + ... + 2Q^(t-2) + Q^(t-1)`` for ``t >= 5``; PEFT's loop makes ``t = 3`` and ``t = 4`` both
    ``I + 2Q + 2Q^2 + Q^3``, ``t = 2`` gives ``I + 2Q`` and ``t <= 1`` the identity. Reproduced as written there.
    """
    batch, size = skew.shape[0], skew.shape[-1]
    out = torch.eye(size, device=skew.device, dtype=skew.dtype).repeat(batch, 1, 1)
    if terms <= 1:
        return out
    out = out + 2.0 * skew
    if terms <= 2:
        return out
    power = torch.bmm(skew, skew)
    out = out + 2.0 * power
    for _ in range(3, terms - 1):
        power = torch.bmm(power, skew)
        out = out + 2.0 * power
    power = torch.bmm(power, skew)
    return out + power


def constrain_upper(vec: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, block_size: int, eps: float) -> None:
    """COFT's constraint, in place: each block's ``Q`` is pulled back onto the ball ``||Q||_F <= eps / sqrt(b)``.

    PEFT (after the OFT authors' code) rescales every block whose skew matrix is farther than ``eps / sqrt(b)`` from
    zero to exactly that distance, ``b`` being the number of stored blocks, and writes the result into the
    parameter before each use.
    """
    with torch.no_grad():
        skew = skew_from_upper(vec, rows, cols, block_size)
        radius = eps / torch.sqrt(torch.tensor(float(skew.shape[0])))
        norm = torch.norm(skew, dim=(1, 2), keepdim=True)
        projected = torch.where(norm <= radius, skew, radius * (skew / norm))
        vec.copy_(projected[:, rows, cols])


def identity_blocks_dropout(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """Multiplicative dropout: ``int(p * D)`` of the ``(D, H, H)`` blocks, chosen at random, become the identity."""
    count, size = blocks.shape[0], blocks.shape[-1]
    if count == 1:  # one shared block: PEFT skips the dropout
        return blocks
    dropped = int(p * count)
    mask = torch.cat([blocks.new_ones(dropped), blocks.new_zeros(count - dropped)])
    mask = mask[torch.randperm(count, device=blocks.device)].view(count, 1, 1)
    eye = torch.eye(size, device=blocks.device, dtype=blocks.dtype)
    return (1 - mask) * blocks + mask * eye
