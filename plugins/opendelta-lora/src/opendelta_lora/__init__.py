"""LoRA for OpenDelta: ``from opendelta import LoraModel`` once this distribution is installed.

``create_loraplus_optimizer`` gives the ``B`` matrices a higher learning rate (LoRA+).
``load_peft_adapter``/``save_peft_adapter`` read and write PEFT's adapter format; vLLM and TGI serve only LoRA on
decoder-only LMs without ``modules_to_save`` (``save_peft_adapter`` warns otherwise, see ``serving``).
"""

from opendelta_lora.config import LoraConfig
from opendelta_lora.dora import DoraLayer
from opendelta_lora.layer import LoraLayer
from opendelta_lora.loraplus import create_loraplus_optimizer
from opendelta_lora.model import LoraModel
from opendelta_lora.peft_format import load_peft_adapter, save_peft_adapter

__all__ = [
    "DoraLayer",
    "LoraConfig",
    "LoraLayer",
    "LoraModel",
    "create_loraplus_optimizer",
    "load_peft_adapter",
    "save_peft_adapter",
]
