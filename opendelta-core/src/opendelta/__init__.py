"""OpenDelta: plug-and-play delta tuning (LoRA, adapters, prefixes...) for PyTorch and transformers models.

Core holds the machinery; every method comes from a plugin distribution (``pip install opendelta-lora``) and is
importable from here once installed: ``from opendelta import LoraModel``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from opendelta.auto import AutoDeltaConfig, AutoDeltaModel
from opendelta.base import DeltaModel, Target
from opendelta.basemodel import DeltaBase
from opendelta.config import DeltaConfig
from opendelta.delta_configs import BaseDeltaConfig
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
    OpenDeltaConfigWarning,
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
from opendelta.method_classes import method_class
from opendelta.plugins import list_plugins
from opendelta.prefix import insert_prefix
from opendelta.prompt import insert_soft_prompt
from opendelta.registry import get_method, list_methods, list_structures
from opendelta.routing import route_rows
from opendelta.utils import logging as logging  # 0.3.2's; not in __all__, where a star import would shadow stdlib's
from opendelta.visualization import count_parameters

__version__ = "0.1.0"

__all__ = [
    "AddressingError",
    "AutoDeltaConfig",
    "AutoDeltaModel",
    "BackboneMismatchError",
    "BackboneUnverifiedError",
    "BaseDeltaConfig",
    "CheckpointError",
    "CommonStructureMap",
    "DeltaBase",
    "DeltaConfig",
    "DeltaConfigError",
    "DeltaMethodNotInstalledError",
    "DeltaModel",
    "DeltaStateError",
    "HubError",
    "ModuleNotFoundInStructureError",
    "OpenDeltaAddressingWarning",
    "OpenDeltaCompatibilityWarning",
    "OpenDeltaConfigWarning",
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
    "Visualization",
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

_LAZY = {"Visualization": "bigmodelvis", "CommonStructureMap": "opendelta.utils.structure_mapping"}
"""Core's names imported on first access (bigmodelvis and rich add about 70 ms to ``import opendelta``)."""


def __getattr__(name: str) -> Any:
    """Core's lazy names, then ``XxxModel`` / ``XxxConfig`` through the registry of installed plugins.

    Only a name a plugin could provide gets the "install its plugin" error; any other is a plain AttributeError.
    """
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    return method_class(name, "opendelta")
