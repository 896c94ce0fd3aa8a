"""The entry point: registers LN tuning with OpenDelta's registry."""

from __future__ import annotations

from opendelta.plugin_api import RegisterDeltaMethod, hookimpl


@hookimpl
def register_delta_methods(register: RegisterDeltaMethod) -> None:
    """Register ``ln_tuning``."""
    from opendelta_ln_tuning.model import LNTuningModel

    register(LNTuningModel)
