"""BitFit (bias-only tuning) for OpenDelta: ``from opendelta import BitFitModel`` once this is installed."""

from opendelta_bitfit.config import BitFitConfig
from opendelta_bitfit.layer import BiasDelta
from opendelta_bitfit.model import BitFitModel

__all__ = ["BiasDelta", "BitFitConfig", "BitFitModel"]
