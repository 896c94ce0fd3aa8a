"""PEFT's LoKr adapter folders: read into a :class:`LoKrModel` by ``from_finetuned``, and written by ``save_peft``.

``PeftModel.save_pretrained`` writes ``adapter_config.json`` (``peft_type: "LOKR"``, ``r``, ``alpha``,
``target_modules``, ``decompose_factor``...) and ``adapter_model.safetensors`` holding, for each modified linear
layer, ``base_model.model.<module>.lokr_w1`` (or ``lokr_w1_a``, ``lokr_w1_b``) and ``lokr_w2`` (or ``lokr_w2_a``,
``lokr_w2_b``): our parameters, under our names ``<module>.lokr.lokr_w1``..., of the shapes the same rules give. The
modules are chosen by PEFT's rules (a list: a name or a ``.``-suffix; a string: a regex fully matching the name).
Options that would make PEFT compute something ``LoKrModel`` does not (``modules_to_save``,
``layers_to_transform``, convolution targets...) are refused by name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from opendelta.plugin_api import (
    PEFT_PREFIX,
    CheckpointError,
    CheckpointRecord,
    DeltaConfigError,
    DeltaModel,
    PeftFolder,
    file_patterns,
    is_linear,
    peft_folder,
    refuse_task_heads,
    write_peft_folder,
)
from opendelta_lokr.config import LoKrConfig
from opendelta_lokr.model import LoKrModel

__all__ = ["read_peft_lokr", "save_peft_lokr"]

PEFT_TYPE = "LOKR"
_PARAMETERS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
_UNDERSTOOD = frozenset(
    {
        "r",
        "alpha",
        "rank_dropout",
        "module_dropout",
        "decompose_both",
        "decompose_factor",
        "rank_dropout_scale",
        "target_modules",
        "exclude_modules",
        "rank_pattern",
        "alpha_pattern",
        "init_weights",
        "use_effective_conv2d",
    }
)
"""What the reader reads, and ``use_effective_conv2d``, which PEFT ignores on the linear layers LoKrModel modifies."""


def _check_patterns(adapter: PeftFolder) -> None:
    """``rank_pattern``/``alpha_pattern`` are mappings whose keys are matched later: bounded like the targets."""
    for field in ("rank_pattern", "alpha_pattern"):
        value = adapter.config.get(field) or {}
        if not isinstance(value, dict):
            raise CheckpointError(
                f"{adapter.source}: {field} must be a mapping of patterns to numbers, got {value!r:.200}"
            )
        file_patterns.check_limits(field, list(value), adapter.source)


def lokr_config_from_peft(adapter: PeftFolder, model: nn.Module) -> LoKrConfig:
    """The :class:`LoKrConfig` that puts on ``model`` what the PEFT LoKr adapter puts there (by full names).

    Raises:
        CheckpointError: an unsupported option (named), a value of the wrong type or range, targets that match
            nothing or are not linear layers.
    """
    adapter.refuse_unknown(_UNDERSTOOD, "LoKrModel")
    _check_patterns(adapter)
    adapter.require_targets("LoKrModel")
    source = adapter.source
    names = adapter.targeted_modules(model)
    modules = dict(model.named_modules())
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in names if not is_linear(modules[n])]
    if wrong:
        raise CheckpointError(f"{source} puts LoKr on {', '.join(wrong[:3])}: LoKrModel modifies linear layers only")
    fields = (
        "r",
        "alpha",
        "rank_dropout",
        "rank_dropout_scale",
        "module_dropout",
        "decompose_both",
        "decompose_factor",
        "rank_pattern",
        "alpha_pattern",
        "init_weights",
    )
    config = adapter.config
    try:
        return LoKrConfig(
            modified_modules=names,
            common_structure=False,
            **{f: config[f] for f in fields if config.get(f) is not None},
        )
    except DeltaConfigError as exc:
        raise CheckpointError(f"{source}: {exc}; the file is damaged or was not written by PEFT") from exc


def _our_tensors(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``base_model.model.<module>.lokr_w1`` ... -> ``<module>.lokr.lokr_w1`` ...; anything else is refused."""
    ours = {}
    for name, tensor in tensors.items():
        module, _, parameter = name.removeprefix(PEFT_PREFIX).rpartition(".")
        if not name.startswith(PEFT_PREFIX) or parameter not in _PARAMETERS:
            raise CheckpointError(
                f"{source}: {name!r:.200} is not a LoKr factor of a linear layer ('{PEFT_PREFIX}<module>.lokr_w1' "
                f"and the like; the convolution factor lokr_t2 is not supported)"
            )
        ours[f"{module}.{LoKrModel.delta_name}.{parameter}"] = tensor
    return ours


