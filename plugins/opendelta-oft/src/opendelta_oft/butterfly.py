"""BOFT's butterfly structure: how many blocks of what size each factor has, and the permutations between factors.

Liu et al., 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization"
(https://arxiv.org/abs/2311.06243): the orthogonal matrix is a product of ``m`` block-diagonal factors, each
conjugated by a butterfly permutation ``P_i B_i P_i^T``, so that ``m`` factors of ``b x b`` blocks reach as far as
one block of ``b 2^(m-1)``. The sizes, their checks and the permutations are PEFT 0.21.2's ``BOFTLayer``'s.
"""

from __future__ import annotations

import torch


def butterfly_blocks(in_features: int, block_size: int, factors: int, where: str) -> int:
    """The number of blocks per factor, ``in_features / block_size``, checked as PEFT checks it.

    Raises:
        ValueError: the combination does not fit ``in_features``; the message starts with ``where`` and says why.
    """
    if in_features % block_size:
        raise ValueError(f"{where}: boft_block_size={block_size} does not divide in_features={in_features}")
    extra = factors - 1  # PEFT's (and the paper's) count of butterfly factors beyond the first
    if extra and (extra >= in_features.bit_length() or in_features % (block_size * 2**extra)):
        raise ValueError(
            f"{where}: in_features={in_features} must be a multiple of boft_block_size * 2 ** "
            f"(boft_n_butterfly_factor - 1) for boft_block_size={block_size}, boft_n_butterfly_factor={factors}"
        )
    block_num = in_features // block_size
    if extra and (block_num % 2 or block_size % 2):
        raise ValueError(
            f"{where}: with boft_n_butterfly_factor={factors} both the block size ({block_size}) and the number of "
            f"blocks ({block_num}) must be even"
        )
    return block_num


def _sorted_order(width: int, half: int) -> torch.Tensor:
    """Within a group of ``width``: its chunks of ``half``, the even-numbered ones first, then the odd-numbered."""
    chunks = int(width // half)
    order = [*range(0, chunks, 2), *range(1, chunks, 2)]
    return torch.cat([torch.arange(c * half, c * half + half) for c in order])


def butterfly_permutation(in_features: int, groups: int, half: int, butterfly: bool) -> torch.Tensor:
    """The permutation of factor with ``groups`` groups as indices (``P[i, perm[i]] = 1``); identity without butterfly.

    Raises:
        ValueError: the groups are too many for blocks of ``2 * half``.
    """
    if not butterfly:
        return torch.arange(in_features)
    if groups * half * 2 > in_features:
        raise ValueError("invalid number of butterfly blocks")
    width = in_features // groups
    order = _sorted_order(width, half)
    return torch.cat([start + order for start in range(0, in_features, width)])


def permutations(in_features: int, block_size: int, block_num: int, factors: int) -> torch.Tensor:
    """``(factors, in_features)`` indices of each factor's permutation."""
    return torch.stack(
        [butterfly_permutation(in_features, block_num // 2**i, block_size // 2, factors > 1) for i in range(factors)]
    )
