"""OFT and BOFT for OpenDelta: ``from opendelta import OFTModel, BOFTModel`` once this is installed."""

from opendelta_oft.config import OFTConfig
from opendelta_oft.layer import OFTRotation
from opendelta_oft.model import OFTModel

__all__ = ["OFTConfig", "OFTModel", "OFTRotation"]
