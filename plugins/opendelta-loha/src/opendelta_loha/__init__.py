"""LoHa for OpenDelta: ``from opendelta import LoHaModel`` once this is installed."""

from opendelta_loha.config import LoHaConfig
from opendelta_loha.layer import LoHaLayer
from opendelta_loha.model import LoHaModel
from opendelta_loha.peft_format import save_peft_loha

__all__ = ["LoHaConfig", "LoHaLayer", "LoHaModel", "save_peft_loha"]
