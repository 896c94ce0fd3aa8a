"""LoHa's hyper-parameters, with the names PEFT's ``LoHaConfig`` gives them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from opendelta.plugin_api import DeltaConfig, DeltaConfigError


def pattern_value(patterns: dict[str, int] | dict[str, float], name: str, default: float) -> float:
    r"""PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key that is the name or a ``.``-suffix of it.

    A key is a regular expression matched against the end of the full module name (PEFT's ``get_pattern_key``:
    ``(.*\.)?(key)$``), so ``"k"`` picks ``...attention.k`` but not ``...attention.qk``.
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@dataclass(kw_only=True)
class LoHaConfig(DeltaConfig):
    """Configuration of :class:`~opendelta_loha.LoHaModel` (PEFT 0.21.2's ``LoHaConfig`` names and defaults).

    Attributes:
        r: rank of each of the two low-rank factors; 8 by default. A LoHa update has ``2 r (in + out)`` parameters
            but a rank up to ``r**2`` (the Hadamard product of two rank-``r`` matrices).
        alpha: scale numerator: the update is multiplied by ``alpha / r``; 8 by default (PEFT's).
        rank_dropout: in training mode, the probability of dropping each output row of the update (the kept rows
            are rescaled by the inverse of the kept fraction, as PEFT and LyCORIS do); 0 by default; never in eval.
        module_dropout: in training mode, the probability of skipping the whole update for one forward pass
            (no rescaling, as PEFT); 0 by default; never in eval.
        use_effective_conv2d: PEFT's option for convolutions with a kernel larger than one; LoHaModel modifies
            linear layers only, on which PEFT ignores it too. Kept so PEFT users' configs read unchanged.
        init_weights: ``True`` (default): ``w1_a``, ``w1_b``, ``w2_a`` Kaiming-uniform and ``w2_b`` zero, so the
            update starts at zero; ``False``: ``w2_b`` Kaiming-uniform too (the update is not zero; for tests).
        rank_pattern: ``{pattern: r}`` for modules whose rank differs from ``r``; a pattern is a regular expression
            matched against the end of the real module name (PEFT's rule, see :func:`pattern_value`).
        alpha_pattern: ``{pattern: alpha}`` in the same way for ``alpha``.
    """

    delta_type: ClassVar[str] = "loha"

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    init_weights: bool = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        """Refuse ranks below 1, a non-positive alpha, dropouts outside [0, 1) and patterns that are no regex."""
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
