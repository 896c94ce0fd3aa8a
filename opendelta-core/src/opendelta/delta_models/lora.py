"""0.3.2's ``opendelta.delta_models.lora``: ``LoraModel`` and ``LoraConfig``.

They come from the opendelta-lora plugin, through the registry, on first access
(see :mod:`opendelta.method_classes`).
"""

from opendelta.method_classes import namespace_attributes

__all__ = ["LoraConfig", "LoraModel"]  # noqa: F822 (served by __getattr__)
__getattr__, __dir__ = namespace_attributes(__name__, __all__)
