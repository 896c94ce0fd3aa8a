"""Reading checkpoints saved by the original OpenDelta 0.3.x (``config.json`` + ``pytorch_model.bin``).

What the original's ``save_finetuned`` wrote (``opendelta/utils/saving_loading_utils.py`` and ``delta_configs.py``
of thunlp/OpenDelta 0.3.2):

* ``config.json``: the config's fields that differ from the defaults, plus ``delta_type``, ``backbone_class``,
  ``backbone_checkpoint_name``, ``backbone_hash``, ``opendelta_version`` and ``transformers_version``. Common names
  are written in an internal form with ``@`` after each segment (``attn@.q@``) and always spelled out, even when
  they are the method's defaults; ``exclude_modules`` defaults to ``["lm_head"]``.
* ``pytorch_model.bin``: ``torch.save`` of the backbone's ``state_dict()``. After ``freeze_module()`` that holds the
  trainable tensors only (the deltas, and what was left unfrozen, such as a task head); without it, the whole
  backbone. A delta's tensors are named after the module it modifies plus the delta's child name
  (``bert.encoder.layer.0.attention.self.query.lora.lora_A``), which is mostly what ``delta_state_dict()`` uses.

How they are read here, without running anything the file contains:

* the weights with ``torch.load(..., weights_only=True)``: a pickle that holds anything but tensors (an object
  whose unpickling would run code) is refused before any of it is executed, with :class:`CheckpointError`;
  before that, the file's size (for ``torch.save``'s zip: the sizes its members declare once inflated) is held to
  what a delta for the backbone can hold (:func:`legacy_size_limit`), so a small file cannot take gigabytes;
  sparse, meta, nested and quantized tensors are refused (:mod:`opendelta.tensor_checks`);
* the config is translated to ours (:func:`legacy_config`): ``@`` names become common names, spelled-out defaults
  become ``None``, stale fields are dropped, then the method's :meth:`DeltaModel.translate_legacy_config` hook runs;
* the tensors are translated after the delta model is built (:func:`legacy_state_dict`): backbone buffers saved
  with an unfrozen backbone are dropped when they equal the backbone's, then the method's
  :meth:`DeltaModel.translate_legacy_state_dict` hook renames what the method itself changed.

The original's ``backbone_hash`` is an md5 over ``repr(model)`` and every weight; ``repr`` changes between
transformers versions, so it cannot be checked. A log line says so, and the names and shapes of every tensor are
checked against the backbone instead, as for any checkpoint.
"""

from __future__ import annotations

import logging
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from opendelta.backbone_check import check_not_loaded
from opendelta.checkpoint_record import CheckpointRecord
from opendelta.compat import method_and_config
from opendelta.errors import CheckpointError, UnknownDeltaMethodError
from opendelta.legacy_names import strip_legacy_names
from opendelta.registry import get_method
from opendelta.saving import contained_file
from opendelta.tensor_checks import plain_tensors

if TYPE_CHECKING:
    from torch import nn

    from opendelta.base import DeltaModel
    from opendelta.config import DeltaConfig

__all__ = [
    "LEGACY_WEIGHTS_NAME",
    "is_legacy_checkpoint",
    "legacy_config",
    "legacy_size_limit",
    "legacy_state_dict",
    "read_legacy_checkpoint",
    "read_legacy_weights",
    "read_pickled_tensors",
    "strip_legacy_names",
]

logger = logging.getLogger(__name__)

LEGACY_WEIGHTS_NAME = "pytorch_model.bin"
"""The weights file of an OpenDelta 0.3.x checkpoint (a pickle written by ``torch.save``)."""

_STALE_FIELDS = ("opendelta_version", "transformers_version", "backbone_hash")
"""Fields of the original's config that describe the file, not the delta; the md5 hash cannot be checked here."""


