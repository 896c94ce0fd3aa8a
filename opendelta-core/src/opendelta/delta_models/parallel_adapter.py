"""0.3.2's ``opendelta.delta_models.parallel_adapter``: ``ParallelAdapterModel`` and ``ParallelAdapterConfig``.

They come from the opendelta-parallel-adapter plugin, through the registry, on first access
(see :mod:`opendelta.method_classes`).
"""

from opendelta.method_classes import namespace_attributes

__all__ = ["ParallelAdapterConfig", "ParallelAdapterModel"]  # noqa: F822 (served by __getattr__)
__getattr__, __dir__ = namespace_attributes(__name__, __all__)
