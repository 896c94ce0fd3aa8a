"""VeRA for OpenDelta: ``from opendelta import VeraModel`` once this is installed."""

from opendelta_vera.config import VeraConfig
from opendelta_vera.layer import VeraLayer
from opendelta_vera.model import VeraModel

__all__ = ["VeraConfig", "VeraLayer", "VeraModel"]
