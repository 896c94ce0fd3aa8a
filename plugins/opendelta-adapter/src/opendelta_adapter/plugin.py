"""The entry point: registers the adapter with OpenDelta's registry."""

from __future__ import annotations

from opendelta import hookimpl
from opendelta.hookspecs import RegisterDeltaMethod


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``adapter``."""
    from opendelta_adapter.config import AdapterConfig
    from opendelta_adapter.model import AdapterModel

    register("adapter", AdapterConfig, AdapterModel)
