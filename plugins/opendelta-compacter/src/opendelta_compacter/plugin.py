"""The entry point: registers Compacter with OpenDelta's registry."""

from __future__ import annotations

from opendelta import hookimpl
from opendelta.hookspecs import RegisterDeltaMethod


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``compacter``."""
    from opendelta_compacter.config import CompacterConfig
    from opendelta_compacter.model import CompacterModel

    register("compacter", CompacterConfig, CompacterModel)
