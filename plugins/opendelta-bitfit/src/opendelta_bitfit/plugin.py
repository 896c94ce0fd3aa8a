"""The entry point: registers BitFit with OpenDelta's registry."""

from __future__ import annotations

from opendelta.plugin_api import RegisterDeltaMethod, hookimpl


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``bitfit``."""
    from opendelta_bitfit.model import BitFitModel

    register(BitFitModel)
