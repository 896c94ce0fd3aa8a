"""Low-rank adapters for OpenDelta: ``from opendelta import LowRankAdapterModel`` once this is installed."""

from opendelta_low_rank_adapter.config import LowRankAdapterConfig
from opendelta_low_rank_adapter.layer import LowRankAdapter, LowRankLinear
from opendelta_low_rank_adapter.model import LowRankAdapterModel

__all__ = ["LowRankAdapter", "LowRankAdapterConfig", "LowRankAdapterModel", "LowRankLinear"]
