"""``AutoDeltaConfig`` and ``AutoDeltaModel``: pick the method class from ``delta_type`` through the registry."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from opendelta.base import DeltaModel
from opendelta.compat import method_for
from opendelta.config import DeltaConfig, _hub_kwargs
from opendelta.errors import DeltaConfigError
from opendelta.registry import get_method
from opendelta.saving import read_config_dict

__all__ = ["AutoDeltaConfig", "AutoDeltaModel"]


def _delta_type_of(config_dict: Any) -> str:
    if not isinstance(config_dict, dict):
        raise DeltaConfigError(f"a delta config must be a dict, got {type(config_dict).__name__}")
    delta_type = config_dict.get("delta_type")
    if not isinstance(delta_type, str):
        raise DeltaConfigError(f"the config has no delta_type (a string such as 'lora'); got {delta_type!r}")
    return delta_type


class AutoDeltaConfig:
    """Builds the config class registered for a ``delta_type``; not instantiable itself."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError("AutoDeltaConfig is built with AutoDeltaConfig.from_dict(...) or .from_finetuned(...)")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> DeltaConfig:
        """The config for ``config_dict["delta_type"]`` with the given values (``kwargs`` override them).

        A dict made in code, such as ``asdict(delta_args)`` of a 0.3.2 pipeline: keys that are no field of the method
        are dropped with one warning, keyword arguments are strict (see :meth:`DeltaConfig.from_dict`).
        """
        _delta_type_of(config_dict)
        return method_for(config_dict).config_cls.from_dict(config_dict, **kwargs)

    @classmethod
    def from_finetuned(cls, finetuned_delta_path: str | os.PathLike[str], **kwargs: Any) -> DeltaConfig:
        """The config saved in a checkpoint folder, a ``config.json`` file, or a Hub repo."""
        raw = read_config_dict(finetuned_delta_path, **_hub_kwargs(kwargs))
        _delta_type_of(raw)
        config = method_for(raw).config_cls.from_saved(raw, str(finetuned_delta_path), **kwargs)  # strict: a file
        config.mark_read_from(finetuned_delta_path, overridden=kwargs)
        return config


class AutoDeltaModel:
    """Builds the delta model registered for a config's ``delta_type``; not instantiable itself."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError("AutoDeltaModel is built with AutoDeltaModel.from_config(...) or .from_finetuned(...)")

    @classmethod
    def from_config(cls, config: DeltaConfig | dict[str, Any], backbone_model: nn.Module, **kwargs: Any) -> DeltaModel:
        """A fresh delta model (weights initialised, not loaded) for ``config`` on ``backbone_model``.

        A dict is read as :meth:`AutoDeltaConfig.from_dict` reads it (unknown keys dropped with one warning).
        """
        if isinstance(config, dict):
            _delta_type_of(config)
            return method_for(config).model_cls.from_config(config, backbone_model, **kwargs)
        if not isinstance(config, DeltaConfig):
            raise DeltaConfigError(f"config must be a DeltaConfig or a dict, got {type(config).__name__}")
        return get_method(config.delta_type).model_cls.from_config(config, backbone_model, **kwargs)

    @classmethod
    def from_finetuned(
        cls, finetuned_delta_path: str | os.PathLike[str], backbone_model: nn.Module, *model_args: Any, **kwargs: Any
    ) -> DeltaModel:
        """Rebuild a saved delta of any installed method on ``backbone_model`` (see ``DeltaModel.from_finetuned``)."""
        return DeltaModel.from_finetuned(finetuned_delta_path, backbone_model, *model_args, **kwargs)
