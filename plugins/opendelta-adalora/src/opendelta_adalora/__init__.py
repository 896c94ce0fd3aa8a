"""AdaLoRA for OpenDelta: ``from opendelta import AdaLoraModel`` once this distribution is installed.

``AdaLoraCallback`` and ``AdaLoraTrainer`` (transformers' Trainer) are imported on first use, so the plugin itself
needs no transformers.
"""

from __future__ import annotations

from typing import Any

from opendelta_adalora.allocator import RankAllocator
from opendelta_adalora.config import AdaLoraConfig
from opendelta_adalora.layer import AdaLoraLayer
from opendelta_adalora.model import AdaLoraModel

__all__ = ["AdaLoraCallback", "AdaLoraConfig", "AdaLoraLayer", "AdaLoraModel", "AdaLoraTrainer", "RankAllocator"]

_LAZY = ("AdaLoraCallback", "AdaLoraTrainer")


def __getattr__(name: str) -> Any:
    """The Trainer helpers, imported (with transformers) on first access."""
    if name in _LAZY:
        from opendelta_adalora import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
