"""PEFT's IA3 adapter folders: read into an :class:`IA3Model` by ``from_finetuned``, and written by ``save_peft``.

``PeftModel.save_pretrained`` writes ``adapter_config.json`` (``peft_type: "IA3"``, ``target_modules``,
``feedforward_modules``...) and ``adapter_model.safetensors`` holding ``base_model.model.<module>.ia3_l`` for each
modified module: ``[out, 1]`` for an output-scaled one, ``[1, in]`` for a feed-forward (input-scaled) one. The
modules are chosen by PEFT's rules (a list: a name or a ``.``-suffix; a string: a regex fully matching the name;
feed-forward: a list entry the name ends with), and the vectors become ours, flattened. Options that would make
PEFT compute something ``IA3Model`` does not (``modules_to_save``, ``all-linear``...) are refused by name.

The export writes the same folder with the modules' full names; a vector on some slices of a fused layer (GPT-2's
``c_attn`` with the default ``attn.k``/``attn.v``) becomes one over the whole layer, ones on the other slices.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
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
    file_patterns,
    is_linear,
    peft_folder,
    refuse_task_heads,
    write_peft_folder,
)
from opendelta_ia3.config import IA3Config
from opendelta_ia3.model import IA3Model

__all__ = ["read_peft_ia3", "save_peft_ia3"]

_SUFFIX = "ia3_l"
_UNDERSTOOD = frozenset(
    {"target_modules", "feedforward_modules", "exclude_modules", "fan_in_fan_out", "init_ia3_weights"}
)
"""What the reader reads, and what only concerns initialisation (``fan_in_fan_out`` only says how ``Conv1D`` stores
W; ``init_ia3_weights`` how the vectors started)."""
_PATTERNS = ("target_modules", "feedforward_modules", "exclude_modules")


def _check_fields(adapter: PeftFolder) -> None:
    adapter.refuse_unknown(_UNDERSTOOD, "IA3Model")
    targets = adapter.config.get("target_modules")
    if not targets:
        raise CheckpointError(f"{adapter.source} has no target_modules: PEFT records the modules it modified there")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        raise CheckpointError(
            f"{adapter.source}: target_modules='all-linear' is not supported by IA3Model's PEFT reader"
        )


def _feedforward(adapter: PeftFolder) -> Callable[[str], bool]:
    """PEFT's feed-forward test: a regex string fully matches the name; a list entry is a plain suffix of it."""
    value = adapter.config.get("feedforward_modules")
    ok = value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    if not ok:
        raise CheckpointError(f"{adapter.source}: feedforward_modules must be a list of names or a regex string")
    file_patterns.check_limits("feedforward_modules", value, adapter.source)
    if not value:
        return lambda key: False
    if isinstance(value, str):
        budget = file_patterns.MatchBudget("feedforward_modules", adapter.source)
        try:
            regex = file_patterns.compile_file_regex(value, value, budget)
        except AddressingError as exc:
            raise CheckpointError(str(exc)) from exc
        return lambda key: regex.fullmatch(key) is not None
    return lambda key: any(key.endswith(t) for t in value)


def ia3_config_from_peft(adapter: PeftFolder, model: nn.Module) -> IA3Config:
    """The :class:`IA3Config` that puts on ``model`` what the PEFT IA3 adapter puts there (by full names).

    Raises:
        CheckpointError: an unsupported option (named), targets that match nothing or are not linear layers.
    """
    _check_fields(adapter)
    source = adapter.source
    names = adapter.targeted_modules(model)
    feedforward = _feedforward(adapter)
    modules = dict(model.named_modules())
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in names if not is_linear(modules[n])]
    if wrong:
        raise CheckpointError(f"{source} puts IA3 on {', '.join(wrong[:3])}: IA3Model modifies linear layers only")
    return IA3Config(
        modified_modules=names,
        feedforward_modules=[n for n in names if feedforward(n)],
        common_structure=False,
    )


