"""0.3.2's ``opendelta.auto_delta``: the auto classes, which live in :mod:`opendelta.auto`."""

from opendelta.auto import AutoDeltaConfig, AutoDeltaModel

__all__ = ["AutoDeltaConfig", "AutoDeltaModel"]
