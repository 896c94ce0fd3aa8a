"""LoRA for OpenDelta: ``from opendelta import LoraModel`` once this distribution is installed."""

from opendelta_lora.config import LoraConfig
from opendelta_lora.layer import LoraLayer
from opendelta_lora.model import LoraModel

__all__ = ["LoraConfig", "LoraLayer", "LoraModel"]
