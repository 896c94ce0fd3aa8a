"""PEFT's LoHa adapter folders: read into a :class:`LoHaModel` by ``from_finetuned``, and written by ``save_peft``.

``PeftModel.save_pretrained`` writes ``adapter_config.json`` (``peft_type: "LOHA"``, ``r``, ``alpha``,
``target_modules``, ``rank_pattern``...) and ``adapter_model.safetensors`` holding
``base_model.model.<module>.hada_w1_a`` (``[out, r]``), ``hada_w1_b`` (``[r, in]``), ``hada_w2_a`` and
``hada_w2_b`` for each modified linear layer: our parameters, under our names ``<module>.loha.hada_...``. The
modules are chosen by PEFT's rules (a list: a name or a ``.``-suffix; a string: a regex fully matching the name).
Options that would make PEFT compute something ``LoHaModel`` does not (``modules_to_save``,
``layers_to_transform``, convolution targets...) are refused by name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from opendelta.plugin_api import (
    AddressingError,
    CheckpointError,
    CheckpointRecord,
    DeltaConfigError,
    DeltaModel,
    backbone_module_names,
    contained_file,
    file_patterns,
    is_linear,
    read_config_dict,
    read_safetensors,
    write_atomically,
)
from opendelta_loha.config import LoHaConfig
from opendelta_loha.model import LoHaModel

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "read_peft_loha", "save_peft_loha"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_TYPE = "LOHA"
_PREFIX = "base_model.model."
_PARAMETERS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_READ = frozenset(
    {
        "peft_type",
        "r",
        "alpha",
        "rank_dropout",
        "module_dropout",
        "target_modules",
        "exclude_modules",
        "rank_pattern",
        "alpha_pattern",
        "init_weights",
    }
)
_INERT = frozenset(
    {
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "auto_mapping",
        "peft_version",
        "use_effective_conv2d",
    }
)
"""Bookkeeping, and ``use_effective_conv2d``, which PEFT ignores on the linear layers LoHaModel modifies."""
_PATTERNS = ("target_modules", "exclude_modules")


def _is_off(value: Any) -> bool:
    return value is None or (isinstance(value, (bool, list, dict, str)) and not value)


def _check_fields(config: Mapping[str, Any], source: str) -> None:
    for field, value in config.items():
        if field in _READ or field in _INERT or _is_off(value):
            continue
        raise CheckpointError(
            f"{source}: {field}={value!r:.200} is a "
            f"PEFT option LoHaModel does not support (it may change what the adapter computes); LoHaModel loads "
            f"r, alpha, rank_dropout, module_dropout, target_modules, exclude_modules, rank_pattern and "
            f"alpha_pattern. Use PEFT for this adapter."
        )
    for field in _PATTERNS:
        value = config.get(field)
        ok = (
            value is None
            or isinstance(value, str)
            or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        )
        if not ok:
            raise CheckpointError(f"{source}: {field} must be a list of names or a regex string, got {value!r:.200}")
        file_patterns.check_limits(field, value, source)
    for field in ("rank_pattern", "alpha_pattern"):
        value = config.get(field) or {}
        if not isinstance(value, dict):
            raise CheckpointError(f"{source}: {field} must be a mapping of patterns to numbers, got {value!r:.200}")
        file_patterns.check_limits(field, list(value), source)
    targets = config.get("target_modules")
    if not targets:
        raise CheckpointError(f"{source} has no target_modules: PEFT records the modules it modified there")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        raise CheckpointError(f"{source}: target_modules='all-linear' is not supported by LoHaModel's PEFT reader")


def _matcher(field: str, value: Any, source: str) -> Any:
    """PEFT's rule for ``field``: a regex string fully matches the name; a list entry is the name or a suffix."""
    if value is None:
        return lambda key: False
    if isinstance(value, str):
        try:
            regex = file_patterns.compile_file_regex(value, value, file_patterns.MatchBudget(field, source))
        except AddressingError as exc:
            raise CheckpointError(str(exc)) from exc
        return lambda key: regex.fullmatch(key) is not None
    return lambda key: key in value or any(key.endswith(f".{t}") for t in value)


def loha_config_from_peft(config: Mapping[str, Any], model: nn.Module, source: str) -> LoHaConfig:
    """The :class:`LoHaConfig` that puts on ``model`` what the PEFT LoHa ``config`` puts there (by full names).

    Raises:
        CheckpointError: an unsupported option (named), a value of the wrong type or range, targets that match
            nothing or are not linear layers.
    """
    _check_fields(config, source)
    target = _matcher("target_modules", config["target_modules"], source)
    exclude = _matcher("exclude_modules", config.get("exclude_modules"), source)
    names = [n for n in backbone_module_names(model) if target(n) and not exclude(n)]
    if not names:
        raise CheckpointError(f"{source}: target_modules matches no module of this {type(model).__name__}")
    modules = dict(model.named_modules())
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in names if not is_linear(modules[n])]
    if wrong:
        raise CheckpointError(f"{source} puts LoHa on {', '.join(wrong[:3])}: LoHaModel modifies linear layers only")
    fields = ("r", "alpha", "rank_dropout", "module_dropout", "rank_pattern", "alpha_pattern", "init_weights")
    try:
        return LoHaConfig(
            modified_modules=names,
            common_structure=False,
            **{f: config[f] for f in fields if config.get(f) is not None},
        )
    except DeltaConfigError as exc:
        raise CheckpointError(f"{source}: {exc}; the file is damaged or was not written by PEFT") from exc