def is_legacy_checkpoint(folder: Path, config: Mapping[str, Any]) -> bool:
    """Whether ``folder`` holds an OpenDelta 0.3.x checkpoint.

    That is a ``pytorch_model.bin`` beside a config naming no safetensors weights file (every checkpoint this library
    writes names its ``weights_file``).
    """
    return "weights_file" not in config and (folder / LEGACY_WEIGHTS_NAME).is_file()


LEGACY_SIZE_SLACK = 8 << 20
"""Bytes allowed beyond :func:`legacy_size_limit`'s multiple of the backbone: pickle records, a delta larger than
a tiny test backbone."""


MAX_INFLATION = 4
"""How many times its size on disk a weights file may take once read, when no backbone bounds it."""


def legacy_size_limit(backbone: nn.Module) -> int:
    """The most bytes a legacy weights file for ``backbone`` may hold once read (a bound, not an estimate).

    Such a file holds the delta plus, when the backbone was saved unfrozen, every backbone parameter and buffer. A
    delta is smaller than its backbone for every method here, so twice the backbone's size bounds both; twice that
    again allows the file to be in float32 where the backbone is float16; :data:`LEGACY_SIZE_SLACK` covers the rest.
    """
    tensors = [*backbone.parameters(), *backbone.buffers()]
    return 4 * sum(t.numel() * t.element_size() for t in tensors) + LEGACY_SIZE_SLACK


