"""The entry point: registers the parallel adapter with OpenDelta's registry."""

from __future__ import annotations

from opendelta.plugin_api import RegisterDeltaMethod, hookimpl


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``parallel_adapter`` (the original OpenDelta mistakenly registered it as ``adapter``)."""
    from opendelta_parallel_adapter.model import ParallelAdapterModel

    register(ParallelAdapterModel)
