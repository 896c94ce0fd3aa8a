"""LoKr's hyper-parameters, with the names PEFT's ``LoKrConfig`` gives them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from opendelta.plugin_api import DeltaConfig, DeltaConfigError


def pattern_value(patterns: dict[str, int] | dict[str, float], name: str, default: float) -> float:
    r"""PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching the end of the full module name.

    A key is a regular expression (PEFT's ``get_pattern_key``: ``(.*\.)?(key)$``), so ``"k"`` picks
    ``...attention.k`` but not ``...attention.qk``.
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@dataclass(kw_only=True)
class LoKrConfig(DeltaConfig):
    """Configuration of :class:`~opendelta_lokr.LoKrModel` (PEFT 0.21.2's ``LoKrConfig`` names and defaults).

    ``dW = kron(w1, w2) * alpha / r`` with ``out = a * b`` and ``in = c * d`` factored by ``decompose_factor``:
    ``w1`` is ``[a, c]``, ``w2`` is ``[b, d]``. Each is a full matrix or, where ``r`` is below half its larger side,
    a rank-``r`` product ``w_a @ w_b`` (``w1`` only with ``decompose_both``), exactly as PEFT decides.

    Attributes:
        r: the rank of a decomposed factor; 8 by default. It also sets the scale ``alpha / r`` where no factor is
            decomposed (as in PEFT).
        alpha: scale numerator; 8 by default (PEFT's).
        rank_dropout: in training mode, the probability of dropping each output row of the update; 0 by default;
            never in eval.
        rank_dropout_scale: rescale the kept rows by the inverse of the kept fraction (PEFT's option, off by
            default: PEFT's LoKr does not rescale unless asked).
        module_dropout: in training mode, the probability of skipping the whole update for one forward pass;
            0 by default; never in eval.
        decompose_both: also decompose ``w1`` (the left factor) into a rank-``r`` product when ``r`` is below half
            its larger side; ``False`` by default.
        decompose_factor: ``-1`` (default): each dimension is factored into two near its square root; a positive
            ``f`` dividing the dimension gives ``(f, dim / f)``, otherwise the factoring closest to the square root
            whose smaller part is at most ``f`` (PEFT's ``factorization``). Not a size.
        use_effective_conv2d: PEFT's option for convolutions; LoKrModel modifies linear layers only, on which PEFT
            ignores it too. Kept so PEFT users' configs read unchanged.
        init_weights: ``True`` (default): ``w1`` (or ``w1_a``) zero, the rest Kaiming-uniform, so the update starts
            at zero; ``"lycoris"``: LyCORIS's way, ``w2`` (or ``w2_b``) zero instead; ``False``: nothing zero (the
            update is not zero; for tests).
        rank_pattern: ``{pattern: r}`` for modules whose rank differs from ``r`` (PEFT's rule, :func:`pattern_value`).
        alpha_pattern: ``{pattern: alpha}`` in the same way for ``alpha``.
    """

    delta_type: ClassVar[str] = "lokr"

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: Literal[-1] | int = -1  # a sentinel or a factor: never a size to bound
    rank_dropout_scale: bool = False
    init_weights: bool | Literal["lycoris"] = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        """Refuse ranks below 1, a non-positive alpha, dropouts outside [0, 1), a bad factor and non-regex patterns.

        ``decompose_factor`` must be -1 or positive (PEFT treats 0 and other negatives as "no factor but 1").
        """
        super().validate()
        name = type(self).__name__
        for field_name, ranks in (("r", [self.r]), ("rank_pattern", list(self.rank_pattern.values()))):
            if any(rank < 1 for rank in ranks):
                raise DeltaConfigError(f"{name}.{field_name} must hold ranks >= 1, got {ranks}")
        alphas = [self.alpha, *self.alpha_pattern.values()]
        if any(alpha <= 0 for alpha in alphas):
            raise DeltaConfigError(f"{name}.alpha and alpha_pattern must be > 0, got {alphas}")
        for field_name in ("rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, field_name) < 1.0:
                raise DeltaConfigError(f"{name}.{field_name} must be in [0, 1), got {getattr(self, field_name)}")
        if self.decompose_factor != -1 and self.decompose_factor < 1:
            raise DeltaConfigError(f"{name}.decompose_factor must be -1 or a factor >= 1, got {self.decompose_factor}")
        for field_name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, field_name):
                try:
                    re.compile(key)
                except re.error as exc:
                    raise DeltaConfigError(f"{name}.{field_name} key {key!r} is no regular expression: {exc}") from exc

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """``(r, alpha)`` for the module of that real name, after ``rank_pattern`` and ``alpha_pattern``."""
        return int(pattern_value(self.rank_pattern, module_name, self.r)), pattern_value(
            self.alpha_pattern, module_name, self.alpha
        )
