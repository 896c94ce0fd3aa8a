"""IA3 for OpenDelta: ``from opendelta import IA3Model`` once this is installed."""

from opendelta_ia3.config import IA3Config
from opendelta_ia3.layer import IA3Layer
from opendelta_ia3.model import IA3Model

__all__ = ["IA3Config", "IA3Layer", "IA3Model"]
