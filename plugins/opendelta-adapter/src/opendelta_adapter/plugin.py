"""The entry point: registers the adapter with OpenDelta's registry."""

from __future__ import annotations

from opendelta.plugin_api import RegisterDeltaMethod, hookimpl


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``adapter``."""
    from opendelta_adapter.model import AdapterModel

    register(AdapterModel)
