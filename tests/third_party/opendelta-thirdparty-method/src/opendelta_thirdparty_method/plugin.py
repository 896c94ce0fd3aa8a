"""The entry point: registers ``gated_adapter`` with OpenDelta's registry."""

from __future__ import annotations

from opendelta import hookimpl
from opendelta.hookspecs import RegisterDeltaMethod


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``gated_adapter``."""
    from opendelta_thirdparty_method.method import GatedAdapterConfig, GatedAdapterModel

    register("gated_adapter", GatedAdapterConfig, GatedAdapterModel)
