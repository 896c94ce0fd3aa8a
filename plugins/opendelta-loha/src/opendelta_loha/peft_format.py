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
from opendelta_loha.config import LoHaConfig
from opendelta_loha.model import LoHaModel

__all__ = ["read_peft_loha", "save_peft_loha"]

PEFT_TYPE = "LOHA"
_PARAMETERS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_UNDERSTOOD = frozenset(
    {
        "r",
        "alpha",
        "rank_dropout",
        "module_dropout",
        "target_modules",
        "exclude_modules",
        "rank_pattern",
        "alpha_pattern",
        "init_weights",
        "use_effective_conv2d",
    }
)
"""What the reader reads, and ``use_effective_conv2d``, which PEFT ignores on the linear layers LoHaModel modifies."""


def _check_patterns(adapter: PeftFolder) -> None:
    """``rank_pattern``/``alpha_pattern`` are mappings whose keys are matched later: bounded like the targets."""
    for field in ("rank_pattern", "alpha_pattern"):
        value = adapter.config.get(field) or {}
        if not isinstance(value, dict):
            raise CheckpointError(
                f"{adapter.source}: {field} must be a mapping of patterns to numbers, got {value!r:.200}"
            )
        file_patterns.check_limits(field, list(value), adapter.source)


def loha_config_from_peft(adapter: PeftFolder, model: nn.Module) -> LoHaConfig:
    """The :class:`LoHaConfig` that puts on ``model`` what the PEFT LoHa adapter puts there (by full names).

    Raises:
        CheckpointError: an unsupported option (named), a value of the wrong type or range, targets that match
            nothing or are not linear layers.
    """
    adapter.refuse_unknown(_UNDERSTOOD, "LoHaModel")
    _check_patterns(adapter)
    adapter.require_targets("LoHaModel")
    source = adapter.source
    names = adapter.targeted_modules(model)
    modules = dict(model.named_modules())
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in names if not is_linear(modules[n])]
    if wrong:
        raise CheckpointError(f"{source} puts LoHa on {', '.join(wrong[:3])}: LoHaModel modifies linear layers only")
    fields = ("r", "alpha", "rank_dropout", "module_dropout", "rank_pattern", "alpha_pattern", "init_weights")
    config = adapter.config
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
        module, _, parameter = name.removeprefix(PEFT_PREFIX).rpartition(".")
        if not name.startswith(PEFT_PREFIX) or parameter not in _PARAMETERS:
            raise CheckpointError(
                f"{source}: {name!r:.200} is not a LoHa factor of a linear layer ('{PEFT_PREFIX}<module>.hada_w1_a' "
                f"and the like; convolution factors hada_t1/hada_t2 are not supported)"
            )
        ours[f"{module}.{LoHaModel.delta_name}.{parameter}"] = tensor
    return ours


def read_peft_loha(folder: Path, backbone_model: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """Read a PEFT LoHa adapter folder into a record for core's apply step; ``None`` for any other folder.

    Only ``adapter_model.safetensors`` is read, not an old ``adapter_model.bin`` pickle (PEFT saves safetensors).

    Raises:
        CheckpointError: a PEFT LoHa folder that cannot be loaded faithfully, or ``delta_cls`` is another method.
    """
    adapter = peft_folder(folder, PEFT_TYPE)
    if adapter is None:
        return None  # not PEFT's, or another PEFT method: another plugin may read it
    adapter.refuse_other_class(delta_cls, LoHaModel)
    loha_config = loha_config_from_peft(adapter, backbone_model)
    weights = adapter.weights_file(pickled=False)
    return CheckpointRecord(
        adapter.source,
        str(weights),
        LoHaModel,
        loha_config,
        _our_tensors(adapter.tensors(backbone_model, pickled=False), adapter.source),
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
    for target, insertion in delta_model.placements():
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
    refuse_task_heads(delta_model, "LoHa")
    return write_peft_folder(path, document, tensors)
