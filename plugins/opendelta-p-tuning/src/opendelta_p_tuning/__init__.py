"""P-tuning for OpenDelta: ``from opendelta import PTuningModel`` once this distribution is installed."""

from opendelta_p_tuning.config import PTuningConfig
from opendelta_p_tuning.layer import PromptEncoderLayer
from opendelta_p_tuning.model import PTuningModel

__all__ = ["PTuningConfig", "PTuningModel", "PromptEncoderLayer"]
