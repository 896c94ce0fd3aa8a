"""AdaLoRA's hyper-parameters, with PEFT's ``AdaLoraConfig`` names and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from opendelta.plugin_api import DeltaConfig, DeltaConfigError


@dataclass(kw_only=True)
class AdaLoraConfig(DeltaConfig):
    """Configuration of :class:`~opendelta_adalora.AdaLoraModel` (PEFT 0.21.2's ``AdaLoraConfig`` fields).

    Training has three phases (PEFT's): the first ``tinit`` steps keep every rank (warm-up); from then until
    ``total_step - tfinal`` the rank budget falls cubically from ``init_r`` to ``target_r`` per layer on average,
    every ``deltaT`` steps the least important singular triplets being masked; at step ``total_step - tfinal`` the
    ranks are fixed (``rank_pattern``) and the last ``tfinal`` steps fine-tune them.

    Attributes:
        target_r: the average rank per modified layer at the end of the allocation; 8 by default. At or above
            ``init_r`` nothing is ever masked (PEFT fails at its first allocation there instead).
        init_r: the rank every modified layer starts with; 12 by default.
        tinit: warm-up steps without any masking; 0 by default.
        tfinal: final steps with the ranks fixed; 0 by default.
        deltaT: steps between two allocations in the budgeting phase; 1 by default.
        beta1: EMA coefficient of the smoothed sensitivity ``|w * grad|``, in (0, 1); 0.85 by default.
        beta2: EMA coefficient of its uncertainty, in (0, 1); 0.85 by default.
        orth_reg_weight: weight of the orthogonality regulariser that
            :meth:`~opendelta_adalora.AdaLoraModel.orthogonal_regularization` returns; 0.5 by default.
        total_step: the number of training steps. Required to allocate ranks (``update_and_allocate`` refuses
            without it); a model that never allocates is plain SVD-form LoRA, which needs none.
        rank_pattern: the allocated ranks, ``{module name: [kept, ...]}`` with one flag per initial triplet (``init_r``
            of them), as PEFT records it. Set by the allocation; a model built from a config that has it (a saved
            one) gives each listed module only its kept triplets.
        lora_alpha: the update's scale numerator: ``delta W = lora_alpha * B (E * A) / init_r``; 8 by default (PEFT's).
        lora_dropout: dropout on the update's input during training; 0.0 by default.
    """

    delta_type: ClassVar[str] = "adalora"

    # Only init_r sizes a tensor. The others are a rank budget (0 and more than init_r are valid) and step counts:
    # no memory size, so the resource-bounds battery does not treat them as one (metadata size=False).
    target_r: int = field(default=8, metadata={"size": False})
    init_r: int = 12
    tinit: int = field(default=0, metadata={"size": False})
    tfinal: int = field(default=0, metadata={"size": False})
    deltaT: int = field(default=1, metadata={"size": False})  # PEFT's name
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = field(default=None, metadata={"size": False})
    rank_pattern: dict[str, list[bool]] | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0

    def validate(self) -> None:
        """Refuse what PEFT refuses (or fails on later), naming the field."""
        super().validate()
        name = type(self).__name__
        if self.init_r < 1:
            raise DeltaConfigError(f"{name}.init_r must be >= 1, got {self.init_r}")
        if self.target_r < 0:  # above init_r is allowed, as in PEFT: no triplet is ever masked then
            raise DeltaConfigError(f"{name}.target_r must be >= 0, got {self.target_r}")
        if self.deltaT < 1:
            raise DeltaConfigError(f"{name}.deltaT must be >= 1, got {self.deltaT}")
        if self.tinit < 0 or self.tfinal < 0:
            raise DeltaConfigError(f"{name}.tinit and tfinal must be >= 0, got {self.tinit} and {self.tfinal}")
        for beta in ("beta1", "beta2"):
            value = getattr(self, beta)
            if not 0 < value < 1:
                raise DeltaConfigError(f"{name}.{beta} must be in (0, 1), got {value}")
        if self.orth_reg_weight < 0:
            raise DeltaConfigError(f"{name}.orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if self.lora_alpha <= 0:
            raise DeltaConfigError(
                f"{name}.lora_alpha must be > 0, got {self.lora_alpha} (PEFT then scales by each layer's rank, "
                f"which changes when ranks are pruned)"
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise DeltaConfigError(f"{name}.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.total_step is not None:
            if self.total_step <= 0:
                raise DeltaConfigError(f"{name}.total_step must be > 0, got {self.total_step}")
            if self.tinit >= self.total_step - self.tfinal:
                raise DeltaConfigError(
                    f"{name}: tinit={self.tinit}, tfinal={self.tfinal} and total_step={self.total_step} leave no "
                    f"budgeting phase; decrease tfinal or tinit, or increase total_step"
                )
        for module, kept in (self.rank_pattern or {}).items():
            if len(kept) != self.init_r:
                raise DeltaConfigError(
                    f"{name}.rank_pattern[{module!r}] has {len(kept)} flags; it needs one per initial triplet "
                    f"(init_r={self.init_r})"
                )
