"""A gated adapter for OpenDelta from a third-party distribution: ``from opendelta import GatedAdapterModel``."""

from opendelta_thirdparty_method.method import GatedAdapter, GatedAdapterConfig, GatedAdapterModel

__all__ = ["GatedAdapter", "GatedAdapterConfig", "GatedAdapterModel"]
