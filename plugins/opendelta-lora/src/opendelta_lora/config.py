"""LoRA's hyper-parameters."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from opendelta.plugin_api import DeltaConfig, DeltaConfigError

INIT_KINDS = ("kaiming", "gaussian", "pissa", "pissa_niter_N", "olora")
"""The string values of ``LoraConfig.init_lora_weights`` (``N`` a number of subspace iterations, >= 0)."""

RESIDUAL_KINDS = ("pissa", "olora")
"""Initialisations taken from the base weight, whose outputs need the base weight minus the initial update."""

_NITER = re.compile(r"pissa_niter_(\d+)")


def init_kind(value: bool | str) -> str:
    """The canonical name of an ``init_lora_weights`` value.

    One of ``kaiming`` (``True``), ``random`` (``False``), ``gaussian``, ``pissa``, ``pissa_niter``, ``olora``.
    """
    if value is True:
        return "kaiming"
    if value is False:
        return "random"
    return "pissa_niter" if _NITER.fullmatch(value) else value


def pissa_niter(value: bool | str) -> int | None:
    """``N`` of ``"pissa_niter_N"``; ``None`` for every other value."""
    match = _NITER.fullmatch(value) if isinstance(value, str) else None
    return int(match.group(1)) if match else None


@dataclass(kw_only=True)
class LoraConfig(DeltaConfig):
    """Configuration of :class:`~opendelta_lora.LoraModel` (manual section 1.21.1).

    Attributes:
        lora_r: rank ``r`` of the update ``B A``; 8 by default. Smaller means fewer parameters (``r * (in + out)``
            per modified layer); 1-16 is the usual range.
        lora_alpha: scale numerator: the update is multiplied by ``lora_alpha / lora_r``, so changing ``r`` does not
            change the effective learning rate much. 16 by default.
        lora_dropout: dropout applied to the LoRA branch's input during training; 0.0 by default.
        use_rslora: rank-stabilised LoRA (Kalajdzievski, 2023): scale by ``lora_alpha / sqrt(lora_r)`` instead of
            ``lora_alpha / lora_r``, as PEFT's option of that name. ``False`` by default.
        init_lora_weights: how ``A`` and ``B`` start, with PEFT's names and meanings:

            * ``True`` or ``"kaiming"`` (default): ``A`` Kaiming-uniform, ``B`` zero (the update starts at zero);
            * ``False``: ``B`` random too (Kaiming-uniform, as ``nn.Linear``'s): the update is not zero at first;
            * ``"gaussian"``: ``A`` normal with standard deviation ``1 / r``, ``B`` zero;
            * ``"pissa"``: PiSSA (Meng et al., 2024): ``B A`` is the weight's top-``r`` singular part (full SVD),
              and the base weight becomes the residual ``W - scale * B A``; ``"pissa_niter_N"``: the same from
              ``torch.svd_lowrank`` with ``N`` subspace iterations (fast, random);
            * ``"olora"``: OLoRA (Büyükakyüz, 2024): ``B``, ``A`` the first ``r`` columns of ``Q`` and rows of ``R``
              of the weight's QR decomposition, the base weight again becoming ``W - scale * B A``.

            PiSSA and OLoRA leave the outputs unchanged at first (residual plus update is the weight). The stored
            base weight is never written: the layer also subtracts its frozen initial update (``lora_A0``,
            ``lora_B0``, saved with the delta), so ``detach()`` gives back the original weights bit for bit.
        use_dora: DoRA (Liu et al., 2024, https://arxiv.org/abs/2402.09353), PEFT's option of that name: each
            modified layer computes ``m * (W + s B A) x / ||W + s B A||_c``, with ``||.||_c`` the L2 norm of each
            output row (a constant in backward, as the paper and PEFT treat it) and ``m`` a learned magnitude per
            output feature (``lora_magnitude_vector``), initialised to that norm so a fresh DoRA changes nothing.
            Composes with ``use_rslora`` and every ``init_lora_weights``; not on stacked expert weights (PEFT
            refuses DoRA there too). ``False`` by default.
    """

    delta_type: ClassVar[str] = "lora"

    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    use_dora: bool = False
    max_rank: int | None = None

    def validate(self) -> None:
        """Refuse ranks below 1, a non-positive alpha, a dropout outside [0, 1) and an unknown initialisation."""
        super().validate()
        if self.lora_r < 1:
            raise DeltaConfigError(f"LoraConfig.lora_r must be >= 1, got {self.lora_r}")
        if self.lora_alpha <= 0:
            raise DeltaConfigError(f"LoraConfig.lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise DeltaConfigError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.max_rank is not None and self.max_rank < self.lora_r:
            raise DeltaConfigError(
                f"LoraConfig.max_rank={self.max_rank} is below lora_r={self.lora_r}: it is the rank allocated, of "
                f"which lora_r is used; set max_rank >= lora_r (or None)"
            )
        value = self.init_lora_weights
        if (
            isinstance(value, str)
            and value not in ("kaiming", "gaussian", "pissa", "olora")
            and not _NITER.fullmatch(value)
        ):
            raise DeltaConfigError(
                f"LoraConfig.init_lora_weights must be True, False or one of "
                f"{', '.join(repr(k) for k in INIT_KINDS)} (N a whole number of subspace iterations), got {value!r}"
            )

    @property
    def rewrites_base(self) -> bool:
        """Whether the initialisation makes the base weight a residual (PiSSA, OLoRA)."""
        return init_kind(self.init_lora_weights).startswith(RESIDUAL_KINDS)
