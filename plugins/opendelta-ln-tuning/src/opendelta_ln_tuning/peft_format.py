"""PEFT's LN tuning adapter folders: read into :class:`LNTuningModel` by ``from_finetuned``, written by ``save_peft``.

PEFT trains a copy of each targeted module and ``save_pretrained`` writes that copy's parameters whole:
``base_model.model.<norm>.ln_tuning_layers.weight`` (and ``.bias``), beside ``adapter_config.json`` (``peft_type:
"LN_TUNING"``, ``target_modules``, ``exclude_modules``). ``LNTuningModel`` keeps offsets from the backbone's own
parameters, so reading is ``offset = saved - p`` on the backbone the adapter was trained from (loaded onto another
backbone it computes ``saved`` all the same: the norm then reads ``p + saved - p``), and the export writes ``p +
offset``. PEFT can target any module with LN tuning (a whole attention block is trained then); ``LNTuningModel``
reads norms only, and refuses other targets by name. A norm without parameters (OLMo's) has nothing PEFT saves: it
is left alone on reading, and an ``LNTuningModel`` that tunes one (an affine map after it) is not exported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opendelta.plugin_api import (
    PEFT_PREFIX,
    CheckpointError,
    CheckpointRecord,
    DeltaModel,
    peft_folder,
    refuse_task_heads,
    write_peft_folder,
)
from opendelta_ln_tuning.config import LNTuningConfig
from opendelta_ln_tuning.model import NORM_PARAMETERS, LNTuningModel, is_layer_norm, norm_parameters

__all__ = ["read_peft_ln_tuning", "save_peft_ln_tuning"]

_COPY = "ln_tuning_layers"
"""What PEFT calls the trained copy of a module, in its tensor names."""
_SUFFIXES = tuple(f"{_COPY}.{p}" for p in NORM_PARAMETERS)


def read_peft_ln_tuning(
    folder: Path, backbone_model: nn.Module, delta_cls: type[DeltaModel]
) -> CheckpointRecord | None:
    """Read a PEFT LN tuning folder into a record for core's apply step; ``None`` for any other folder.

    Raises:
        CheckpointError: an unsupported option or a target that is no layer norm (named), missing or extra tensors,
            tensors of another shape, or ``delta_cls`` is another method.
    """
    adapter = peft_folder(folder, "LN_TUNING")
    if adapter is None:
        return None
    adapter.refuse_other_class(delta_cls, LNTuningModel)
    adapter.refuse_unknown({"target_modules", "exclude_modules"}, "LNTuningModel")
    modules = dict(backbone_model.named_modules())
    names = adapter.targeted_modules(backbone_model)
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in names if not is_layer_norm(modules[n])]
    if wrong:
        raise CheckpointError(
            f"{adapter.source} trains {', '.join(wrong[:3])}{'...' if len(wrong) > 3 else ''} with LN tuning: "
            f"LNTuningModel tunes layer norms only. Use PEFT for this adapter."
        )
    names = [n for n in names if norm_parameters(modules[n])]  # a norm without parameters: PEFT saved nothing
    found = adapter.module_tensors(backbone_model, _SUFFIXES)
    extra = sorted(set(found) - set(names))
    if extra:
        raise CheckpointError(f"{adapter.source} holds tensors for {extra[:3]}, which its target_modules do not name")
    config = LNTuningConfig(modified_modules=names, common_structure=False)
    return CheckpointRecord(
        adapter.source,
        str(adapter.weights_file()),
        LNTuningModel,
        config,
        _offsets(found, names, modules, adapter.source),
        describe=f"a PEFT LN tuning adapter whose own config builds LN tuning on this {type(backbone_model).__name__}",
    )


def _offsets(
    found: dict[str, dict[str, torch.Tensor]], names: list[str], modules: dict[str, nn.Module], source: str
) -> dict[str, torch.Tensor]:
    """``saved - p`` for every parameter of every targeted norm, under ``LNTuningModel``'s names."""
    offsets = {}
    for name in names:
        saved = found.get(name, {})
        for parameter in norm_parameters(modules[name]):
            key = f"{_COPY}.{parameter}"
            if key not in saved:
                raise CheckpointError(f"{source} has no {PEFT_PREFIX}{name}.{key}: the adapter is incomplete")
            own = modules[name]._parameters[parameter]
            if saved[key].shape != own.shape:
                raise CheckpointError(
                    f"{source}: {name}.{key} has shape {list(saved[key].shape)}, the backbone's {list(own.shape)}: "
                    f"the adapter was trained on another model"
                )
            offset = saved[key].to(torch.float32) - own.detach().to(device="cpu", dtype=torch.float32)
            offsets[f"{name}.{LNTuningModel.delta_name}_{parameter}.offset"] = offset.to(own.dtype)
    return offsets


def save_peft_ln_tuning(
    delta_model: LNTuningModel, path: str | os.PathLike[str], *, task_type: str | None = None
) -> Path:
    """Export ``delta_model`` as a PEFT LN tuning folder (``PeftModel.from_pretrained`` reads it): ``p + offset``.

    Args:
        delta_model: the LN tuning delta model.
        path: the folder to write ``adapter_config.json`` and ``adapter_model.safetensors`` into (created if needed).
        task_type: PEFT's ``task_type`` to record; ``None``: a plain ``PeftModel``.

    Raises:
        TypeError: ``delta_model`` is not an LNTuningModel.
        CheckpointError: it is merged (unmerge first), or tunes a norm without parameters (PEFT has none to train).
    """
    if not isinstance(delta_model, LNTuningModel):
        raise TypeError(f"save_peft_ln_tuning exports an LNTuningModel, got {type(delta_model).__name__}")
    if delta_model.merged:
        raise CheckpointError("save_peft: this LNTuningModel is merged into the backbone; unmerge() it first")
    tensors: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    for target, insertion in delta_model.placements():
        if target.parameter is None:
            raise CheckpointError(
                f"save_peft: {target.name} is a layer norm without parameters, tuned here by an affine map after it; "
                f"PEFT's LN tuning has nothing to train there, so the adapter cannot be written in its format"
            )
        own = target.module._parameters[target.parameter].detach()
        tensors[f"{PEFT_PREFIX}{target.name}.{_COPY}.{target.parameter}"] = insertion.delta.updated(own)
        if target.name not in targets:
            targets.append(target.name)
    document: dict[str, Any] = {
        "peft_type": "LN_TUNING",
        "task_type": task_type,
        "base_model_name_or_path": getattr(getattr(delta_model.backbone_model, "config", None), "_name_or_path", None)
        or None,
        "revision": None,
        "inference_mode": True,
        "target_modules": targets,
        "exclude_modules": None,
        "modules_to_save": None,
    }
    refuse_task_heads(delta_model, "LN tuning")
    return write_peft_folder(path, document, tensors)
