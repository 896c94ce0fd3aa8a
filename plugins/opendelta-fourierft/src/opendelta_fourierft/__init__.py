"""FourierFT for OpenDelta: ``from opendelta import FourierFTModel`` once this is installed.

``save_peft_fourierft`` (or ``FourierFTModel.save_peft``) writes PEFT's adapter format; PEFT's folders load through
``AutoDeltaModel.from_finetuned``.
"""

from opendelta_fourierft.config import FourierFTConfig
from opendelta_fourierft.layer import FourierFTLayer
from opendelta_fourierft.model import FourierFTModel
from opendelta_fourierft.peft_format import save_peft_fourierft

__all__ = ["FourierFTConfig", "FourierFTLayer", "FourierFTModel", "save_peft_fourierft"]