def read_peft_lokr(folder: Path, backbone_model: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """Read a PEFT LoKr adapter folder into a record for core's apply step; ``None`` for any other folder.

    Only ``adapter_model.safetensors`` is read, not an old ``adapter_model.bin`` pickle (PEFT saves safetensors).

    Raises:
        CheckpointError: a PEFT LoKr folder that cannot be loaded faithfully, or ``delta_cls`` is another method.
    """
    adapter = peft_folder(folder, PEFT_TYPE)
    if adapter is None:
        return None  # not PEFT's, or another PEFT method: another plugin may read it
    adapter.refuse_other_class(delta_cls, LoKrModel)
    lokr_config = lokr_config_from_peft(adapter, backbone_model)
    weights = adapter.weights_file(pickled=False)
    return CheckpointRecord(
        adapter.source,
        str(weights),
        LoKrModel,
        lokr_config,
        _our_tensors(adapter.tensors(backbone_model, pickled=False), adapter.source),
        describe=f"a PEFT LoKr adapter whose own config builds LoKr on this {type(backbone_model).__name__}",
    )


def save_peft_lokr(delta_model: LoKrModel, path: str | os.PathLike[str]) -> Path:
    """Export ``delta_model`` as a PEFT LoKr adapter folder that ``PeftModel.from_pretrained`` loads.

    An update of some slices of a fused layer (Phi-3's ``qkv_proj`` with the default ``attn.q``/``attn.v``) is a
    Kronecker product over those rows only, which no LoKr of the whole layer equals in general: it is refused.

    The folder records no ``task_type`` (PEFT would then expect a saved task head) and no ``modules_to_save``:
    ``PeftModel.from_pretrained(model, folder)`` loads it as a plain ``PeftModel``.

    Args:
        delta_model: the LoKr delta model to export.
        path: the folder to write ``adapter_config.json`` and ``adapter_model.safetensors`` into (created if needed).

    Raises:
        TypeError: ``delta_model`` is not a LoKrModel.
        CheckpointError: a target is no ``nn.Linear`` (GPT-2's ``Conv1D``, a quantized layer), on which PEFT 0.21.2
            cannot build LoKr, so it could not load the folder; or it is some slices of a fused layer.
    """
    if not isinstance(delta_model, LoKrModel):
        raise TypeError(f"save_peft_lokr exports a LoKrModel, got {type(delta_model).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    for target, insertion in delta_model.placements():
        if type(target.module) is not nn.Linear:
            raise CheckpointError(
                f"save_peft cannot export LoKr on {target.name} ({type(target.module).__name__}): PEFT 0.21.2 builds "
                f"LoKr on nn.Linear (and convolutions) only, so it could not load this adapter; save it with "
                f"save_finetuned()"
            )
        if insertion.delta.out_index is not None:
            raise CheckpointError(
                f"save_peft cannot export LoKr on some parts of the fused {target.name}: the Kronecker product spans "
                f"those rows only, and PEFT's LoKr spans the whole layer; address whole layers, or save_finetuned()"
            )
        for parameter, value in insertion.delta.named_parameters():
            tensors[f"{PEFT_PREFIX}{target.name}.{parameter}"] = value
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
        "rank_dropout_scale": config.rank_dropout_scale,
        "decompose_both": config.decompose_both,
        "decompose_factor": config.decompose_factor,
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
    refuse_task_heads(delta_model, "LoKr")
    return write_peft_folder(path, document, tensors)
