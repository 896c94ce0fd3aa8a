"""OpenDelta: plug-and-play delta tuning (LoRA, adapters, prefixes...) for PyTorch and transformers models.

Core holds the machinery; every method comes from a plugin distribution (``pip install opendelta-lora``) and is
importable from here once installed: ``from opendelta import LoraModel``.
"""

from __future__ import annotations

from importlib import import_module
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

from opendelta import dynamo_guard

if TYPE_CHECKING:
    from bigmodelvis import Visualization

    from opendelta.auto import AutoDeltaConfig, AutoDeltaModel
    from opendelta.base import DeltaModel, Target
    from opendelta.basemodel import DeltaBase
    from opendelta.combination import combine_deltas
    from opendelta.config import DeltaConfig
    from opendelta.delta_configs import BaseDeltaConfig
    from opendelta.errors import (
        AddressingError,
        BackboneMismatchError,
        BackboneUnverifiedError,
        CheckpointError,
        DeltaClassError,
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
    from opendelta.kbit_training import prepare_for_kbit_training, prepare_model_for_kbit_training
    from opendelta.method_classes import method_class  # noqa: F401 - opendelta.method_class, not in __all__
    from opendelta.plugins import list_plugins
    from opendelta.prefix import insert_prefix
    from opendelta.prompt import insert_soft_prompt
    from opendelta.registry import get_method, list_methods, list_structures
    from opendelta.routing import route_rows
    from opendelta.utils import logging  # noqa: F401 - 0.3.2's opendelta.logging, not in __all__
    from opendelta.utils.structure_mapping import CommonStructureMap
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
    "DeltaClassError",
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
    "combine_deltas",
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
    "prepare_for_kbit_training",
    "prepare_model_for_kbit_training",
    "replace_module",
    "route_rows",
]

_SOURCES: dict[str, str] = {
    "AutoDeltaConfig": "opendelta.auto",
    "AutoDeltaModel": "opendelta.auto",
    "DeltaModel": "opendelta.base",
    "Target": "opendelta.base",
    "DeltaBase": "opendelta.basemodel",
    "combine_deltas": "opendelta.combination",
    "DeltaConfig": "opendelta.config",
    "BaseDeltaConfig": "opendelta.delta_configs",
    "AddressingError": "opendelta.errors",
    "BackboneMismatchError": "opendelta.errors",
    "BackboneUnverifiedError": "opendelta.errors",
    "CheckpointError": "opendelta.errors",
    "DeltaClassError": "opendelta.errors",
    "DeltaConfigError": "opendelta.errors",
    "DeltaMethodNotInstalledError": "opendelta.errors",
    "DeltaStateError": "opendelta.errors",
    "HubError": "opendelta.errors",
    "ModuleNotFoundInStructureError": "opendelta.errors",
    "OpenDeltaAddressingWarning": "opendelta.errors",
    "OpenDeltaCompatibilityWarning": "opendelta.errors",
    "OpenDeltaConfigWarning": "opendelta.errors",
    "OpenDeltaError": "opendelta.errors",
    "OpenDeltaPluginWarning": "opendelta.errors",
    "OpenDeltaServingWarning": "opendelta.errors",
    "OpenDeltaVersionWarning": "opendelta.errors",
    "PluginValidationError": "opendelta.errors",
    "ResourceLimitError": "opendelta.errors",
    "StructureNotFoundError": "opendelta.errors",
    "StructureValidationError": "opendelta.errors",
    "UnknownArgumentError": "opendelta.errors",
    "UnknownDeltaMethodError": "opendelta.errors",
    "UnsupportedTargetError": "opendelta.errors",
    "freeze_module": "opendelta.freezing",
    "hookimpl": "opendelta.hookspecs",
    "insert_parallel_module": "opendelta.insertion",
    "insert_sequential_module": "opendelta.insertion",
    "replace_module": "opendelta.insertion",
    "prepare_for_kbit_training": "opendelta.kbit_training",
    "prepare_model_for_kbit_training": "opendelta.kbit_training",
    "method_class": "opendelta.method_classes",
    "list_plugins": "opendelta.plugins",
    "insert_prefix": "opendelta.prefix",
    "insert_soft_prompt": "opendelta.prompt",
    "get_method": "opendelta.registry",
    "list_methods": "opendelta.registry",
    "list_structures": "opendelta.registry",
    "route_rows": "opendelta.routing",
    "count_parameters": "opendelta.visualization",
    "Visualization": "bigmodelvis",
    "CommonStructureMap": "opendelta.utils.structure_mapping",
}
"""Where each public name lives. ``import opendelta`` imports none of them: each is imported on first access, so
the CLI, a plugin module that needs only ``hookimpl`` and ``import opendelta`` itself cost what they use (the
package used to import torch, transformers and ``torch._dynamo`` eagerly: seconds)."""

_MODULES = {"logging": "opendelta.utils.logging"}
"""Names that are modules: 0.3.2's ``opendelta.logging`` (not in ``__all__``, where a star import would shadow
the standard library's)."""

dynamo_guard.install()  # process-wide: torch.compile checks module hooks once torch._dynamo is imported


def __getattr__(name: str) -> Any:
    """A public name, a submodule (``opendelta.plugins``), or ``XxxModel``/``XxxConfig`` from the installed plugins.

    Only a name a plugin could provide gets the "install its plugin" error; any other is a plain AttributeError.
    """
    if name in _SOURCES:
        value = getattr(import_module(_SOURCES[name]), name)
    elif name in _MODULES:
        value = import_module(_MODULES[name])
    elif not name.startswith("_") and find_spec(f"{__name__}.{name}") is not None:
        value = import_module(f"{__name__}.{name}")
    else:
        from opendelta.method_classes import method_class

        return method_class(name, "opendelta")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_MODULES})
