"""Whether a checkpoint may be applied to this backbone: its hash, the backbone tensors it writes, loaded twice.

A checkpoint records what it was trained on (:func:`backbone_record`, written by every save): the backbone's hash
(``backbone_hash``), the same hash rounded to float16 and bfloat16 (``backbone_hashes``, see
``opendelta.hashing``), and the backbone parameters its weights file overwrites (``backbone_tensors``: the
trainable ones saved with the delta, a task head). A load then refuses, before the backbone changes:

* a config whose ``backbone_hash`` is missing or null, unless the caller passes ``check_hash=False``
  (:class:`~opendelta.errors.BackboneUnverifiedError`): the file cannot switch the check off by leaving it out;
* a backbone that hashes to none of the recorded values (:class:`~opendelta.errors.BackboneMismatchError`); the
  same weights in float16 or bfloat16 match the rounded hashes, so they load (the delta is cast on copy);
* a weights file holding a backbone parameter its config does not list in ``backbone_tensors`` (a
  ``bert.embeddings.word_embeddings.weight`` in a LoRA file), or a listed one it lacks (``CheckpointError``);
* the same checkpoint (same weights digest) loaded again onto a backbone that still carries the delta model
  loaded from it (``DeltaStateError``): the second delta would stack on the first and double its effect.

The declaration guards against a weights file that overwrites more than its config says; a writer who edits both
files can declare anything (the config is where to look: ``opendelta inspect`` also lists the backbone tensors a
weights file holds). Tensors the caller passes with ``from_finetuned(..., state_dict=...)`` are the caller's and
are not checked against the declaration, nor marked as loaded; OpenDelta 0.3.x checkpoints (``opendelta.legacy``)
have neither a usable hash nor a declaration and are checked by names and shapes only.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from opendelta.errors import BackboneMismatchError, BackboneUnverifiedError, CheckpointError, DeltaStateError
from opendelta.hashing import REDUCED_PRECISIONS, backbone_hash, reduced_precision_hashes
from opendelta.markers import delta_parameter_names

if TYPE_CHECKING:
    from opendelta.base import DeltaModel

__all__ = [
    "backbone_matches",
    "backbone_record",
    "check_backbone",
    "check_declared_tensors",
    "check_not_loaded",
    "forget_loaded",
    "mark_loaded",
]

_LOADED: weakref.WeakKeyDictionary[nn.Module, dict[str, weakref.ref[DeltaModel]]] = weakref.WeakKeyDictionary()
"""Per backbone, the checkpoints loaded onto it (by weights digest) and the delta model each became."""


def backbone_record(
    backbone: nn.Module, tensors: Mapping[str, torch.Tensor], samples: Mapping[str, bytes | None] | None = None
) -> dict[str, Any]:
    """What a checkpoint of ``tensors`` records about ``backbone``, for :func:`check_backbone` to check on load.

    Args:
        backbone: the backbone the delta is attached to.
        tensors: the tensors the weights file will hold; those named like backbone parameters are declared.
        samples: the hash's samples of parameters read elsewhere (before merging, from full FSDP tensors).
    """
    params = {n for n, _ in backbone.named_parameters()} - delta_parameter_names(backbone)
    return {
        "backbone_hash": backbone_hash(backbone, samples=samples),
        "backbone_hashes": reduced_precision_hashes(backbone, samples=samples),
        "backbone_tensors": sorted(n for n in tensors if n in params),
    }


def _recorded_hashes(raw: Mapping[str, Any], source: str) -> dict[str, str]:
    """The rounded hashes a config records, checked to be a mapping of known precision names to strings."""
    recorded = raw.get("backbone_hashes")
    if recorded is None:
        return {}
    if not isinstance(recorded, dict) or not all(
        k in REDUCED_PRECISIONS and isinstance(v, str) for k, v in recorded.items()
    ):
        raise CheckpointError(
            f"{source}: backbone_hashes must be a mapping of {sorted(REDUCED_PRECISIONS)} to hash strings, got "
            f"{recorded!r}; the config is damaged"
        )
    return recorded


def backbone_matches(
    raw: Mapping[str, Any], backbone: nn.Module, overrides: Mapping[str, torch.Tensor], source: str
) -> bool:
    """Whether ``backbone`` (with ``overrides`` loaded) hashes to the recorded hash, exactly or rounded."""
    if backbone_hash(backbone, overrides=overrides) == raw.get("backbone_hash"):
        return True
    recorded = _recorded_hashes(raw, source)
    return any(backbone_hash(backbone, overrides, None, REDUCED_PRECISIONS[k]) == v for k, v in recorded.items())


def check_backbone(
    raw: Mapping[str, Any], backbone: nn.Module, overrides: Mapping[str, torch.Tensor], *, check_hash: bool, source: str
) -> None:
    """Refuse a checkpoint that cannot be shown to belong to ``backbone`` (see the module docstring).

    Raises:
        BackboneUnverifiedError: the config records no hash and ``check_hash`` is true.
        BackboneMismatchError: the backbone hashes to none of the recorded hashes and ``check_hash`` is true.
    """
    _recorded_hashes(raw, source)  # a damaged field is refused even when the hash is not checked
    if not check_hash:
        return
    expected = raw.get("backbone_hash")
    if not expected:
        raise BackboneUnverifiedError(
            f"{source}/config.json records no backbone_hash, so the backbone this delta was trained on cannot be "
            f"verified; pass check_hash=False to load it anyway if you know it fits this "
            f"{type(backbone).__name__} (re-saving it with save_finetuned records the hash)"
        )
    if not backbone_matches(raw, backbone, overrides, source):
        raise BackboneMismatchError(
            f"the delta in {source} was trained on another backbone: it records backbone_class="
            f"{raw.get('backbone_class')!r}, checkpoint {raw.get('backbone_checkpoint_name')!r}, hash {expected}; "
            f"this {type(backbone).__name__} hashes to {backbone_hash(backbone, overrides=overrides)}. Load the "
            f"backbone it was trained on (in any of float32, float16, bfloat16; a randomly initialised task head "
            f"changes it too: train and save the head, exclude=[..., 'classifier']), or pass check_hash=False to "
            f"load anyway."
        )


def check_declared_tensors(raw: Mapping[str, Any], backbone_part: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a weights file that overwrites backbone parameters its config does not declare, or lacks declared ones.

    Raises:
        CheckpointError: naming the undeclared (or missing) tensors.
    """
    declared = raw.get("backbone_tensors", [])
    if not isinstance(declared, list) or not all(isinstance(n, str) for n in declared):
        raise CheckpointError(
            f"{source}: backbone_tensors must be a list of parameter names, got {declared!r}; the config is damaged"
        )
    undeclared = sorted(set(backbone_part) - set(declared))
    missing = sorted(set(declared) - set(backbone_part))
    if undeclared:
        problem = (
            f"the weights file overwrites backbone parameter(s) {undeclared[:5]} that its config does not declare in "
            f"backbone_tensors {sorted(declared)[:5]}; a delta file may hold only its method's delta parameters and "
            f"the trainable backbone parameters saved with it. The file was altered or crafted"
        )
    elif missing:
        problem = (
            f"its config declares backbone_tensors {missing[:5]} that the weights file does not hold (or this "
            f"backbone has no such parameter); the checkpoint is incomplete or for another architecture"
        )
    else:
        return
    raise CheckpointError(f"{source}: {problem}. Nothing was loaded; re-save the delta with save_finetuned")


