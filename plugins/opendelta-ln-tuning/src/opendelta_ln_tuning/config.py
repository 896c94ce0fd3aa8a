"""LN tuning's configuration: the fields every delta method shares, and nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from opendelta.plugin_api import DeltaConfig


@dataclass(kw_only=True)
class LNTuningConfig(DeltaConfig):
    """Configuration of :class:`~opendelta_ln_tuning.LNTuningModel` (PEFT's ``LNTuningConfig``).

    LN tuning has no hyper-parameter of its own: what it trains is decided by which layer norms it is applied to
    (``modified_modules``, ``exclude_modules``, ``unfrozen_modules``, ``common_structure``). A subclass of its own
    exists so that ``delta_type`` is ``"ln_tuning"`` in a saved ``config.json`` and ``AutoDeltaConfig`` finds it.
    """

    delta_type: ClassVar[str] = "ln_tuning"