def _our_tensors(
    found: Mapping[str, Mapping[str, torch.Tensor]], config: IA3Config, source: str
) -> dict[str, torch.Tensor]:
    """``<module>: ia3_l`` ``[out, 1]`` / ``[1, in]`` -> ``<module>.ia3.ia3_l``, flat."""
    feedforward = set(config.feedforward_modules or ())
    ours = {}
    for module, tensors in found.items():
        tensor = tensors[_SUFFIX]
        wanted = 0 if module in feedforward else 1  # the dimension of size one
        if tensor.dim() != 2 or tensor.shape[wanted] != 1:
            layout = "[1, in] (feed-forward)" if wanted == 0 else "[out, 1]"
            raise CheckpointError(f"{source}: {module}.{_SUFFIX} has shape {list(tensor.shape)}, not PEFT's {layout}")
        ours[f"{module}.{IA3Model.delta_name}.ia3_l"] = tensor.reshape(-1)
    return ours


def read_peft_ia3(folder: Path, backbone_model: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """Read a PEFT IA3 adapter folder into a record for core's apply step; ``None`` for any other folder.

    Raises:
        CheckpointError: a PEFT IA3 folder that cannot be loaded faithfully, or ``delta_cls`` is another method.
    """
    adapter = peft_folder(folder, "IA3")
    if adapter is None:
        return None  # not PEFT's, or another PEFT method: another plugin may read it
    adapter.refuse_other_class(delta_cls, IA3Model)
    ia3_config = ia3_config_from_peft(adapter, backbone_model)
    weights = adapter.weights_file()
    return CheckpointRecord(
        adapter.source,
        str(weights),
        IA3Model,
        ia3_config,
        _our_tensors(adapter.module_tensors(backbone_model, [_SUFFIX]), ia3_config, adapter.source),
        describe=f"a PEFT IA3 adapter whose own config builds IA3 on this {type(backbone_model).__name__}",
    )


def save_peft_ia3(delta_model: IA3Model, path: str | os.PathLike[str], *, task_type: str | None = None) -> Path:
    """Export ``delta_model`` as a PEFT IA3 adapter folder (``PeftModel.from_pretrained`` reads it).

    Args:
        delta_model: the IA3 delta model.
        path: the folder to write ``adapter_config.json`` and ``adapter_model.safetensors`` into (created if needed).
        task_type: PEFT's ``task_type`` to record (``"SEQ_CLS"``, ``"CAUSAL_LM"``...); ``None``: a plain ``PeftModel``.

    Raises:
        TypeError: ``delta_model`` is not an IA3Model.
        CheckpointError: the delta model is merged (its vectors are in the weights: unmerge first), or targets a
            layer PEFT's IA3 does not (a quantization backend's).
    """
    if not isinstance(delta_model, IA3Model):
        raise TypeError(f"save_peft_ia3 exports an IA3Model, got {type(delta_model).__name__}")
    if delta_model.merged:
        raise CheckpointError("save_peft: this IA3Model is merged into the backbone; unmerge() it first")
    tensors: dict[str, torch.Tensor] = {}
    targets, feedforward, conv1d = [], [], []
    for target, insertion in delta_model.placements():
        layer = insertion.delta
        vector = layer.scaling().detach()  # over the whole width: ones on a fused layer's other slices
        shape = (1, -1) if layer.feedforward else (-1, 1)
        tensors[f"{PEFT_PREFIX}{target.name}.{_SUFFIX}"] = vector.reshape(shape)
        targets.append(target.name)
        if layer.feedforward:
            feedforward.append(target.name)
        conv1d.append(not isinstance(target.module, nn.Linear))
    document: dict[str, Any] = {
        "peft_type": "IA3",
        "task_type": task_type,
        "base_model_name_or_path": getattr(getattr(delta_model.backbone_model, "config", None), "_name_or_path", None)
        or None,
        "revision": None,
        "inference_mode": True,
        "target_modules": targets,
        "exclude_modules": None,
        "feedforward_modules": feedforward,
        "fan_in_fan_out": bool(conv1d) and all(conv1d),  # GPT-2's Conv1D stores [in, out]
        "modules_to_save": None,
        "init_ia3_weights": True,
    }
    refuse_task_heads(delta_model, "IA3")
    return write_peft_folder(path, document, tensors)
