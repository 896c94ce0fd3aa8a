"""PEFT's VeRA adapter folders: read into a :class:`VeraModel` (``read_checkpoint`` hook), written by ``save_peft``.

``PeftModel.save_pretrained`` writes ``adapter_config.json`` (``peft_type: "VERA"``, ``r``, ``target_modules``,
``projection_prng_key``, ``save_projection``...) and ``adapter_model.safetensors`` holding
``base_model.model.<module>.vera_lambda_b`` ``(out,)`` and ``.vera_lambda_d`` ``(r,)`` for each modified module, and,
with ``save_projection=True``, the shared ``base_model.vera_A`` ``[r, max in]`` and ``base_model.vera_B``
``[max out, r]`` once. Without them PEFT draws the matrices again from the key, and so does ``VeraModel`` (the same
draw, :mod:`opendelta_vera.projections`); matrices a ``save_projection=False`` folder carries anyway are ignored, as
PEFT ignores them. The modules are chosen by PEFT's rules (a list: a name or a ``.``-suffix; a string: a regex fully
matching the name). Options that would make PEFT compute something ``VeraModel`` does not (``modules_to_save``,
trained biases, ``layers_to_transform``, ``all-linear``...) are refused by name.
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
    DeltaModel,
    backbone_module_names,
    contained_file,
    file_patterns,
    is_linear,
    read_config_dict,
    read_safetensors,
    write_atomically,
)
from opendelta_vera.config import PRNGKey, VeraConfig
from opendelta_vera.model import VeraModel

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "read_peft_vera", "save_peft_vera"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_PROJECTIONS = {"base_model.vera_A": "vera_A", "base_model.vera_B": "vera_B"}
_VECTORS = ("vera_lambda_b", "vera_lambda_d")
_READ = frozenset(
    {"peft_type", "target_modules", "exclude_modules", "r", "projection_prng_key", "save_projection"}
    | {"vera_dropout", "d_initial"}
)
_INERT = frozenset(
    {
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "auto_mapping",
        "peft_version",
        "init_weights",
        "fan_in_fan_out",
    }
)
"""Fields that concern initialisation or bookkeeping (``fan_in_fan_out`` only says how ``Conv1D`` stores W)."""
_PATTERNS = ("target_modules", "exclude_modules")


def _is_off(field: str, value: Any) -> bool:
    if field == "bias":
        return value in (None, "none")
    return value is None or (isinstance(value, (bool, list, dict, str)) and not value)


def _check_fields(config: Mapping[str, Any], source: str) -> None:
    for field, value in config.items():
        if field in _READ or field in _INERT or _is_off(field, value):
            continue
        names = isinstance(value, list) and all(isinstance(v, str) for v in value)
        raise CheckpointError(
            f"{source}: {field}={file_patterns.shown(value) if names else repr(value)[:200]} is a "
            f"PEFT option VeraModel does not support (it may change what the adapter computes); VeraModel loads "
            f"target_modules, exclude_modules, r, projection_prng_key, save_projection, vera_dropout and d_initial. "
            f"Use PEFT for this adapter."
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
        raise CheckpointError(f"{source}: target_modules='all-linear' is not supported by VeraModel's PEFT reader")


def _matcher(field: str, value: Any, source: str) -> Any:
    """PEFT's rule for ``field``: a regex string fully matches the name; a list entry is the name or its suffix."""
    if value is None:
        return lambda key: False
    if isinstance(value, str):
        try:
            regex = file_patterns.compile_file_regex(value, value, file_patterns.MatchBudget(field, source))
        except AddressingError as exc:
            raise CheckpointError(str(exc)) from exc
        return lambda key: regex.fullmatch(key) is not None
    return lambda key: key in value or any(key.endswith(f".{t}") for t in value)


def vera_config_from_peft(config: Mapping[str, Any], model: nn.Module, source: str) -> VeraConfig:
    """The :class:`VeraConfig` that puts on ``model`` what the PEFT VeRA ``config`` puts there (by full names).

    Raises:
        CheckpointError: an unsupported option (named), targets that match nothing or are not linear layers, or a
            value ``VeraConfig`` refuses.
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
        raise CheckpointError(f"{source} puts VeRA on {', '.join(wrong[:3])}: VeraModel modifies linear layers only")
    given = {f: config[f] for f in ("r", "save_projection", "vera_dropout", "d_initial") if f in config}
    try:
        return VeraConfig(
            modified_modules=names,
            common_structure=False,
            projection_prng_key=PRNGKey(config.get("projection_prng_key", 0)),
            **given,
        )
    except (TypeError, ValueError) as exc:  # DeltaConfigError is a ValueError
        raise CheckpointError(f"{source}: {exc}") from exc


def _our_tensors(tensors: Mapping[str, torch.Tensor], config: VeraConfig, source: str) -> dict[str, torch.Tensor]:
    """``base_model.model.<module>.vera_lambda_*`` -> ``<module>.vera.vera_lambda_*``, and the projections.

    These keep a placeholder name (``vera_A``) until the delta is built and its first layer, which stores them, is
    known (see :func:`_place_projections`).
    """
    ours = {}
    for name, tensor in tensors.items():
        if name in _PROJECTIONS:
            if config.save_projection:
                ours[_PROJECTIONS[name]] = tensor
            continue  # PEFT ignores them too when save_projection is False
        module, _, vector = name.removeprefix(_PREFIX).rpartition(".")
        if not name.startswith(_PREFIX) or vector not in _VECTORS:
            raise CheckpointError(
                f"{source}: {name!r:.200} is not a VeRA tensor ('{_PREFIX}<module>.vera_lambda_b' or '_d', or "
                f"'base_model.vera_A'/'vera_B')"
            )
        ours[f"{module}.{VeraModel.delta_name}.{vector}"] = tensor
    if config.save_projection and set(_PROJECTIONS.values()) - set(ours):
        raise CheckpointError(
            f"{source} says save_projection=True but holds no base_model.vera_A and base_model.vera_B (PEFT refuses "
            f"it too)"
        )
    return ours


def _place_projections(delta_model: DeltaModel, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The shared matrices under the name of the first layer, which stores them (see :mod:`opendelta_vera.layer`)."""
    owner = f"{delta_model.targets[0].name}.{VeraModel.delta_name}"
    return {f"{owner}.{n}" if n in _PROJECTIONS.values() else n: t for n, t in tensors.items()}


