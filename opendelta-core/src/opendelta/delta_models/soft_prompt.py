"""0.3.2's ``opendelta.delta_models.soft_prompt``: ``SoftPromptModel`` and ``SoftPromptConfig``.

They come from the opendelta-soft-prompt plugin, through the registry, on first access
(see :mod:`opendelta.method_classes`).
"""

from opendelta.method_classes import namespace_attributes

__all__ = ["SoftPromptConfig", "SoftPromptModel"]  # noqa: F822 (served by __getattr__)
__getattr__, __dir__ = namespace_attributes(__name__, __all__)