def _our_tensors(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``base_model.model.<module>.hada_w1_a`` ... -> ``<module>.loha.hada_w1_a`` ...; anything else is refused."""
    ours = {}
    for name, tensor in tensors.items():
        module, _, parameter = name.removeprefix(_PREFIX).rpartition(".")
        if not name.startswith(_PREFIX) or parameter not in _PARAMETERS:
            raise CheckpointError(
                f"{source}: {name!r:.200} is not a LoHa factor of a linear layer ('{_PREFIX}<module>.hada_w1_a' and "
                f"the like; convolution factors hada_t1/hada_t2 are not supported)"
            )
        ours[f"{module}.{LoHaModel.delta_name}.{parameter}"] = tensor
    return ours


def read_peft_loha(folder: Path, backbone_model: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """Read a PEFT LoHa adapter folder into a record for core's apply step; ``None`` for any other folder.

    Raises:
        CheckpointError: a PEFT LoHa folder that cannot be loaded faithfully, or ``delta_cls`` is another method.
    """
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG_NAME).is_file():
        return None
    config = read_config_dict(contained_file(folder, ADAPTER_CONFIG_NAME, "the PEFT config"))
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != PEFT_TYPE:
        return None  # another PEFT method: another plugin may read it
    source = str(folder)
    if delta_cls.delta_type not in ("", None) and not issubclass(delta_cls, LoHaModel):
        raise CheckpointError(
            f"{folder} is a PEFT 'LOHA' adapter, and {delta_cls.__name__} cannot read it; load it with "
            f"LoHaModel.from_finetuned or AutoDeltaModel.from_finetuned"
        )
    loha_config = loha_config_from_peft(config, backbone_model, source)
    if not (folder / ADAPTER_WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{folder} has {ADAPTER_CONFIG_NAME} but no {ADAPTER_WEIGHTS_NAME}")
    weights = contained_file(folder, ADAPTER_WEIGHTS_NAME, "the PEFT weights file")
    return CheckpointRecord(
        source,
        str(weights),
        LoHaModel,
        loha_config,
        _our_tensors(read_safetensors(weights), source),
        describe=f"a PEFT LoHa adapter whose own config builds LoHa on this {type(backbone_model).__name__}",
    )


def save_peft_loha(delta_model: LoHaModel, path: str | os.PathLike[str]) -> Path:
    """Export ``delta_model`` as a PEFT LoHa adapter folder that ``PeftModel.from_pretrained`` loads.

    An update of some slices of a fused layer (Phi-3's ``qkv_proj`` with the default ``attn.q``/``attn.v``) becomes
    one of the whole layer whose ``w1_a`` and ``w2_a`` rows for the other slices are zero: the same outputs.

    The folder records no ``task_type`` (PEFT would then expect a saved task head) and no ``modules_to_save``:
    ``PeftModel.from_pretrained(model, folder)`` loads it as a plain ``PeftModel``.

    Args:
        delta_model: the LoHa delta model to export.
        path: the folder to write ``adapter_config.json`` and ``adapter_model.safetensors`` into (created if needed).

    Raises:
        TypeError: ``delta_model`` is not a LoHaModel.
        CheckpointError: a target is no ``nn.Linear`` (GPT-2's ``Conv1D``, a quantized layer), on which PEFT 0.21.2
            cannot build LoHa, so it could not load the folder.
    """
    if not isinstance(delta_model, LoHaModel):
        raise TypeError(f"save_peft_loha exports a LoHaModel, got {type(delta_model).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    for target, insertion in zip(delta_model.targets, delta_model.insertions(), strict=True):
        if type(target.module) is not nn.Linear:
            raise CheckpointError(
                f"save_peft cannot export LoHa on {target.name} ({type(target.module).__name__}): PEFT 0.21.2 builds "
                f"LoHa on nn.Linear (and convolutions) only, so it could not load this adapter; save it with "
                f"save_finetuned()"
            )
        layer = insertion.delta
        for parameter in _PARAMETERS:
            value = getattr(layer, parameter).detach()
            if parameter.endswith("_a"):  # (rows, r): zero rows for the slices the update does not write
                value = layer._full(value, 0)
            tensors[f"{_PREFIX}{target.name}.{parameter}"] = value.to("cpu").contiguous().clone()
    config = delta_model.config
    backbone = delta_model.backbone_model
    document = {
        "peft_type": PEFT_TYPE,
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(backbone, "config", None), "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "alpha": config.alpha,
        "rank_dropout": config.rank_dropout,
        "module_dropout": config.module_dropout,
        "use_effective_conv2d": config.use_effective_conv2d,
        "target_modules": [t.name for t in delta_model.targets],
        "exclude_modules": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "modules_to_save": None,
    }
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / ADAPTER_WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    write_atomically(folder / ADAPTER_CONFIG_NAME, (json.dumps(document, indent=2) + "\n").encode())
    return folder
