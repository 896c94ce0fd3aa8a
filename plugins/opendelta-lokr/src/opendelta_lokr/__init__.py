"""LoKr for OpenDelta: ``from opendelta import LoKrModel`` once this is installed."""

from opendelta_lokr.config import LoKrConfig
from opendelta_lokr.layer import LoKrLayer
from opendelta_lokr.model import LoKrModel
from opendelta_lokr.peft_format import save_peft_lokr

__all__ = ["LoKrConfig", "LoKrLayer", "LoKrModel", "save_peft_lokr"]
