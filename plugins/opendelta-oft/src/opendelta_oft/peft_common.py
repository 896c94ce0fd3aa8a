"""What reading and writing PEFT's OFT and BOFT adapter folders share: the files, PEFT's matching rules, refusals.

``PeftModel.save_pretrained`` writes ``adapter_config.json`` (``peft_type``, ``target_modules``, the method's sizes)
and ``adapter_model.safetensors`` with ``base_model.model.<module>.<tensor>`` per modified module. PEFT options these
plugins do not implement (``modules_to_save``, ``layers_to_transform``, a trainable ``bias``, ``all-linear``, any
unknown field that is set) are refused by name: loading them otherwise would compute something else, silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from opendelta.plugin_api import (
    AddressingError,
    CheckpointError,
    CheckpointRecord,
    DeltaConfig,
    DeltaModel,
    backbone_module_names,
    contained_file,
    file_patterns,
    is_linear,
    read_config_dict,
    read_safetensors,
    refuse_task_heads,
    write_atomically,
)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"
"""The PEFT release whose semantics these plugins follow (and that exported folders record)."""
COMMON_READ = frozenset({"peft_type", "target_modules", "exclude_modules", "bias"})
COMMON_INERT = frozenset(
    {
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "auto_mapping",
        "peft_version",
        "init_weights",
        "fan_in_fan_out",  # only says how a Conv1D stores W, which the plugins read from the layer
    }
)
_PATTERNS = ("target_modules", "exclude_modules")


def _is_off(value: Any) -> bool:
    return value is None or (isinstance(value, (bool, list, dict, str)) and not value)


def open_folder(folder: Path, peft_type: str) -> dict[str, Any] | None:
    """The folder's PEFT config when it is a PEFT adapter of ``peft_type``; ``None`` for any other folder."""
    if not (folder / ADAPTER_CONFIG_NAME).is_file():
        return None
    config = read_config_dict(contained_file(folder, ADAPTER_CONFIG_NAME, "the PEFT config"))
    found = config.get("peft_type")
    if not isinstance(found, str) or found.upper() != peft_type:
        return None  # another PEFT method: another plugin may read it
    return config


Convert = Callable[
    [Mapping[str, Any], nn.Module, Mapping[str, torch.Tensor], str], tuple[DeltaConfig, dict[str, torch.Tensor]]
]
"""``(PEFT config, backbone, PEFT tensors, source) -> (our config, our tensors)``, refusing what it cannot load."""


def read_folder(
    folder: Path,
    backbone: nn.Module,
    delta_cls: type[DeltaModel],
    peft_type: str,
    ours: type[DeltaModel],
    convert: Convert,
) -> CheckpointRecord | None:
    """Read a PEFT ``peft_type`` adapter folder into a record for core's apply step; ``None`` for any other folder.

    Raises:
        CheckpointError: a folder of that type that cannot be loaded faithfully, or ``delta_cls`` is another method.
    """
    folder = Path(folder)
    config = open_folder(folder, peft_type)
    if config is None:
        return None
    if delta_cls.delta_type not in ("", None) and not issubclass(delta_cls, ours):
        raise CheckpointError(
            f"{folder} is a PEFT {peft_type!r} adapter, and {delta_cls.__name__} cannot read it; load it with "
            f"{ours.__name__}.from_finetuned or AutoDeltaModel.from_finetuned"
        )
    weights, tensors = read_weights(folder)
    our_config, our_tensors = convert(config, backbone, tensors, str(folder))
    return CheckpointRecord(
        str(folder),
        str(weights),
        ours,
        our_config,
        our_tensors,
        describe=f"a PEFT {peft_type} adapter whose own config builds it on this {type(backbone).__name__}",
    )


