"""PEFT's FourierFT adapter folders: read by ``from_finetuned`` (``read_checkpoint``), written by ``save_peft``.

``PeftModel.save_pretrained`` writes ``adapter_config.json`` (``peft_type: "FOURIERFT"``, ``n_frequency``,
``scaling``, ``random_loc_seed``, ``target_modules``, ``n_frequency_pattern``...) and ``adapter_model.safetensors``
holding ``base_model.model.<module>.fourierft_spectrum`` (``[n_frequency]``) for each modified module, and nothing
else: PEFT keeps the coefficients' locations in a plain dict, outside its state dict, and draws them again from
``random_loc_seed`` on load, as :func:`~opendelta_fourierft.frequencies.frequency_locations` does. The modules are
chosen by PEFT's rules (a list: a name or a ``.``-suffix; a string: a regex fully matching the name). Options that
would make PEFT compute or load something ``FourierFTModel`` does not (``modules_to_save``, ``bias="all"``,
``layers_to_transform``...) are refused by name. Reading and writing need only ``json`` and ``safetensors``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opendelta.plugin_api import (
    PEFT_PREFIX,
    AddressingError,
    CheckpointError,
    CheckpointRecord,
    DeltaModel,
    PeftFolder,
    backbone_module_names,
    file_patterns,
    is_linear,
    peft_folder,
    refuse_task_heads,
    write_peft_folder,
)
from opendelta_fourierft.config import FourierFTConfig
from opendelta_fourierft.model import FourierFTModel

__all__ = ["fourierft_config_from_peft", "read_peft_fourierft", "save_peft_fourierft"]

PEFT_TYPE = "FOURIERFT"
_SUFFIX = ".fourierft_spectrum"
_UNDERSTOOD = frozenset(
    {
        "target_modules",
        "exclude_modules",
        "fan_in_fan_out",
        "n_frequency",
        "scaling",
        "random_loc_seed",
        "n_frequency_pattern",
        "bias",
        "init_weights",
    }
)
"""What the reader reads, and ``init_weights``, which concerns initialisation only (``fan_in_fan_out`` only says
how ``Conv1D`` stores W)."""


def _check_seed(adapter: PeftFolder) -> None:
    seed = adapter.config.get("random_loc_seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise CheckpointError(
            f"{adapter.source}: random_loc_seed={seed!r:.100} is no integer; the coefficients' locations are drawn "
            f"from it"
        )


def _file_regex(name: str, expression: str, text: str, source: str) -> file_patterns.BoundedRegex:
    try:
        return file_patterns.compile_file_regex(expression, text, file_patterns.MatchBudget(name, source))
    except AddressingError as exc:
        raise CheckpointError(str(exc)) from exc


def _n_frequencies(config: Mapping[str, Any], names: list[str], source: str) -> dict[str, int]:
    r"""Each target's ``n_frequency`` by PEFT's ``n_frequency_pattern`` rule, its keys matched under a time budget.

    PEFT takes the first key ``k`` for which ``re.match(rf".*\.{k}$", name)`` holds, else the name itself.
    """
    default = config.get("n_frequency", 1000)
    pattern = config.get("n_frequency_pattern") or {}
    values = [default, *pattern.values()] if isinstance(pattern, dict) else []
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise CheckpointError(
            f"{source}: n_frequency and n_frequency_pattern must hold whole numbers, got "
            f"{default!r:.100} and {pattern!r:.200}"
        )
    file_patterns.check_limits("n_frequency_pattern", list(pattern), source)
    keys = [(k, _file_regex("n_frequency_pattern", rf"(?:.*\.{k}$).*", k, source)) for k in pattern]
    chosen = {}
    for name in names:
        key = next((k for k, regex in keys if regex.fullmatch(name) is not None), name)
        chosen[name] = pattern.get(key, default)
    return chosen


def fourierft_config_from_peft(adapter: PeftFolder, model: nn.Module) -> FourierFTConfig:
    """The :class:`FourierFTConfig` that puts on ``model`` what the PEFT FourierFT adapter puts there.

    The targets become real names; the per-layer ``n_frequency`` (from ``n_frequency_pattern``) becomes the exact
    names of the layers whose value differs from ``n_frequency``.

    Raises:
        CheckpointError: an unsupported option (named), targets that match nothing or are not linear layers.
    """
    adapter.refuse_unknown(_UNDERSTOOD, "FourierFTModel")
    adapter.refuse_trained_bias("FourierFTModel")
    adapter.require_targets("FourierFTModel")
    _check_seed(adapter)
    config, source = adapter.config, adapter.source
    names = adapter.targeted_modules(model)
    modules = dict(model.named_modules())
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in names if not is_linear(modules[n])]
    if wrong:
        raise CheckpointError(
            f"{source} puts FourierFT on {', '.join(wrong[:3])}: FourierFTModel modifies linear layers only"
        )
    default = config.get("n_frequency", 1000)
    chosen = _n_frequencies(config, names, source)
    ours = FourierFTConfig(
        modified_modules=names,
        common_structure=False,
        n_frequency=default,
        scaling=config.get("scaling", 150.0),
        random_loc_seed=config["random_loc_seed"],
        n_frequency_pattern={n: v for n, v in chosen.items() if v != default},
    )
    if any(ours.n_frequency_of(n) != v for n, v in chosen.items()):  # a name read as a key matched another name
        raise CheckpointError(f"{source}: n_frequency_pattern cannot be expressed per module name on this model")
    return ours


def _our_tensors(tensors: Mapping[str, torch.Tensor], config: FourierFTConfig, source: str) -> dict[str, torch.Tensor]:
    """``base_model.model.<module>.fourierft_spectrum`` -> ``<module>.fourierft.fourierft_spectrum``."""
    ours = {}
    for name, tensor in tensors.items():
        if not (name.startswith(PEFT_PREFIX) and name.endswith(_SUFFIX)):
            raise CheckpointError(
                f"{source}: {name!r:.200} is not a FourierFT spectrum ('{PEFT_PREFIX}<module>{_SUFFIX}')"
            )
        module = name[len(PEFT_PREFIX) : -len(_SUFFIX)]
        wanted = config.n_frequency_of(module)
        if tuple(tensor.shape) != (wanted,):
            raise CheckpointError(f"{source}: {name} has shape {list(tensor.shape)}, not [{wanted}] (n_frequency)")
        ours[f"{module}.{FourierFTModel.delta_name}.fourierft_spectrum"] = tensor
    return ours


def read_peft_fourierft(
    folder: Path, backbone_model: nn.Module, delta_cls: type[DeltaModel]
) -> CheckpointRecord | None:
    """Read a PEFT FourierFT adapter folder into a record for core's apply step; ``None`` for any other folder.

    Only ``adapter_model.safetensors`` is read, not an old ``adapter_model.bin`` pickle (PEFT saves safetensors).

    Raises:
        CheckpointError: a PEFT FourierFT folder that cannot be loaded faithfully, or ``delta_cls`` is another method.
    """
    adapter = peft_folder(folder, PEFT_TYPE)
    if adapter is None:
        return None  # not PEFT's, or another PEFT method: another plugin may read it
    adapter.refuse_other_class(delta_cls, FourierFTModel)
    ours = fourierft_config_from_peft(adapter, backbone_model)
    weights = adapter.weights_file(pickled=False)
    return CheckpointRecord(
        adapter.source,
        str(weights),
        FourierFTModel,
        ours,
        _our_tensors(adapter.tensors(backbone_model, pickled=False), ours, adapter.source),
        describe=f"a PEFT FourierFT adapter whose own config builds FourierFT on this {type(backbone_model).__name__}",
    )


# ------------------------------------------------------------------------------------------------------ export
def _short_names(targets: list[str], model: nn.Module) -> list[str]:
    """The modules' last name components when, by PEFT's rule, they designate exactly ``targets``; else the names."""
    leaves = sorted({t.rpartition(".")[2] for t in targets})
    chosen = [n for n in backbone_module_names(model) if any(n == leaf or n.endswith(f".{leaf}") for leaf in leaves)]
    return leaves if sorted(chosen) == sorted(targets) else targets


def save_peft_fourierft(
    delta_model: FourierFTModel, path: str | os.PathLike[str], *, task_type: str | None = None
) -> Path:
    """Export ``delta_model`` as a PEFT FourierFT adapter folder (``PeftModel.from_pretrained`` loads it).

    Args:
        delta_model: the FourierFT delta model to export.
        path: the folder to write ``adapter_config.json`` and ``adapter_model.safetensors`` into (created if needed).
        task_type: PEFT's ``task_type`` to record (``"SEQ_CLS"``, ``"CAUSAL_LM"``...); ``None`` loads as a plain
            ``PeftModel``.

    Returns:
        The folder.

    Raises:
        TypeError: ``delta_model`` is not a FourierFTModel.
        CheckpointError: a delta covers some rows of a fused layer only (GPT-2's ``c_attn`` with the default
            ``attn.q``/``attn.v``): its spectrum spans those rows, and PEFT's spans the whole layer, so no PEFT file
            computes the same update.
    """
    if not isinstance(delta_model, FourierFTModel):
        raise TypeError(f"save_peft_fourierft exports a FourierFTModel, got {type(delta_model).__name__}")
    backbone = delta_model.backbone_model
    tensors: dict[str, torch.Tensor] = {}
    targets = []
    for target, insertion in delta_model.placements():
        layer = insertion.delta
        if layer.out_index is not None:
            raise CheckpointError(
                f"save_peft cannot export the FourierFT delta on {target.name}: it covers {layer.rows} of the "
                f"fused layer's {layer.out_features} output rows, and PEFT's spectrum spans the whole layer; "
                f"target the whole layer (modified_modules=[{target.name!r}]) to export it, or use save_finetuned()"
            )
        tensors[f"{PEFT_PREFIX}{target.name}{_SUFFIX}"] = layer.fourierft_spectrum
        targets.append(target.name)
    modules = dict(backbone.named_modules())
    config = delta_model.config
    document = {
        "peft_type": PEFT_TYPE,
        "task_type": task_type,
        "base_model_name_or_path": getattr(getattr(backbone, "config", None), "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "n_frequency": config.n_frequency,
        "scaling": config.scaling,
        "random_loc_seed": config.random_loc_seed,
        "fan_in_fan_out": all(not isinstance(modules[t], nn.Linear) for t in targets),  # GPT-2's Conv1D: [in, out]
        "target_modules": _short_names(targets, backbone),
        "exclude_modules": None,
        "bias": "none",
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "n_frequency_pattern": dict(config.n_frequency_pattern),  # PEFT's own rule, on the same module names
        "init_weights": config.init_weights,
    }
    refuse_task_heads(delta_model, "FourierFT")
    return write_peft_folder(path, document, tensors)