def read_peft_vera(folder: Path, backbone_model: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """Read a PEFT VeRA adapter folder into a record for core's apply step; ``None`` for any other folder.

    Raises:
        CheckpointError: a PEFT VeRA folder that cannot be loaded faithfully, or ``delta_cls`` is another method.
    """
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG_NAME).is_file():
        return None
    config = read_config_dict(contained_file(folder, ADAPTER_CONFIG_NAME, "the PEFT config"))
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "VERA":
        return None  # another PEFT method: another plugin may read it
    source = str(folder)
    if delta_cls.delta_type not in ("", None) and not issubclass(delta_cls, VeraModel):
        raise CheckpointError(
            f"{folder} is a PEFT 'VERA' adapter, and {delta_cls.__name__} cannot read it; load it with "
            f"VeraModel.from_finetuned or AutoDeltaModel.from_finetuned"
        )
    vera_config = vera_config_from_peft(config, backbone_model, source)
    if not (folder / ADAPTER_WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{folder} has {ADAPTER_CONFIG_NAME} but no {ADAPTER_WEIGHTS_NAME}")
    weights = contained_file(folder, ADAPTER_WEIGHTS_NAME, "the PEFT weights file")
    return CheckpointRecord(
        source,
        str(weights),
        VeraModel,
        vera_config,
        _our_tensors(read_safetensors(weights), vera_config, source),
        translate=_place_projections,
        describe=f"a PEFT VeRA adapter whose own config builds VeRA on this {type(backbone_model).__name__}",
    )


def save_peft_vera(delta_model: VeraModel, path: str | os.PathLike[str], *, task_type: str | None = None) -> Path:
    """Export ``delta_model`` as a PEFT VeRA adapter folder that ``PeftModel.from_pretrained`` loads.

    A VeRA on some slices of a fused layer (GPT-2's ``c_attn`` with the default ``attn.q``/``attn.v``) becomes a
    VeRA on the whole layer whose ``lambda_b`` is zero on the other slices: the same outputs, as PEFT sizes its
    matrices by the whole layer too. The matrices are written when the config saves them (``save_projection``);
    otherwise PEFT draws them again from ``projection_prng_key``, as this plugin did.

    Args:
        delta_model: the VeRA delta model to export.
        path: the folder to write ``adapter_config.json`` and ``adapter_model.safetensors`` into (created if needed).
        task_type: PEFT's ``task_type`` to record (``"SEQ_CLS"``, ``"CAUSAL_LM"``...); ``None`` loads as a plain
            ``PeftModel``.

    Returns:
        The folder.

    Raises:
        TypeError: ``delta_model`` is not a VeraModel.
    """
    if not isinstance(delta_model, VeraModel):
        raise TypeError(f"save_peft_vera exports a VeraModel, got {type(delta_model).__name__}")
    backbone = delta_model.backbone_model
    tensors: dict[str, torch.Tensor] = {}
    targets = []
    for target, insertion in zip(delta_model.targets, delta_model.insertions(), strict=True):
        layer = insertion.delta
        lambda_b = layer.vera_lambda_b.detach()
        if layer.out_index is not None:  # some slices of a fused layer: zero scales for the others
            lambda_b = lambda_b.new_zeros(layer.out_features).index_copy(0, layer.out_index, lambda_b)
        tensors[f"{_PREFIX}{target.name}.vera_lambda_b"] = lambda_b
        tensors[f"{_PREFIX}{target.name}.vera_lambda_d"] = layer.vera_lambda_d.detach()
        targets.append(target.name)
    config = delta_model.config
    if config.save_projection:
        owner = delta_model.deltas[0].owner
        tensors["base_model.vera_A"], tensors["base_model.vera_B"] = owner.vera_A, owner.vera_B
    modules = dict(backbone.named_modules())
    document = {
        "peft_type": "VERA",
        "task_type": task_type,
        "base_model_name_or_path": getattr(getattr(backbone, "config", None), "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "target_modules": targets,
        "projection_prng_key": config.projection_prng_key,
        "save_projection": config.save_projection,
        "vera_dropout": config.vera_dropout,
        "d_initial": config.d_initial,
        "fan_in_fan_out": all(not isinstance(modules[t], nn.Linear) for t in targets),  # GPT-2's Conv1D: [in, out]
        "bias": "none",
        "modules_to_save": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    write_atomically(folder / ADAPTER_WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    write_atomically(folder / ADAPTER_CONFIG_NAME, (json.dumps(document, indent=2) + "\n").encode())
    return folder
