"""Bottleneck adapters for OpenDelta: ``from opendelta import AdapterModel`` once this distribution is installed."""

from opendelta_adapter.config import AdapterConfig
from opendelta_adapter.model import AdapterModel

__all__ = ["AdapterConfig", "AdapterModel"]