def read_legacy_weights(folder: Path, *, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``folder/pytorch_model.bin`` (see :func:`read_pickled_tensors`); a link out is refused."""
    return read_pickled_tensors(contained_file(folder, LEGACY_WEIGHTS_NAME, "weights file"), max_bytes=max_bytes)


def _check_size(path: Path, max_bytes: int | None) -> None:
    """Refuse ``path`` before reading it if it would take more than ``max_bytes``, inflated or not.

    ``torch.save`` writes a zip whose members are the tensors' storages; a member may be compressed, so what it
    takes is the size its header declares (``torch.load`` allocates that), not its size on disk. A plain pickle
    (the format before torch 1.6) is read as it is. Without ``max_bytes`` (no backbone to bound it, as for
    ``opendelta inspect``), a file may take :data:`MAX_INFLATION` times its size on disk: ``torch.save`` stores its
    members uncompressed, so only a zip bomb inflates more.
    """
    try:
        on_disk = path.stat().st_size
        if not zipfile.is_zipfile(path):
            sizes = {"the file": on_disk}
        else:
            with zipfile.ZipFile(path) as archive:
                sizes = {info.filename: info.file_size for info in archive.infolist()}
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise CheckpointError(f"cannot read {path} as a torch.save file ({type(exc).__name__}: {exc})") from exc
    if max_bytes is None:
        max_bytes = MAX_INFLATION * on_disk + LEGACY_SIZE_SLACK
    total = sum(sizes.values())
    if total > max_bytes:
        largest = max(sizes, key=sizes.__getitem__)
        raise CheckpointError(
            f"{path} ({on_disk:,} bytes on disk) would take {total:,} bytes once read (largest: {largest!r}, "
            f"{sizes[largest]:,} bytes), more than the {max_bytes:,} a delta for this backbone can hold; it was "
            f"refused before reading. If the file is right, load its tensors yourself and pass them: "
            f"from_finetuned(path, model, state_dict=...)"
        )


def _refusal(exc: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only refusal that says what it refused (the rest is the same for every file)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    specific = [line for line in lines if "GLOBAL" in line or line.startswith(("Unsupported", "Unknown"))]
    return (specific or lines or [type(exc).__name__])[0][:300]


def read_pickled_tensors(path: Path, *, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """The state dict in a pickle written by ``torch.save``, unpickled with ``weights_only=True``.

    Args:
        path: the file.
        max_bytes: refuse, before reading, a file that would take more (see :func:`legacy_size_limit`); by
            default, one that would take more than :data:`MAX_INFLATION` times its size on disk.

    Raises:
        CheckpointError: the file holds something other than a mapping of names to dense tensors (a code-running
            object included: it is refused before it runs), is not a readable ``torch.save`` file, or is too big.
    """
    _check_size(path, max_bytes)
    try:
        with warnings.catch_warnings():  # a plain pickle (not torch.save's zip) makes torch warn about its protocol
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)  # qint8
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(  # torch cannot tell a forbidden object from bytes that are no pickle: both said
            f"{path} holds Python objects other than tensors, so it was refused without running them (or it is not "
            f"a torch.save file at all: damaged, or garbage; torch.load(weights_only=True) refused: {_refusal(exc)}). "
            f"If you trust the file, load it yourself, keep only its tensors and pass them on: "
            f"from_finetuned(path, model, state_dict={{name: tensor ...}})"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} as a torch.save file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(loaded, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(loaded).__name__}, not a state dict (a mapping of parameter names to tensors)"
        )
    wrong = [f"{k!r}: {type(v).__name__}" for k, v in loaded.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if wrong:
        raise CheckpointError(
            f"{path} must map parameter names to tensors only, but holds {', '.join(wrong[:5])}; if the state dict "
            f"is nested (under 'state_dict' or 'model'), pass it with from_finetuned(..., state_dict=...)"
        )
    return plain_tensors(loaded, str(path))


def _normalised(patterns: Any) -> Any:
    if isinstance(patterns, (list, tuple)):
        return [_normalised(p) for p in patterns]
    return patterns


def legacy_config(
    raw: Mapping[str, Any], cls: type[DeltaModel], overrides: Mapping[str, Any], *, fields: bool = True
) -> dict[str, Any]:
    """Translate an OpenDelta 0.3.x ``config.json`` into this library's config dict for the same method.

    Args:
        raw: the original's config, as read from the file.
        cls: the class ``from_finetuned`` was called on (``DeltaModel`` itself for ``AutoDeltaModel``).
        overrides: the caller's config overrides; a field given there is not translated.
        fields: translate the hyper-parameters too; ``False`` when the caller passes a ``delta_config`` of its own
            (only ``delta_type`` and the stale fields are then dealt with).

    Returns:
        A config dict with ``delta_type`` set to the method's registered name (a name registered as an alias
        resolves to it), ready for ``config_class.from_saved``.
    """
    config = dict(raw)
    delta_type = config.get("delta_type")
    try:
        spec = get_method(delta_type) if isinstance(delta_type, str) else None
    except UnknownDeltaMethodError:
        spec = None
    model_cls = spec.model_cls if spec is not None and cls.delta_type in ("", None) else cls
    if spec is None or not issubclass(model_cls, spec.model_cls):
        return config  # load_delta reports the missing, unknown or mismatched delta_type
    config["delta_type"] = model_cls.delta_type  # a name the method registers as an alias resolves to its own
    md5 = config.get("backbone_hash")
    for key in _STALE_FIELDS:
        config.pop(key, None)
    if md5:
        logger.warning(
            "loading an OpenDelta 0.3.x checkpoint (%s on %s): its backbone_hash %s is an md5 over the model's repr "
            "and weights that cannot be reproduced, so the backbone is checked by parameter names and shapes only",
            delta_type,
            config.get("backbone_class"),
            md5,
        )
    if not config.get("backbone_checkpoint_name"):
        config["backbone_checkpoint_name"] = None
    if not fields:
        return config
    if "modified_modules" not in overrides:
        patterns, common = strip_legacy_names(
            config.get("modified_modules"), config.get("common_structure"), "modified_modules"
        )
        config["modified_modules"], config["common_structure"] = patterns, common or None
    elif "common_structure" not in overrides:
        config["common_structure"] = None  # the original's flag was about its '@' names: the caller's are real names
    known = set(model_cls.config_class.field_names())
    for key in [k for k, v in config.items() if v is None and k not in known]:
        del config[key]  # the original wrote unset options as null (Compacter's bottleneck_dim, sequential)
    config = model_cls.translate_legacy_config(config)
    defaults = _normalised(list(model_cls.default_modified_modules))
    if config.get("common_structure") and _normalised(config.get("modified_modules")) == defaults:
        config["modified_modules"], config["common_structure"] = None, None  # the defaults, spelled out
    return config


def legacy_state_dict(
    delta_model: DeltaModel, tensors: Mapping[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Translate an OpenDelta 0.3.x state dict to the names ``load_delta`` expects, for a built delta model.

    A backbone saved unfrozen brings its buffers: those equal to this backbone's are dropped, and so are names that
    transformers itself ignores in old checkpoints of this model class (``_keys_to_ignore_on_load_unexpected``, such
    as GPT-2's ``attn.bias`` mask). The method's :meth:`~opendelta.DeltaModel.translate_legacy_state_dict` renames
    its own tensors in between. Whatever name is still unknown is refused afterwards by ``load_delta``.

    Raises:
        CheckpointError: a saved buffer differs from the backbone's (the checkpoint was made for another backbone).
    """
    backbone = delta_model.backbone_model
    buffers = dict(backbone.named_buffers())
    kept: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        buffer = buffers.get(name)
        if buffer is None:
            kept[name] = tensor
        elif buffer.shape != tensor.shape or not torch.equal(buffer.cpu(), tensor.to(buffer.dtype)):
            raise CheckpointError(
                f"{source} saves the backbone buffer {name!r} with other values than this backbone's: it was made for "
                f"another backbone (or configuration, such as max_position_embeddings)"
            )
    translated = delta_model.translate_legacy_state_dict(kept)
    known = set(delta_model.delta_state_dict()) | {n for n, _ in backbone.named_parameters()}
    stale = [re.compile(p) for p in getattr(type(backbone), "_keys_to_ignore_on_load_unexpected", None) or ()]
    dropped = [n for n in translated if n not in known and any(p.search(n) for p in stale)]
    if dropped:
        logger.info(
            "%s: ignoring %s, which transformers ignores in old checkpoints of %s",
            source,
            dropped,
            type(backbone).__name__,
        )
    return {n: t for n, t in translated.items() if n not in dropped}


