"""OFT and BOFT for OpenDelta: ``from opendelta import OFTModel, BOFTModel`` once this is installed."""

from opendelta_oft.boft_layer import BOFTRotation
from opendelta_oft.boft_model import BOFTModel
from opendelta_oft.config import BOFTConfig, OFTConfig
from opendelta_oft.layer import OFTRotation
from opendelta_oft.model import OFTModel

__all__ = ["BOFTConfig", "BOFTModel", "BOFTRotation", "OFTConfig", "OFTModel", "OFTRotation"]