def _key(raw: Mapping[str, Any], source: str) -> str:
    digest = raw.get("weights_sha256")
    return f"sha256:{digest}" if isinstance(digest, str) and digest else f"folder:{source}"


def check_not_loaded(
    raw: Mapping[str, Any], backbone: nn.Module, source: str, *, into: DeltaModel | None = None
) -> None:
    """Refuse to load a checkpoint onto a backbone that still carries the delta model loaded from it.

    ``into``: the delta model the checkpoint is loaded into in place (``load_weights``); holding it already is fine,
    as its values are replaced, not stacked.

    Raises:
        DeltaStateError: the same weights (by digest) were loaded onto this backbone and are still attached.
    """
    earlier = _LOADED.get(backbone, {}).get(_key(raw, source))
    delta_model = earlier() if earlier is not None else None
    if delta_model is not None and delta_model is not into and delta_model.attached:
        raise DeltaStateError(
            f"{source} is already loaded onto this {type(backbone).__name__} (as {type(delta_model).__name__}, "
            f"still attached); loading it again would stack a second copy of the delta and double its effect. "
            f"Use the delta model you have, call its detach() first, or load onto a fresh backbone"
        )


def mark_loaded(raw: Mapping[str, Any], backbone: nn.Module, source: str, delta_model: DeltaModel) -> None:
    """Remember that ``delta_model`` was loaded onto ``backbone`` from this checkpoint, for :func:`check_not_loaded`."""
    _LOADED.setdefault(backbone, {})[_key(raw, source)] = weakref.ref(delta_model)


def forget_loaded(backbone: nn.Module, delta_model: DeltaModel) -> None:
    """Forget the checkpoints recorded as loaded into ``delta_model``: it now holds another one's values."""
    loaded = _LOADED.get(backbone, {})
    for key in [k for k, ref in loaded.items() if ref() is delta_model]:
        del loaded[key]
