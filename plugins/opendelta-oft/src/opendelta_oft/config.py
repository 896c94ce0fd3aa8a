"""The configurations of OFT and BOFT, with PEFT 0.21.2's field names, defaults and checks.

``modified_modules`` is PEFT's ``target_modules``. PEFT options that change what the adapter computes and that
these methods do not implement are refused by name: a ``bias`` other than ``"none"`` (train biases with
``unfrozen_modules`` instead), and ``modules_to_save`` (not a field: core refuses it as an unknown keyword).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from opendelta.plugin_api import DeltaConfig, DeltaConfigError


def _check_bias(owner: str, bias: str) -> None:
    if bias != "none":
        raise DeltaConfigError(
            f"{owner}.bias={bias!r} is not supported (only 'none'): PEFT's 'all'/'{owner[:-6].lower()}_only' make "
            f"biases trainable; do that with unfrozen_modules (or freeze_module(exclude=[...])) instead"
        )


def _check_one_of(owner: str, first: tuple[str, int], second: tuple[str, int]) -> None:
    """PEFT's rule: exactly one of the two sizes is non-zero, since their product is the layer's input width."""
    for name, value in (first, second):
        if value < 0:
            raise DeltaConfigError(f"{owner}.{name} must be >= 0, got {value}")
    if (first[1] == 0) == (second[1] == 0):
        raise DeltaConfigError(
            f"{owner}: set exactly one of {first[0]} ({first[1]}) and {second[0]} ({second[1]}), the other 0: their "
            f"product is each layer's in_features, so one determines the other"
        )


def _check_probability(owner: str, name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise DeltaConfigError(f"{owner}.{name} must be in [0, 1), got {value}")


@dataclass(kw_only=True)
class OFTConfig(DeltaConfig):
    """Configuration of :class:`~opendelta_oft.OFTModel` (PEFT's ``OFTConfig`` names and defaults).

    Attributes:
        r: number of orthogonal blocks per layer (``in_features / oft_block_size``); ``0``: derived from
            ``oft_block_size``. Set exactly one of ``r`` and ``oft_block_size``.
        oft_block_size: size of each square block (default 32); must divide every modified layer's ``in_features``
            (a layer it does not divide is refused by name, with the sizes that would fit). ``0``: derived from ``r``.
        module_dropout: multiplicative dropout: in training, this fraction of the blocks is set to the identity.
        bias: ``"none"`` only (see the module docstring).
        init_weights: start at the identity (``Q = 0``); ``False`` draws ``Q`` from ``N(0, 0.1)`` (tests only).
        coft: constrained OFT: keep each block within ``eps`` of the identity (the parameter is projected in place
            before each use, as PEFT does).
        eps: COFT's radius (only with ``coft``).
        block_share: one block shared by all blocks of a layer.
        use_cayley_neumann: approximate the Cayley inverse by a truncated Neumann series (PEFT's default); ``False``
            uses the exact inverse.
        num_cayley_neumann_terms: terms of that series.
    """

    delta_type: ClassVar[str] = "oft"

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    bias: str = "none"
    init_weights: bool = True
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def validate(self) -> None:
        """PEFT's checks, and the refused options (see the module docstring)."""
        super().validate()
        _check_one_of("OFTConfig", ("r", self.r), ("oft_block_size", self.oft_block_size))
        _check_probability("OFTConfig", "module_dropout", self.module_dropout)
        _check_bias("OFTConfig", self.bias)
        if self.eps < 0:
            raise DeltaConfigError(f"OFTConfig.eps must be >= 0, got {self.eps}")
        if self.num_cayley_neumann_terms < 1:
            raise DeltaConfigError(
                f"OFTConfig.num_cayley_neumann_terms must be >= 1, got {self.num_cayley_neumann_terms}"
            )


@dataclass(kw_only=True)
class BOFTConfig(DeltaConfig):
    """Configuration of :class:`~opendelta_oft.BOFTModel` (PEFT's ``BOFTConfig`` names and defaults).

    Attributes:
        boft_block_size: size of each square block (default 4); ``0``: derived from ``boft_block_num``. Set exactly
            one of the two; it must divide every modified layer's ``in_features`` (else the layer is refused by name).
        boft_block_num: number of blocks per butterfly factor; ``0``: derived from ``boft_block_size``.
        boft_n_butterfly_factor: number of butterfly factors (``1`` is plain block-diagonal OFT). Each further factor
            doubles the reach of a block through a butterfly permutation; ``in_features`` must be a multiple of
            ``boft_block_size * 2 ** (factors - 1)``. Computed in plain PyTorch (PEFT's CUDA ``fbd_cuda`` kernel is
            an optimisation of the same block-diagonal step; PEFT without it silently falls back to one factor).
        boft_dropout: multiplicative dropout: in training, this fraction of one factor's blocks becomes the identity.
        bias: ``"none"`` only (see the module docstring).
        init_weights: start at the identity with scales of one; ``False`` draws ``R ~ N(0, 0.1)``,
            ``s ~ N(1, 0.1)`` (tests only).
    """

    delta_type: ClassVar[str] = "boft"

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    bias: str = "none"
    init_weights: bool = True

    def validate(self) -> None:
        """PEFT's checks, and the refused options (see the module docstring)."""
        super().validate()
        _check_one_of("BOFTConfig", ("boft_block_size", self.boft_block_size), ("boft_block_num", self.boft_block_num))
        if self.boft_n_butterfly_factor < 1:
            raise DeltaConfigError(
                f"BOFTConfig.boft_n_butterfly_factor must be a positive integer, got {self.boft_n_butterfly_factor}"
            )
        _check_probability("BOFTConfig", "boft_dropout", self.boft_dropout)
        _check_bias("BOFTConfig", self.bias)
