"""PEFT's IA3 adapter folders, read into an :class:`IA3Model` by ``from_finetuned`` (the ``read_checkpoint`` hook).

``PeftModel.save_pretrained`` writes ``adapter_config.json`` (``peft_type: "IA3"``, ``target_modules``,
``feedforward_modules``...) and ``adapter_model.safetensors`` holding ``base_model.model.<module>.ia3_l`` for each
modified module: ``[out, 1]`` for an output-scaled one, ``[1, in]`` for a feed-forward (input-scaled) one. The
modules are chosen by PEFT's rules (a list: a name or a ``.``-suffix; a string: a regex fully matching the name;
feed-forward: a list entry the name ends with), and the vectors become ours, flattened. Options that would make
PEFT compute something ``IA3Model`` does not (``modules_to_save``, ``all-linear``...) are refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opendelta.plugin_api import (
    AddressingError,
    CheckpointError,
    CheckpointRecord,
    DeltaModel,
    backbone_module_names,
    contained_file,
    file_patterns,
    is_linear,
    read_config_dict,
    read_safetensors,
)
from opendelta_ia3.config import IA3Config
from opendelta_ia3.model import IA3Model

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "read_peft_ia3"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_SUFFIX = ".ia3_l"
_READ = frozenset({"peft_type", "target_modules", "feedforward_modules", "exclude_modules", "fan_in_fan_out"})
_INERT = frozenset(
    {
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "auto_mapping",
        "peft_version",
        "init_ia3_weights",
    }
)
"""Fields that concern initialisation or bookkeeping (``fan_in_fan_out`` only says how ``Conv1D`` stores W)."""
_PATTERNS = ("target_modules", "feedforward_modules", "exclude_modules")


def _is_off(value: Any) -> bool:
    return value is None or (isinstance(value, (bool, list, dict, str)) and not value)


def _check_fields(config: Mapping[str, Any], source: str) -> None:
    for field, value in config.items():
        if field in _READ or field in _INERT or _is_off(value):
            continue
        raise CheckpointError(
            f"{source}: {field}={file_patterns.shown(value) if isinstance(value, list) else repr(value)[:200]} is a "
            f"PEFT option IA3Model does not support (it may change what the adapter computes); IA3Model loads "
            f"target_modules, feedforward_modules and exclude_modules. Use PEFT for this adapter."
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
    targets = config.get("target_modules")
    if not targets:
        raise CheckpointError(f"{source} has no target_modules: PEFT records the modules it modified there")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        raise CheckpointError(f"{source}: target_modules='all-linear' is not supported by IA3Model's PEFT reader")


def _matcher(field: str, value: Any, source: str, *, suffix_dot: bool) -> Any:
    """PEFT's rule for ``field``: a regex string fully matches the name; a list entry is the name or its suffix."""
    if value is None:
        return lambda key: False
    if isinstance(value, str):
        try:
            regex = file_patterns.compile_file_regex(value, value, file_patterns.MatchBudget(field, source))
        except AddressingError as exc:
            raise CheckpointError(str(exc)) from exc
        return lambda key: regex.fullmatch(key) is not None
    if suffix_dot:
        return lambda key: key in value or any(key.endswith(f".{t}") for t in value)
    return lambda key: any(key.endswith(t) for t in value)  # PEFT's feed-forward test: a plain endswith


def ia3_config_from_peft(config: Mapping[str, Any], model: nn.Module, source: str) -> IA3Config:
    """The :class:`IA3Config` that puts on ``model`` what the PEFT IA3 ``config`` puts there (by full names).

    Raises:
        CheckpointError: an unsupported option (named), targets that match nothing or are not linear layers.
    """
    _check_fields(config, source)
    target = _matcher("target_modules", config["target_modules"], source, suffix_dot=True)
    exclude = _matcher("exclude_modules", config.get("exclude_modules"), source, suffix_dot=True)
    feedforward = _matcher("feedforward_modules", config.get("feedforward_modules"), source, suffix_dot=False)
    names = [n for n in backbone_module_names(model) if target(n) and not exclude(n)]
    if not names:
        raise CheckpointError(f"{source}: target_modules matches no module of this {type(model).__name__}")
    modules = dict(model.named_modules())
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in names if not is_linear(modules[n])]
    if wrong:
        raise CheckpointError(f"{source} puts IA3 on {', '.join(wrong[:3])}: IA3Model modifies linear layers only")
    return IA3Config(
        modified_modules=names,
        feedforward_modules=[n for n in names if feedforward(n)],
        common_structure=False,
    )


def _our_tensors(tensors: Mapping[str, torch.Tensor], config: IA3Config, source: str) -> dict[str, torch.Tensor]:
    """``base_model.model.<module>.ia3_l`` ``[out, 1]`` / ``[1, in]`` -> ``<module>.ia3.ia3_l``, flat."""
    feedforward = set(config.feedforward_modules or ())
    ours = {}
    for name, tensor in tensors.items():
        if not (name.startswith(_PREFIX) and name.endswith(_SUFFIX)):
            raise CheckpointError(f"{source}: {name!r:.200} is not an IA3 vector ('{_PREFIX}<module>{_SUFFIX}')")
        module = name[len(_PREFIX) : -len(_SUFFIX)]
        wanted = 0 if module in feedforward else 1  # the dimension of size one
        if tensor.dim() != 2 or tensor.shape[wanted] != 1:
            layout = "[1, in] (feed-forward)" if wanted == 0 else "[out, 1]"
            raise CheckpointError(f"{source}: {name} has shape {list(tensor.shape)}, not PEFT's {layout}")
        ours[f"{module}.{IA3Model.delta_name}.ia3_l"] = tensor.reshape(-1)
    return ours


def read_peft_ia3(folder: Path, backbone_model: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """Read a PEFT IA3 adapter folder into a record for core's apply step; ``None`` for any other folder.

    Raises:
        CheckpointError: a PEFT IA3 folder that cannot be loaded faithfully, or ``delta_cls`` is another method.
    """
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG_NAME).is_file():
        return None
    config = read_config_dict(contained_file(folder, ADAPTER_CONFIG_NAME, "the PEFT config"))
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "IA3":
        return None  # another PEFT method: another plugin may read it
    source = str(folder)
    if delta_cls.delta_type not in ("", None) and not issubclass(delta_cls, IA3Model):
        raise CheckpointError(
            f"{folder} is a PEFT 'IA3' adapter, and {delta_cls.__name__} cannot read it; load it with "
            f"IA3Model.from_finetuned or AutoDeltaModel.from_finetuned"
        )
    ia3_config = ia3_config_from_peft(config, backbone_model, source)
    if not (folder / ADAPTER_WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{folder} has {ADAPTER_CONFIG_NAME} but no {ADAPTER_WEIGHTS_NAME}")
    weights = contained_file(folder, ADAPTER_WEIGHTS_NAME, "the PEFT weights file")
    return CheckpointRecord(
        source,
        str(weights),
        IA3Model,
        ia3_config,
        _our_tensors(read_safetensors(weights), ia3_config, source),
        describe=f"a PEFT IA3 adapter whose own config builds IA3 on this {type(backbone_model).__name__}",
    )
