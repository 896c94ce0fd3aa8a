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

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from opendelta.plugin_api import (
    PEFT_PREFIX,
    CheckpointError,
    CheckpointRecord,
    DeltaModel,
    PeftFolder,
    is_linear,
    peft_folder,
    refuse_task_heads,
    write_peft_folder,
)
from opendelta_vera.config import PRNGKey, VeraConfig
from opendelta_vera.model import VeraModel

__all__ = ["read_peft_vera", "save_peft_vera"]

PEFT_TYPE = "VERA"
_PROJECTIONS = {"base_model.vera_A": "vera_A", "base_model.vera_B": "vera_B"}
_VECTORS = ("vera_lambda_b", "vera_lambda_d")
_UNDERSTOOD = frozenset(
    {"target_modules", "exclude_modules", "r", "projection_prng_key", "save_projection"}
    | {"vera_dropout", "d_initial", "bias", "init_weights", "fan_in_fan_out"}
)
"""What the reader reads (``bias`` only as ``"none"``), and fields that concern initialisation
(``fan_in_fan_out`` only says how ``Conv1D`` stores W)."""


def vera_config_from_peft(adapter: PeftFolder, model: nn.Module) -> VeraConfig:
    """The :class:`VeraConfig` that puts on ``model`` what the PEFT VeRA adapter puts there (by full names).

    Raises:
        CheckpointError: an unsupported option (named), targets that match nothing or are not linear layers, or a
            value ``VeraConfig`` refuses.
    """
    adapter.refuse_unknown(_UNDERSTOOD, "VeraModel")
    adapter.refuse_trained_bias("VeraModel")
    adapter.require_targets("VeraModel")
    config, source = adapter.config, adapter.source
    names = adapter.targeted_modules(model)
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
        module, _, vector = name.removeprefix(PEFT_PREFIX).rpartition(".")
        if not name.startswith(PEFT_PREFIX) or vector not in _VECTORS:
            raise CheckpointError(
                f"{source}: {name!r:.200} is not a VeRA tensor ('{PEFT_PREFIX}<module>.vera_lambda_b' or '_d', or "
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

    Only ``adapter_model.safetensors`` is read, not an old ``adapter_model.bin`` pickle (PEFT saves safetensors).

    Raises:
        CheckpointError: a PEFT VeRA folder that cannot be loaded faithfully, or ``delta_cls`` is another method.
    """
    adapter = peft_folder(folder, PEFT_TYPE)
    if adapter is None:
        return None  # not PEFT's, or another PEFT method: another plugin may read it
    adapter.refuse_other_class(delta_cls, VeraModel)
    vera_config = vera_config_from_peft(adapter, backbone_model)
    weights = adapter.weights_file(pickled=False)
    return CheckpointRecord(
        adapter.source,
        str(weights),
        VeraModel,
        vera_config,
        _our_tensors(adapter.tensors(backbone_model, pickled=False), vera_config, adapter.source),
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
    for target, insertion in delta_model.placements():
        layer = insertion.delta
        lambda_b = layer.vera_lambda_b.detach()
        if layer.out_index is not None:  # some slices of a fused layer: zero scales for the others
            lambda_b = lambda_b.new_zeros(layer.out_features).index_copy(0, layer.out_index, lambda_b)
        tensors[f"{PEFT_PREFIX}{target.name}.vera_lambda_b"] = lambda_b
        tensors[f"{PEFT_PREFIX}{target.name}.vera_lambda_d"] = layer.vera_lambda_d
        targets.append(target.name)
    config = delta_model.config
    if config.save_projection:
        owner = delta_model.deltas[0].owner
        tensors["base_model.vera_A"], tensors["base_model.vera_B"] = owner.vera_A, owner.vera_B
    modules = dict(backbone.named_modules())
    document = {
        "peft_type": PEFT_TYPE,
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
    refuse_task_heads(delta_model, "VeRA")
    return write_peft_folder(path, document, tensors)
