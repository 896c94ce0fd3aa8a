"""The entry point: registers BitFit with OpenDelta's registry."""

from __future__ import annotations

from opendelta import hookimpl
from opendelta.hookspecs import RegisterDeltaMethod


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``bitfit``."""
    from opendelta_bitfit.config import BitFitConfig
    from opendelta_bitfit.model import BitFitModel

    register("bitfit", BitFitConfig, BitFitModel)
