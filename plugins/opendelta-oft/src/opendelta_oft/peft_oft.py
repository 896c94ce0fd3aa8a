"""PEFT's OFT adapter folders: read into an :class:`OFTModel` by ``from_finetuned``, and written by ``save_peft``.

The weights are ``base_model.model.<module>.oft_R.weight``, ``[blocks, H (H - 1) / 2]`` (``[1, ...]`` with
``block_share``): the strict upper triangles of the skew-symmetric blocks, as our ``oft_R``. The reader reads each
layer's block size from its tensor (PEFT derives it from ``r`` when that is set, and silently adjusts one that does
not divide a layer's width) and loads when all layers agree on one ``oft_block_size``, refusing by name otherwise.
Adapters from before PEFT 0.14 (another parameterisation) and Cayley-Neumann ones from before 0.18 (another series)
are refused, as PEFT refuses or warns.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opendelta.plugin_api import CheckpointError, CheckpointRecord, DeltaModel, linear_features
from opendelta_oft import peft_common
from opendelta_oft.config import OFTConfig
from opendelta_oft.model import OFTModel

__all__ = ["oft_config_from_peft", "read_peft_oft", "save_peft_oft"]

_READ = frozenset(
    {
        "r",
        "oft_block_size",
        "module_dropout",
        "coft",
        "eps",
        "block_share",
        "use_cayley_neumann",
        "num_cayley_neumann_terms",
    }
)
_SUFFIX = ".oft_R.weight"


def _block_size(name: str, tensor: torch.Tensor, source: str) -> int:
    """``H`` from a ``[blocks, H (H - 1) / 2]`` tensor."""
    if tensor.dim() != 2:
        raise CheckpointError(f"{source}: {name}{_SUFFIX} has shape {list(tensor.shape)}, not [blocks, H(H-1)/2]")
    size = (1 + math.isqrt(1 + 8 * tensor.shape[1])) // 2
    if size * (size - 1) // 2 != tensor.shape[1] or size < 2:
        raise CheckpointError(f"{source}: {name}{_SUFFIX} has {tensor.shape[1]} entries per block, not H(H-1)/2")
    return size


def _check_version(config: Mapping[str, Any], source: str) -> None:
    if "oft_block_size" not in config:
        raise CheckpointError(
            f"{source} is an OFT adapter from before PEFT 0.14 (no oft_block_size), which OFTModel "
            f"cannot read (PEFT 0.21.2 refuses it too)"
        )
    if not config.get("use_cayley_neumann", False):
        return
    found = re.match(r"(\d+)\.(\d+)", str(config.get("peft_version") or ""))
    old = found is None or (int(found[1]), int(found[2])) < (0, 18)  # no peft_version: written before 0.18
    if old:
        raise CheckpointError(
            f"{source}: use_cayley_neumann=True with peft_version={config.get('peft_version')!r}: PEFT changed the "
            f"Cayley-Neumann series in 0.18.0, so this adapter would compute something else; retrain it"
        )


def oft_config_from_peft(
    config: Mapping[str, Any], model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str
) -> tuple[OFTConfig, dict[str, torch.Tensor]]:
    """The :class:`OFTConfig` that puts on ``model`` what the PEFT OFT ``config`` puts there, and our tensors.

    Raises:
        CheckpointError: an unsupported option (named), targets that match nothing, tensors that do not fit.
    """
    peft_common.check_fields(config, source, _READ, "OFTModel")
    _check_version(config, source)
    if any(".oft_r." in key for key in tensors):
        raise CheckpointError(f"{source} is an old OFT checkpoint (oft_r tensors, PEFT <= 0.15), not readable")
    names = peft_common.peft_targets(config, model, source, "OFTModel")
    found = peft_common.by_module(tensors, names, (_SUFFIX,), source)
    modules = dict(model.named_modules())
    sizes = {}
    share = bool(config.get("block_share", False))
    for name in names:
        tensor = found[name][_SUFFIX]
        size, width = _block_size(name, tensor, source), linear_features(modules[name])[0]
        if width % size or tensor.shape[0] != (1 if share else width // size):
            raise CheckpointError(
                f"{source}: {name}{_SUFFIX} of shape {list(tensor.shape)} does not fit its "
                f"in_features ({width}) with block_share={share}"
            )
        sizes[name] = size
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{n}: {s}" for n, s in list(sizes.items())[:4])
        raise CheckpointError(
            f"{source}: PEFT adjusted the block size per layer ({shown}); OFTModel uses one oft_block_size for all "
            f"layers, so this adapter is not loaded (load its layers of one block size with PEFT)"
        )
    ours = OFTConfig(
        modified_modules=names,
        common_structure=False,
        oft_block_size=next(iter(sizes.values())),
        module_dropout=float(config.get("module_dropout", 0.0) or 0.0),
        coft=bool(config.get("coft", False)),
        eps=float(config.get("eps", 6e-5)),
        block_share=share,
        use_cayley_neumann=bool(config.get("use_cayley_neumann", True)),
        num_cayley_neumann_terms=int(config.get("num_cayley_neumann_terms", 5)),
    )
    return ours, {f"{n}.{OFTModel.delta_name}.oft_R": found[n][_SUFFIX] for n in names}


def read_peft_oft(folder: Path, backbone_model: nn.Module, delta_cls: type[DeltaModel]) -> CheckpointRecord | None:
    """A PEFT OFT adapter folder for core's apply step; ``None`` for any other (see ``peft_common.read_folder``)."""
    return peft_common.read_folder(folder, backbone_model, delta_cls, "OFT", OFTModel, oft_config_from_peft)


def save_peft_oft(delta_model: OFTModel, path: str | os.PathLike[str]) -> Path:
    """Export ``delta_model`` as a PEFT OFT adapter folder (``PeftModel.from_pretrained`` loads it).

    PEFT 0.21.2 puts OFT on ``nn.Linear`` layers only: a folder of OFT on GPT-2's ``Conv1D`` is written the same
    way, but PEFT itself refuses to load it onto those layers.

    Raises:
        TypeError: ``delta_model`` is not an OFTModel.
    """
    if not isinstance(delta_model, OFTModel):
        raise TypeError(f"save_peft_oft exports an OFTModel, got {type(delta_model).__name__}")
    config = delta_model.config
    fields = {
        "r": 0,
        "oft_block_size": config.oft_block_size,
        "module_dropout": config.module_dropout,
        "coft": config.coft,
        "eps": config.eps,
        "block_share": config.block_share,
        "use_cayley_neumann": config.use_cayley_neumann,
        "num_cayley_neumann_terms": config.num_cayley_neumann_terms,
    }
    return peft_common.export_folder(delta_model, path, "OFT", lambda delta: {_SUFFIX: delta.oft_R}, fields)
