"""The configurations of OFT and BOFT, with PEFT 0.21.2's field names, defaults and checks.

``modified_modules`` is PEFT's ``target_modules``. PEFT's either/or size pairs (``r`` or ``oft_block_size``;
``boft_block_num`` or ``boft_block_size``, the other ``0``) are the block size alone here, one for every layer
(PEFT recommends setting the block size): a ``0`` meaning "derived" would be a size that is not one. PEFT folders
that set ``r`` or ``boft_block_num`` still load (see :mod:`opendelta_oft.peft_oft`). PEFT options that change what
the adapter computes and that these methods do not implement are refused by name: a ``bias`` other than ``"none"``
(train biases with ``unfrozen_modules`` instead). ``modules_to_save`` is core's (per-task heads), as for every
method.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from opendelta.plugin_api import DeltaConfig, DeltaConfigError

C = TypeVar("C", bound=DeltaConfig)

MAX_NEUMANN_TERMS = 64
"""The most Cayley-Neumann terms ``OFTConfig`` accepts."""


def _check_bias(owner: str, bias: str) -> None:
    if bias != "none":
        raise DeltaConfigError(
            f"{owner}.bias={bias!r} is not supported (only 'none'): PEFT's 'all'/'{owner[:-6].lower()}_only' make "
            f"biases trainable; do that with unfrozen_modules (or freeze_module(exclude=[...])) instead"
        )


def _check_size(owner: str, name: str, value: int, most: int | None = None) -> None:
    if value < 1 or (most is not None and value > most):
        bound = f"between 1 and {most}" if most is not None else "at least 1"
        raise DeltaConfigError(f"{owner}.{name} must be {bound}, got {value}")


_PEFT_ONLY = {
    "target_modules": "OpenDelta calls it modified_modules",
    "r": "PEFT's number of blocks per layer (0: derived); set oft_block_size (in_features / r) instead",
    "boft_block_num": "PEFT's number of blocks per factor (0: derived); set boft_block_size (in_features / "
    "boft_block_num) instead",
    "layers_to_transform": "name the layers in modified_modules instead",
    "layers_pattern": "name the layers in modified_modules instead",
    "fan_in_fan_out": "the layout of GPT-2's Conv1D is read from the layer",
}
"""PEFT config names that are no fields here, and what to do instead (named in the refusal)."""


def refuse_peft_only(owner: str, given: Mapping[str, Any]) -> None:
    """Refuse PEFT option names with the reason and the OpenDelta way (core would only say "unknown field")."""
    for name, hint in _PEFT_ONLY.items():
        if name in given and not (name == "r" and owner == "BOFTConfig"):
            raise DeltaConfigError(f"{owner}: {name}={given[name]!r:.100} is not supported: {hint}")


def _check_probability(owner: str, name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise DeltaConfigError(f"{owner}.{name} must be in [0, 1), got {value}")


class _RefusesPeftOnlyNames:
    """Mixin of both configs (before ``DeltaConfig``): ``from_dict`` refuses PEFT-only names, saying what to set."""

    @classmethod
    def from_dict(cls: type[C], config_dict: dict[str, Any], **kwargs: Any) -> C:
        """Core's ``from_dict``, refusing PEFT-only option names in ``kwargs`` with what to do instead."""
        refuse_peft_only(cls.__name__, kwargs)
        return super().from_dict(config_dict, **kwargs)  # type: ignore[misc]


@dataclass(kw_only=True)
class OFTConfig(_RefusesPeftOnlyNames, DeltaConfig):
    """Configuration of :class:`~opendelta_oft.OFTModel` (PEFT's ``OFTConfig`` names and defaults).

    Attributes:
        oft_block_size: size of each square block (default 32); must divide every modified layer's ``in_features``
            (a layer it does not divide is refused by name, with the sizes that would fit). A layer gets
            ``in_features / oft_block_size`` blocks (PEFT's ``r``).
        module_dropout: multiplicative dropout: in training, this fraction of the blocks is set to the identity.
        bias: ``"none"`` only (see the module docstring).
        init_weights: start at the identity (``Q = 0``); ``False`` draws ``Q`` from ``N(0, 0.1)`` (tests only).
        coft: constrained OFT: keep each block within ``eps`` of the identity (the parameter is projected in place
            before each use, as PEFT does).
        eps: COFT's radius (only with ``coft``).
        block_share: one block shared by all blocks of a layer.
        use_cayley_neumann: approximate the Cayley inverse by a truncated Neumann series (PEFT's default); ``False``
            uses the exact inverse.
        num_cayley_neumann_terms: terms of that series (at most 64: each costs a batched matrix product per forward,
            and the series has long converged for rotations near the identity).
    """

    delta_type: ClassVar[str] = "oft"

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
        _check_size("OFTConfig", "oft_block_size", self.oft_block_size)
        _check_size("OFTConfig", "num_cayley_neumann_terms", self.num_cayley_neumann_terms, MAX_NEUMANN_TERMS)
        _check_probability("OFTConfig", "module_dropout", self.module_dropout)
        _check_bias("OFTConfig", self.bias)
        if self.eps < 0:
            raise DeltaConfigError(f"OFTConfig.eps must be >= 0, got {self.eps}")


@dataclass(kw_only=True)
class BOFTConfig(_RefusesPeftOnlyNames, DeltaConfig):
    """Configuration of :class:`~opendelta_oft.BOFTModel` (PEFT's ``BOFTConfig`` names and defaults).

    Attributes:
        boft_block_size: size of each square block (default 4); it must divide every modified layer's
            ``in_features`` (else the layer is refused by name). A factor has ``in_features / boft_block_size``
            blocks (PEFT's ``boft_block_num``).
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
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    bias: str = "none"
    init_weights: bool = True

    def validate(self) -> None:
        """PEFT's checks, and the refused options (see the module docstring)."""
        super().validate()
        _check_size("BOFTConfig", "boft_block_size", self.boft_block_size)
        _check_size("BOFTConfig", "boft_n_butterfly_factor", self.boft_n_butterfly_factor)
        _check_probability("BOFTConfig", "boft_dropout", self.boft_dropout)
        _check_bias("BOFTConfig", self.bias)
