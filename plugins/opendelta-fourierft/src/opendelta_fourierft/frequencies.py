"""Where each spectral coefficient sits: ``n`` distinct entries of an ``[out, in]`` spectrum, drawn from a seed.

PEFT 0.21.2 does not save these locations; it draws them again from ``random_loc_seed`` whenever it builds a layer.
To read PEFT's files (and our own) the draw must be PEFT's, bit for bit: a permutation of the ``out * in`` flat
positions from ``torch.randperm`` with a CPU generator seeded with the seed, its first ``n`` positions taken in
order and read row-major (``row = p // in``, ``column = p % in``). Every layer of one shape gets the same locations.
"""

from __future__ import annotations

import torch


def frequency_locations(out_features: int, in_features: int, n_frequency: int, seed: int) -> torch.Tensor:
    """The ``[2, n_frequency]`` (row, column) locations of a layer's coefficients, int64, on the CPU.

    Raises:
        ValueError: ``n_frequency`` is not in ``1..out_features * in_features`` (distinct locations).
    """
    size = out_features * in_features
    if not 1 <= n_frequency <= size:
        raise ValueError(
            f"n_frequency must be in 1..{size} (out * in = {out_features} * {in_features}), got {n_frequency}"
        )
    generator = torch.Generator(device="cpu").manual_seed(seed)
    flat = torch.randperm(size, generator=generator)[:n_frequency]
    rows = torch.div(flat, in_features, rounding_mode="floor")
    return torch.stack([rows, flat - rows * in_features])