def check_fields(config: Mapping[str, Any], source: str, read: frozenset[str], owner: str) -> None:
    """Refuse, by name, every set field that is neither read nor inert, and a bias other than ``"none"``."""
    for field, value in config.items():
        if field in read or field in COMMON_READ or field in COMMON_INERT or _is_off(value):
            continue
        strings = isinstance(value, list) and all(isinstance(v, str) for v in value)
        shown = file_patterns.shown(value) if strings else repr(value)[:200]
        raise CheckpointError(
            f"{source}: {field}={shown} is a PEFT option {owner} does not support (it may change what the adapter "
            f"computes). Use PEFT for this adapter."
        )
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise CheckpointError(
            f"{source}: bias={bias!r} (trained biases saved with the adapter) is not supported by {owner}; only "
            f"bias='none' adapters load"
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
        raise CheckpointError(f"{source}: target_modules='all-linear' is not supported by {owner}'s PEFT reader")


def _matcher(field: str, value: Any, source: str) -> Callable[[str], bool]:
    """PEFT's rule: a regex string fully matches the name; a list entry is the name or a ``.``-suffix of it."""
    if value is None:
        return lambda key: False
    if isinstance(value, str):
        try:
            regex = file_patterns.compile_file_regex(value, value, file_patterns.MatchBudget(field, source))
        except AddressingError as exc:
            raise CheckpointError(str(exc)) from exc
        return lambda key: regex.fullmatch(key) is not None
    return lambda key: key in value or any(key.endswith(f".{t}") for t in value)


def peft_targets(config: Mapping[str, Any], model: nn.Module, source: str, owner: str) -> list[str]:
    """The backbone's module names the PEFT config modifies (all linear layers).

    Raises:
        CheckpointError: the targets match nothing, or one is not a linear layer.
    """
    target = _matcher("target_modules", config["target_modules"], source)
    exclude = _matcher("exclude_modules", config.get("exclude_modules"), source)
    names = [n for n in backbone_module_names(model) if target(n) and not exclude(n)]
    if not names:
        raise CheckpointError(f"{source}: target_modules matches no module of this {type(model).__name__}")
    modules = dict(model.named_modules())
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in names if not is_linear(modules[n])]
    if wrong:
        raise CheckpointError(f"{source} modifies {', '.join(wrong[:3])}: {owner} modifies linear layers only")
    return names


def read_weights(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights file and its tensors."""
    if not (folder / ADAPTER_WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{folder} has {ADAPTER_CONFIG_NAME} but no {ADAPTER_WEIGHTS_NAME}")
    weights = contained_file(folder, ADAPTER_WEIGHTS_NAME, "the PEFT weights file")
    return weights, read_safetensors(weights)


def by_module(tensors: Mapping[str, torch.Tensor], names: list[str], suffixes: tuple[str, ...], source: str) -> dict:
    """``{module: {suffix: tensor}}``: every tensor must be ``base_model.model.<module><suffix>`` of a target."""
    found: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for key, tensor in tensors.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        module = key[len(PREFIX) : -len(suffix)] if suffix and key.startswith(PREFIX) else None
        if module not in found or suffix is None:
            raise CheckpointError(
                f"{source}: {key!r:.200} is not one of the adapter's tensors ('{PREFIX}<target module>"
                f"{'|'.join(suffixes)}')"
            )
        found[module][suffix] = tensor
    missing = [f"{n}{s}" for n, parts in found.items() for s in suffixes if s not in parts]
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(missing[:3])}: the weights do not match target_modules")
    return found


def short_names(targets: list[str], model: nn.Module) -> list[str]:
    """The modules' last name components when, by PEFT's rule, they designate exactly ``targets``; else the names."""
    leaves = sorted({t.rpartition(".")[2] for t in targets})
    chosen = [n for n in backbone_module_names(model) if any(n == leaf or n.endswith(f".{leaf}") for leaf in leaves)]
    return leaves if sorted(chosen) == sorted(targets) else targets


def write_folder(folder: Path, document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write both files atomically (core's ``write_atomically``), the weights first; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    write_atomically(folder / ADAPTER_WEIGHTS_NAME, save(plain, metadata={"format": "pt"}))
    write_atomically(folder / ADAPTER_CONFIG_NAME, (json.dumps(document, indent=2) + "\n").encode())
    return folder


def export_folder(
    delta_model: DeltaModel,
    path: str | os.PathLike[str],
    peft_type: str,
    tensors_of: Callable[[nn.Module], Mapping[str, torch.Tensor]],
    fields: Mapping[str, Any],
) -> Path:
    """Write ``delta_model`` as a PEFT ``peft_type`` adapter folder; returns the folder.

    Each delta's ``tensors_of(delta)`` (``{suffix: tensor}``) goes under ``base_model.model.<module><suffix>``, and
    the config holds the fields every PEFT config has plus the method's ``fields``.
    """
    tensors, targets = {}, []
    for target, insertion in delta_model.placements():
        for suffix, tensor in tensors_of(insertion.delta).items():
            tensors[f"{PREFIX}{target.name}{suffix}"] = tensor.detach()
        targets.append(target.name)
    backbone = delta_model.backbone_model
    document = {
        "peft_type": peft_type,
        "peft_version": PEFT_VERSION,
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(backbone, "config", None), "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "target_modules": short_names(targets, backbone),
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        **fields,
    }
    refuse_task_heads(delta_model, peft_type)
    return write_folder(Path(path), document, tensors)
