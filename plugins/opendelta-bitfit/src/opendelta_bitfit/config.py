"""BitFit's configuration: the fields every delta method shares, and nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from opendelta.plugin_api import DeltaConfig


@dataclass(kw_only=True)
class BitFitConfig(DeltaConfig):
    """Configuration of :class:`~opendelta_bitfit.BitFitModel` (manual section 1.21.2).

    BitFit has no hyper-parameter of its own: what it trains is decided by *where* it is applied, so the
    configuration is the shared one (``modified_modules``, ``exclude_modules``, ``unfrozen_modules``,
    ``common_structure``), validated by :meth:`DeltaConfig.validate`. A subclass of its own still exists so that
    ``delta_type`` is ``"bitfit"`` in a saved ``config.json`` and ``AutoDeltaConfig`` picks this method back.
    """

    delta_type: ClassVar[str] = "bitfit"
