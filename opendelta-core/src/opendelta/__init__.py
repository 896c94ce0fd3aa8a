"""OpenDelta: plug-and-play delta tuning (LoRA, adapters, prefixes...) for PyTorch and transformers models.

Core holds the machinery; every method comes from a plugin distribution (``pip install opendelta-lora``) and is
importable from here once installed: ``from opendelta import LoraModel``.
"""

from __future__ import annotations

import re
from typing import Any

from opendelta.auto import AutoDeltaConfig, AutoDeltaModel
from opendelta.base import DeltaModel, Target
from opendelta.config import DeltaConfig
from opendelta.errors import (
    AddressingError,
    BackboneMismatchError,
    BackboneUnverifiedError,
    CheckpointError,
    DeltaConfigError,
    DeltaMethodNotInstalledError,
    DeltaStateError,
    HubError,
    ModuleNotFoundInStructureError,
    OpenDeltaAddressingWarning,
    OpenDeltaCompatibilityWarning,
    OpenDeltaError,
    OpenDeltaPluginWarning,
    OpenDeltaServingWarning,
    OpenDeltaVersionWarning,
    PluginValidationError,
    ResourceLimitError,
    StructureNotFoundError,
    StructureValidationError,
    UnknownArgumentError,
    UnknownDeltaMethodError,
    UnsupportedTargetError,
)
from opendelta.freezing import freeze_module
from opendelta.hookspecs import hookimpl
from opendelta.insertion import insert_parallel_module, insert_sequential_module, replace_module
from opendelta.plugins import list_plugins
from opendelta.prefix import insert_prefix
from opendelta.prompt import insert_soft_prompt
from opendelta.registry import get_method, list_methods, list_structures
from opendelta.routing import route_rows
from opendelta.visualization import count_parameters

__version__ = "0.1.0"

__all__ = [
    "AddressingError",
    "AutoDeltaConfig",
    "AutoDeltaModel",
    "BackboneMismatchError",
    "BackboneUnverifiedError",
    "CheckpointError",
    "DeltaConfig",
    "DeltaConfigError",
    "DeltaMethodNotInstalledError",
    "DeltaModel",
    "DeltaStateError",
    "HubError",
    "ModuleNotFoundInStructureError",
    "OpenDeltaAddressingWarning",
    "OpenDeltaCompatibilityWarning",
    "OpenDeltaError",
    "OpenDeltaPluginWarning",
    "OpenDeltaServingWarning",
    "OpenDeltaVersionWarning",
    "PluginValidationError",
    "ResourceLimitError",
    "StructureNotFoundError",
    "StructureValidationError",
    "Target",
    "UnknownArgumentError",
    "UnknownDeltaMethodError",
    "UnsupportedTargetError",
    "count_parameters",
    "freeze_module",
    "get_method",
    "hookimpl",
    "insert_parallel_module",
    "insert_prefix",
    "insert_sequential_module",
    "insert_soft_prompt",
    "list_methods",
    "list_plugins",
    "list_structures",
    "replace_module",
    "route_rows",
]

_METHOD_CLASS = re.compile(r"^[A-Z][A-Za-z0-9]*(Model|Config)$")


def __getattr__(name: str) -> Any:
    """Resolve ``XxxModel`` / ``XxxConfig`` through the registry of installed plugins."""
    if not _METHOD_CLASS.match(name):
        raise AttributeError(f"module 'opendelta' has no attribute {name!r}")
    for spec in list_methods():
        for cls in (spec.model_cls, spec.config_cls):
            if cls.__name__ == name:
                return cls
    from opendelta.install_hint import install_hint
    from opendelta.registry import distribution_hint

    installed = ", ".join(s.model_cls.__name__ for s in list_methods()) or "none"
    raise DeltaMethodNotInstalledError(
        f"cannot import {name!r} from opendelta: no installed plugin provides it (installed methods: {installed}). "
        f"Install its plugin: {install_hint(distribution_hint(name))}"
    )
