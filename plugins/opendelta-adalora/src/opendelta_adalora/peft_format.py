"""PEFT's AdaLoRA adapter folders: read into an :class:`AdaLoraModel` (``read_checkpoint`` hook), and written back.

``PeftModel.save_pretrained`` writes ``adapter_config.json`` (``peft_type: "ADALORA"``, ``target_modules``,
``init_r``, ``target_r``, the schedule, ``rank_pattern``...) and ``adapter_model.safetensors`` holding
``base_model.model.<module>.lora_A`` ``[r, in]``, ``.lora_E`` ``[r, 1]`` and ``.lora_B`` ``[out, r]`` for each
modified module (``ranknum`` is not saved: it is ``init_r``). Once ranks were allocated, ``rank_pattern`` maps
``<module>.lora_E`` to one flag per initial triplet and the tensors hold only the kept triplets; the layers are
built that size here, as PEFT resizes them. Options that would make PEFT compute something ``AdaLoraModel`` does
not (``modules_to_save``, ``layers_to_transform``, a bias, ``lora_alpha <= 0``...) are refused by name.
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
    CheckpointError,
    CheckpointRecord,
    DeltaConfigError,
    DeltaModel,
    PeftFolder,
    is_linear,
    peft_folder,
    refuse_task_heads,
    write_peft_folder,
)
from opendelta_adalora.config import AdaLoraConfig
from opendelta_adalora.model import AdaLoraModel

__all__ = ["read_peft_adalora", "save_peft_adalora"]

PEFT_TYPE = "ADALORA"
_PARTS = ("lora_A", "lora_E", "lora_B")
_SCHEDULE = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")
_UNDERSTOOD = frozenset(
    {"target_modules", "exclude_modules", "fan_in_fan_out", "rank_pattern", "lora_alpha", "lora_dropout", "bias"}
    | set(_SCHEDULE)
    | {
        "init_lora_weights",
        "r",  # PEFT's AdaLoRA ignores LoRA's r (init_r is the rank)
        "alpha_pattern",  # and LoRA's alpha_pattern and use_rslora: its layers read lora_alpha only
        "use_rslora",
        "megatron_core",
        "qalora_group_size",
    }
)
"""What the reader reads (``bias`` only as ``"none"``), and fields PEFT's AdaLoRA does not read, or only at
initialisation (``fan_in_fan_out`` says how Conv1D stores W)."""


def _module_of(key: str) -> str:
    """PEFT's ``rank_pattern`` key (``<module>.lora_E``, ``.default`` after it while training) -> ``<module>``."""
    key = key.removesuffix(".default")
    return key.removesuffix(".lora_E")


def _rank_pattern(value: Any, names: list[str], source: str) -> dict[str, list[bool]] | None:
    if value is None or value == {}:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(v, list) and all(isinstance(f, bool) for f in v) for v in value.values()
    ):
        raise CheckpointError(f"{source}: rank_pattern must map '<module>.lora_E' to lists of booleans")
    pattern = {_module_of(str(k)): list(v) for k, v in value.items()}
    unknown = sorted(set(pattern) - set(names))
    if unknown:
        raise CheckpointError(f"{source}: rank_pattern names {unknown[:3]}, which target_modules does not modify")
    return pattern


def adalora_config_from_peft(adapter: PeftFolder, model: nn.Module) -> AdaLoraConfig:
    """The :class:`AdaLoraConfig` that puts on ``model`` what the PEFT AdaLoRA adapter puts there (full names).

    Raises:
        CheckpointError: an unsupported option (named), targets that match nothing or are not linear layers.
    """
    adapter.refuse_unknown(_UNDERSTOOD, "AdaLoraModel")
    adapter.refuse_trained_bias("AdaLoraModel")
    adapter.require_targets("AdaLoraModel")
    config, source = adapter.config, adapter.source
    names = adapter.targeted_modules(model)
    modules = dict(model.named_modules())
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in names if not is_linear(modules[n])]
    if wrong:
        raise CheckpointError(f"{source} puts AdaLoRA on {', '.join(wrong[:3])}: AdaLoraModel modifies linear layers")
    fields = {k: config[k] for k in (*_SCHEDULE, "lora_alpha", "lora_dropout") if k in config}
    try:
        return AdaLoraConfig(
            **fields,
            rank_pattern=_rank_pattern(config.get("rank_pattern"), names, source),
            modified_modules=names,
            common_structure=False,
        )
    except DeltaConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc


