"""Prefix tuning for OpenDelta: ``from opendelta import PrefixModel`` once this distribution is installed."""

from opendelta_prefix.config import PrefixConfig
from opendelta_prefix.layer import PrefixLayer, PrefixReparameterization
from opendelta_prefix.model import PrefixModel

__all__ = ["PrefixConfig", "PrefixLayer", "PrefixModel", "PrefixReparameterization"]
