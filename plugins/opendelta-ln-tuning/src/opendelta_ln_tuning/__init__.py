"""LN tuning for OpenDelta: ``from opendelta import LNTuningModel`` once this is installed."""

from opendelta_ln_tuning.config import LNTuningConfig
from opendelta_ln_tuning.layer import NormOffset
from opendelta_ln_tuning.model import LNTuningModel

__all__ = ["LNTuningConfig", "LNTuningModel", "NormOffset"]
