"""Parallel adapters (He et al., 2022) for OpenDelta: ``from opendelta import ParallelAdapterModel`` once installed."""

from opendelta_parallel_adapter.config import ParallelAdapterConfig
from opendelta_parallel_adapter.model import ParallelAdapterModel

__all__ = ["ParallelAdapterConfig", "ParallelAdapterModel"]