def _our_tensors(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``base_model.model.<module>.lora_A`` -> ``<module>.adalora.lora_A`` (and ``lora_E``, ``lora_B``)."""
    ours = {}
    for name, tensor in tensors.items():
        part = name.rpartition(".")[2]
        if not name.startswith(PEFT_PREFIX) or part not in _PARTS:
            raise CheckpointError(
                f"{source}: {name!r:.200} is not an AdaLoRA tensor ('{PEFT_PREFIX}<module>.lora_A/E/B')"
            )
        ours[f"{name[len(PEFT_PREFIX) : -len(part) - 1]}.{AdaLoraModel.delta_name}.{part}"] = tensor
    return ours


def read_peft_adalora(folder: Path, backbone_model: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """Read a PEFT AdaLoRA adapter folder into a record for core's apply step; ``None`` for any other folder.

    Only ``adapter_model.safetensors`` is read, not an old ``adapter_model.bin`` pickle (PEFT saves safetensors).

    Raises:
        CheckpointError: a PEFT AdaLoRA folder that cannot be loaded faithfully, or ``delta_cls`` is another method.
    """
    adapter = peft_folder(folder, PEFT_TYPE)
    if adapter is None:
        return None  # not PEFT's, or another PEFT method: another plugin may read it
    adapter.refuse_other_class(delta_cls, AdaLoraModel)
    adalora_config = adalora_config_from_peft(adapter, backbone_model)
    weights = adapter.weights_file(pickled=False)
    return CheckpointRecord(
        adapter.source,
        str(weights),
        AdaLoraModel,
        adalora_config,
        _our_tensors(adapter.tensors(backbone_model, pickled=False), adapter.source),
        describe=f"a PEFT AdaLoRA adapter whose own config builds AdaLoRA on this {type(backbone_model).__name__}",
    )


def save_peft_adalora(
    delta_model: AdaLoraModel,
    path: str | os.PathLike[str],
    *,
    total_step: int | None = None,
    task_type: str | None = None,
) -> Path:
    """Export ``delta_model`` as a PEFT AdaLoRA adapter folder (``PeftModel.from_pretrained`` loads it).

    Each layer's tensors hold the triplets ``config.rank_pattern`` keeps, which is written as PEFT records it
    (``<module>.lora_E``: one flag per initial triplet). An update of some slices of a fused layer (GPT-2's
    ``c_attn`` with the default ``attn.q``/``attn.v``) becomes one of the whole layer whose ``B`` rows for the other
    slices are zero: the same outputs.

    Args:
        delta_model: the AdaLoRA delta model to export.
        path: the folder to write ``adapter_config.json`` and ``adapter_model.safetensors`` into (created if needed).
        total_step: the ``total_step`` to record when the config has none (PEFT requires one).
        task_type: PEFT's ``task_type`` to record (``"SEQ_CLS"``, ``"CAUSAL_LM"``...).

    Raises:
        TypeError: ``delta_model`` is not an AdaLoraModel.
        DeltaConfigError: no ``total_step`` (PEFT refuses an AdaLoRA config without one).
    """
    if not isinstance(delta_model, AdaLoraModel):
        raise TypeError(f"save_peft_adalora exports an AdaLoraModel, got {type(delta_model).__name__}")
    config = delta_model.config
    steps = config.total_step if total_step is None else total_step
    if steps is None:
        raise DeltaConfigError(
            "save_peft needs AdaLoraConfig.total_step (PEFT refuses an AdaLoRA config without one): set it, or pass "
            "save_peft(path, total_step=N)"
        )
    backbone = delta_model.backbone_model
    state = delta_model.delta_state_dict()  # already limited to the kept triplets
    tensors: dict[str, torch.Tensor] = {}
    pattern: dict[str, list[bool]] = {}
    names = []
    for target, insertion in delta_model.placements():
        layer = insertion.delta
        prefix = f"{target.host_name}.{insertion.base_name}" if target.host_name else insertion.base_name
        parts = {part: state[f"{prefix}.{part}"] for part in _PARTS}
        if layer.out_index is not None:  # some slices of a fused layer: zero rows for the others
            up = parts["lora_B"]
            parts["lora_B"] = up.new_zeros(layer.out_features, up.shape[1]).index_copy(0, layer.out_index, up)
        for part, tensor in parts.items():
            tensors[f"{PEFT_PREFIX}{target.name}.{part}"] = tensor
        if config.rank_pattern and target.name in config.rank_pattern:
            pattern[f"{target.name}.lora_E"] = list(config.rank_pattern[target.name])
        elif not all(layer.pattern):
            pattern[f"{target.name}.lora_E"] = list(layer.pattern)
        names.append(target.name)
    modules = dict(backbone.named_modules())
    document = {
        "peft_type": PEFT_TYPE,
        "task_type": task_type,
        "base_model_name_or_path": getattr(getattr(backbone, "config", None), "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "r": 8,  # PEFT's LoRA default, which its AdaLoRA ignores (any other value makes it warn)
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": names,
        "exclude_modules": None,
        "fan_in_fan_out": all(not isinstance(modules[t], nn.Linear) for t in names),  # GPT-2's Conv1D: [in, out]
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        **{field: getattr(config, field) for field in _SCHEDULE if field != "total_step"},
        "total_step": steps,
        "rank_pattern": pattern or None,
    }
    refuse_task_heads(delta_model, "AdaLoRA")
    return write_peft_folder(path, document, tensors)
