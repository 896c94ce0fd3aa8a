"""Where each spectral coefficient sits: ``n`` distinct entries of an ``[out, in]`` spectrum, drawn from a seed.

PEFT 0.21.2 does not save these locations; it draws them again from ``random_loc_seed`` whenever it builds a layer.
To read PEFT's files (and our own) the draw must be PEFT's, bit for bit: a permutation of the ``out * in`` flat
positions from ``torch.randperm`` with a CPU generator seeded with the seed, its first ``n`` positions taken in
order and read row-major (``row = p // in``, ``column = p % in``). Every layer of one shape gets the same locations.
"""

from __future__ import annotations

from functools import lru_cache

import torch


def frequency_locations(out_features: int, in_features: int, n_frequency: int, seed: int) -> torch.Tensor:
    """The ``[2, n_frequency]`` (row, column) locations of a layer's coefficients, int64, on the CPU (a new tensor).

    Raises:
        ValueError: ``n_frequency`` is not in ``1..out_features * in_features`` (distinct locations).
    """
    size = out_features * in_features
    if not 1 <= n_frequency <= size:
        raise ValueError(
            f"n_frequency must be in 1..{size} (out * in = {out_features} * {in_features}), got {n_frequency}"
        )
    return _drawn(out_features, in_features, n_frequency, seed).clone()


@lru_cache(maxsize=32)
def _drawn(out_features: int, in_features: int, n_frequency: int, seed: int) -> torch.Tensor:
    """The draw, made once per shape and seed, which a model's layers of one shape share.

    The permutation of all ``out * in`` positions (1 GiB of int64 for a 16384 x 8192 layer) is the slow, large part.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    flat = torch.randperm(out_features * in_features, generator=generator)[:n_frequency]
    rows = torch.div(flat, in_features, rounding_mode="floor")
    return torch.stack([rows, flat - rows * in_features])
