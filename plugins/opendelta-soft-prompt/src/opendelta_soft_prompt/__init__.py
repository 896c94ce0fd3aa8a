"""Soft prompt tuning for OpenDelta: ``from opendelta import SoftPromptModel`` once this distribution is installed."""

from opendelta_soft_prompt.config import SoftPromptConfig
from opendelta_soft_prompt.layer import SoftPromptLayer
from opendelta_soft_prompt.model import SoftPromptModel

__all__ = ["SoftPromptConfig", "SoftPromptLayer", "SoftPromptModel"]