def read_legacy_checkpoint(
    folder: Path,
    raw: Mapping[str, Any],
    cls: type[DeltaModel],
    backbone: nn.Module,
    *,
    delta_config: DeltaConfig | None,
    state_dict: dict[str, torch.Tensor] | None,
    overrides: dict[str, Any],
    into: DeltaModel | None = None,
) -> CheckpointRecord:
    """OpenDelta 0.3.x's format: its config translated, its pickled weights read safely, named once built.

    ``into``: the delta model the tensors go into in place (``load_weights``), which may hold this checkpoint already.

    The tensors' names (and the backbone part among them) are known only once the delta is built, so the record
    carries :func:`legacy_state_dict` for the apply step; the file holds buffers too (GPT-2's boolean mask), which
    that drops. There is no backbone hash in this format.
    """
    translated = legacy_config(raw, cls, overrides, fields=delta_config is None)
    model_cls, config = method_and_config(folder, translated, cls, delta_config, overrides)
    tensors = (
        state_dict if state_dict is not None else read_legacy_weights(folder, max_bytes=legacy_size_limit(backbone))
    )
    source = str(folder if state_dict is not None else folder / LEGACY_WEIGHTS_NAME)
    tensors = plain_tensors(tensors, source)
    if state_dict is None:
        check_not_loaded(translated, backbone, str(folder), into=into)
    return CheckpointRecord(
        str(folder),
        source,
        model_cls,
        config,
        tensors,
        saved=translated,
        translate=lambda delta_model, found: legacy_state_dict(delta_model, found, str(folder)),
        checks={"caller_tensors": state_dict is not None},
    )
