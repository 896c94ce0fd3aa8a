"""VeRA's shared random matrices: drawn from a seed, so a checkpoint may carry the seed instead of the matrices.

Every adapted layer reads slices of one pair, ``vera_A`` ``[r, max in]`` and ``vera_B`` ``[max out, r]``, sized by
the largest input and output over all targets. The draw is PEFT 0.21.2's, so a PEFT adapter saved with
``save_projection=False`` gets back the matrices it was trained with: a CPU ``torch.Generator`` seeded with the key,
``vera_A`` drawn first, then ``vera_B``, each Kaiming-uniform for a ReLU gain (``U(-b, b)``,
``b = sqrt(3) * sqrt(2) / sqrt(fan_in)``, ``fan_in`` the matrix's second size), in float32.
"""

from __future__ import annotations

import math

import torch

__all__ = ["draw_projections", "kaiming_uniform"]


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """A float32 ``shape`` tensor drawn ``U(-b, b)`` with ``b = sqrt(6 / shape[1])`` from ``generator``."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def draw_projections(r: int, in_features: int, out_features: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vera_A [r, in_features], vera_B [out_features, r])`` drawn from ``key``, on the CPU in float32."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    vera_a = kaiming_uniform((r, in_features), generator)
    vera_b = kaiming_uniform((out_features, r), generator)
    return vera_a, vera_b
