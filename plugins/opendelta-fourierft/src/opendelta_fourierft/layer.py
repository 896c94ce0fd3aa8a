"""The FourierFT delta: a weight update ``s * real(ifft2(F))`` whose spectrum ``F`` has ``n`` trainable entries.

Gao et al., 2024, "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform" (https://arxiv.org/abs/2405.03003).
The ``n`` coefficients sit at fixed random locations of an ``[out, in]`` spectrum, zero elsewhere; the update is the
real part of its inverse 2-D DFT, times ``scaling``. It is added beside the frozen layer, ``W x + dW x``, as PEFT
0.21.2's ``FourierFTLinear`` computes it: the spectrum and its transform in float32 (``ifft2`` has no half-precision
kernel on every device), the update then cast to the spectrum's dtype. A float64 layer's transform runs in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from opendelta.plugin_api import is_linear, stored_update
from opendelta_fourierft.frequencies import frequency_locations


class FourierFTLayer(nn.Module):
    """The spectral update of one linear layer (or of some output rows of a fused one, like GPT-2's ``c_attn``).

    Args:
        in_features: input size of the modified layer.
        out_features: output size of the modified layer.
        n_frequency: trainable coefficients (at most ``rows * in_features``).
        scaling: factor on the transformed update.
        random_loc_seed: the seed of the coefficients' locations (see ``frequencies``).
        out_index: for a fused layer, the output rows the update covers (the spectrum is ``[len(out_index), in]``);
            ``None``: all of them.
        init_weights: start the spectrum at zeros (the identity); else at ``N(0, 1)``, PEFT's default.
        device: where the spectrum lives (the layer's device).
        dtype: its dtype (the layer's compute dtype).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n_frequency: int,
        scaling: float,
        random_loc_seed: int,
        out_index: torch.Tensor | None = None,
        *,
        init_weights: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rows = out_features if out_index is None else int(out_index.numel())
        self.n_frequency, self.scaling, self.random_loc_seed = n_frequency, scaling, random_loc_seed
        make = torch.zeros if init_weights else torch.randn
        self.fourierft_spectrum = nn.Parameter(make(n_frequency, device=device, dtype=dtype))  # (n,)
        # drawn again from the seed on every build (PEFT saves no locations): not part of the state dict
        locations = frequency_locations(self.rows, in_features, n_frequency, random_loc_seed)
        self.register_buffer("indices", locations.to(device), persistent=False)  # (2, n): rows, columns
        self.register_buffer("out_index", out_index, persistent=False)

    def delta_weight(self) -> torch.Tensor:
        """The update ``scaling * real(ifft2(F))`` as ``[rows, in_features]``, in the spectrum's dtype."""
        spectrum = self.fourierft_spectrum
        exact = torch.promote_types(spectrum.dtype, torch.float32)  # float32 for half precision (PEFT's); float64 kept
        dense = torch.zeros(self.rows, self.in_features, device=spectrum.device, dtype=exact)
        dense[self.indices[0], self.indices[1]] = spectrum.to(exact)
        return (torch.fft.ifft2(dense).real * self.scaling).to(spectrum.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The update's contribution to the layer's output, ``dW x``, shape ``(..., out_features)``."""
        delta = self.delta_weight()
        update = F.linear(x.to(delta.dtype), delta).to(x.dtype)
        if self.out_index is None:
            return update
        full = update.new_zeros(*update.shape[:-1], self.out_features)
        return full.index_copy(-1, self.out_index, update)

    # Mergeable -----------------------------------------------------------------------------------------------
    def can_merge(self, host: nn.Module) -> bool:
        """An additive change of the host's weight: merges into any linear layer (quantized ones too)."""
        return is_linear(host)

    def merge_update(self, host: nn.Module) -> dict[str, torch.Tensor]:
        """``dW`` in the host's storage layout (``[out, in]``; ``[in, out]`` for GPT-2's ``Conv1D``)."""
        delta = self.delta_weight().detach()
        if self.out_index is not None:
            delta = delta.new_zeros(self.out_features, self.in_features).index_copy(0, self.out_index, delta)
        return {"weight": stored_update(host, delta)}

    def extra_repr(self) -> str:
        sliced = "" if self.out_index is None else f", out_slice={self.rows}"
        return (
            f"in={self.in_features}, out={self.out_features}, n_frequency={self.n_frequency}, "
            f"scaling={self.scaling:g}, random_loc_seed={self.random_loc_seed}{sliced}"
        )
