"""PEFT's BOFT adapter folders: read into a :class:`BOFTModel` by ``from_finetuned``, and written by ``save_peft``.

The weights are ``base_model.model.<module>.boft_R`` ``[factors, blocks, H, H]`` and ``.boft_s`` ``[out, 1]``, as
ours. PEFT without its CUDA extension (``fbd_cuda``) silently builds one factor whatever ``boft_n_butterfly_factor``
says, and saves one: the number of factors is read from the tensors, which is what PEFT computes with the folder.
The block size is read from the tensors too (PEFT derives it from ``boft_block_num`` when that is set); layers of
different block sizes are refused by name, since ``BOFTModel`` has one ``boft_block_size``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opendelta.plugin_api import CheckpointError, CheckpointRecord, DeltaModel, linear_features
from opendelta_oft import peft_common
from opendelta_oft.boft_model import BOFTModel
from opendelta_oft.butterfly import butterfly_blocks
from opendelta_oft.config import BOFTConfig

__all__ = ["boft_config_from_peft", "read_peft_boft", "save_peft_boft"]

_READ = frozenset({"boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout"})
_ROTATION, _SCALE = ".boft_R", ".boft_s"


def _factors(found: Mapping[str, Mapping[str, torch.Tensor]], config: Mapping[str, Any], source: str) -> int:
    counts = {n: t[_ROTATION].shape[0] for n, t in found.items() if t[_ROTATION].dim() == 4}
    if len(counts) != len(found) or len(set(counts.values())) != 1:
        raise CheckpointError(f"{source}: the boft_R tensors are not [factors, blocks, H, H] with one factor count")
    count = next(iter(counts.values()))
    written = int(config.get("boft_n_butterfly_factor", 1) or 1)
    if count not in (1, written):  # 1: PEFT without fbd_cuda, which saves one factor whatever the config says
        raise CheckpointError(f"{source}: boft_R holds {count} factors, boft_n_butterfly_factor says {written}")
    return count


def boft_config_from_peft(
    config: Mapping[str, Any], model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str
) -> tuple[BOFTConfig, dict[str, torch.Tensor]]:
    """The :class:`BOFTConfig` that puts on ``model`` what the PEFT BOFT ``config`` puts there, and our tensors.

    Raises:
        CheckpointError: an unsupported option (named), targets that match nothing, tensors that do not fit.
    """
    peft_common.check_fields(config, source, _READ, "BOFTModel")
    names = peft_common.peft_targets(config, model, source, "BOFTModel")
    found = peft_common.by_module(tensors, names, (_ROTATION, _SCALE), source)
    factors = _factors(found, config, source)
    modules = dict(model.named_modules())
    sizes = {}
    for name in names:
        in_features, out_features = linear_features(modules[name])
        rotation, scale = found[name][_ROTATION], found[name][_SCALE]
        size = rotation.shape[-1]
        try:
            block_num = butterfly_blocks(in_features, size, factors, name)
        except ValueError as exc:
            raise CheckpointError(f"{source}: {exc}") from exc
        shapes = [list(rotation.shape), list(scale.shape)]
        if shapes != [[factors, block_num, size, size], [out_features, 1]]:
            raise CheckpointError(f"{source}: {name} has BOFT tensors of shapes {shapes}, which do not fit the layer")
        sizes[name] = size
    if len(set(sizes.values())) > 1:  # boft_block_num set, on layers of different widths
        shown = ", ".join(f"{n}: {s}" for n, s in list(sizes.items())[:4])
        raise CheckpointError(
            f"{source}: the layers have different block sizes ({shown}, from boft_block_num); BOFTModel uses one "
            f"boft_block_size for all layers, so this adapter is not loaded"
        )
    written = int(config.get("boft_block_size", 0) or 0)
    if written and written != next(iter(sizes.values())):
        raise CheckpointError(f"{source}: boft_block_size={written}, but the boft_R tensors hold other blocks")
    ours = BOFTConfig(
        modified_modules=names,
        common_structure=False,
        boft_block_size=next(iter(sizes.values())),
        boft_n_butterfly_factor=factors,
        boft_dropout=float(config.get("boft_dropout", 0.0) or 0.0),
    )
    delta = BOFTModel.delta_name
    tensors_out = {}
    for name in names:
        tensors_out[f"{name}.{delta}.boft_R"] = found[name][_ROTATION]
        tensors_out[f"{name}.{delta}.boft_s"] = found[name][_SCALE]
    return ours, tensors_out


def read_peft_boft(folder: Path, backbone_model: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """A PEFT BOFT adapter folder for core's apply step; ``None`` for any other (see ``peft_common.read_folder``)."""
    return peft_common.read_folder(folder, backbone_model, delta_cls, "BOFT", BOFTModel, boft_config_from_peft)


def save_peft_boft(delta_model: BOFTModel, path: str | os.PathLike[str]) -> Path:
    """Export ``delta_model`` as a PEFT BOFT adapter folder (``PeftModel.from_pretrained`` loads it).

    PEFT 0.21.2 puts BOFT on ``nn.Linear`` layers only (not GPT-2's ``Conv1D``), and loads more than one butterfly
    factor only with its CUDA extension.

    Raises:
        TypeError: ``delta_model`` is not a BOFTModel.
    """
    if not isinstance(delta_model, BOFTModel):
        raise TypeError(f"save_peft_boft exports a BOFTModel, got {type(delta_model).__name__}")
    config = delta_model.config
    fields = {
        "boft_block_size": config.boft_block_size,
        "boft_block_num": 0,
        "boft_n_butterfly_factor": config.boft_n_butterfly_factor,
        "boft_dropout": config.boft_dropout,
    }

    def tensors_of(delta: nn.Module) -> dict[str, torch.Tensor]:
        return {_ROTATION: delta.boft_R, _SCALE: delta.boft_s}

    return peft_common.export_folder(delta_model, path, "BOFT", tensors_of, fields)
