"""Writing and reading delta checkpoints: ``config.json`` plus the delta weights as safetensors, nothing else.

Atomicity: the weights go to a content-named file (``delta_model-<sha256 prefix>.safetensors``) written under a
temporary name and renamed into place, then ``config.json``, which names that file, replaces the old config in one
``os.replace``. The config is the commit point: a save killed at any moment leaves either the previous checkpoint
(its config still names its own, untouched weights) or the new one; weight files no config names are removed
after the commit.

Checkpoints can also live on the Hugging Face Hub: a path that is not a local folder is resolved as a repo id
through ``huggingface_hub`` (honouring ``cache_dir``, ``local_files_only``, ``force_download``, ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from opendelta.config import CONFIG_NAME
from opendelta.errors import CheckpointError

__all__ = ["WEIGHTS_PREFIX", "load_weights", "read_config_dict", "resolve_checkpoint", "write_checkpoint"]

WEIGHTS_PREFIX = "delta_model"
WEIGHTS_SUFFIX = ".safetensors"


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_checkpoint(
    directory: str | os.PathLike[str], config: dict[str, Any], tensors: Mapping[str, torch.Tensor]
) -> Path:
    """Atomically write ``config`` and ``tensors`` as a checkpoint in ``directory``.

    Returns:
        The path of the weights file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=WEIGHTS_SUFFIX, dir=directory)
    os.close(fd)
    fd, tmp_config_name = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    os.close(fd)
    tmp_weights, tmp_config = Path(tmp_name), Path(tmp_config_name)
    try:
        save_file(contiguous, str(tmp_weights), metadata={"format": "pt", "delta_type": str(config.get("delta_type"))})
        digest = hashlib.sha256(tmp_weights.read_bytes()).hexdigest()
        weights = directory / f"{WEIGHTS_PREFIX}-{digest[:16]}{WEIGHTS_SUFFIX}"
        os.replace(tmp_weights, weights)
        full = {**config, "weights_file": weights.name, "weights_sha256": digest}
        _fsync_write(tmp_config, (json.dumps(full, indent=2) + "\n").encode())
        os.replace(tmp_config, directory / CONFIG_NAME)
    finally:
        tmp_weights.unlink(missing_ok=True)
        tmp_config.unlink(missing_ok=True)
    _remove_unreferenced(directory)
    return weights


def _remove_unreferenced(directory: Path) -> None:
    try:
        current = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8")).get("weights_file")
    except (OSError, ValueError):
        return
    for stale in directory.glob(f"{WEIGHTS_PREFIX}-*{WEIGHTS_SUFFIX}"):
        if stale.name != current:
            stale.unlink(missing_ok=True)


def resolve_checkpoint(path_or_repo: str | os.PathLike[str], **hub_kwargs: Any) -> Path:
    """A local folder holding the checkpoint: ``path_or_repo`` itself, or its Hub snapshot.

    Raises:
        CheckpointError: neither a local checkpoint nor a reachable Hub repo.
    """
    local = Path(path_or_repo)
    if local.is_file():
        return local.parent
    if local.is_dir():
        if not (local / CONFIG_NAME).is_file():
            raise CheckpointError(f"{local} is a folder but holds no {CONFIG_NAME}: not a delta checkpoint")
        return local
    repo_id = str(path_or_repo)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise CheckpointError(f"no delta checkpoint at {repo_id!r}: no such folder, and not a Hub repo id (user/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo_id, allow_patterns=["*.json", "*.safetensors", "*.md", "pytorch_model.bin"], **hub_kwargs
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise CheckpointError(
            f"no local folder {repo_id!r}, and the Hub repo could not be fetched ({type(exc).__name__}: {exc})"
        ) from exc


def read_config_dict(path_or_repo: str | os.PathLike[str], **hub_kwargs: Any) -> dict[str, Any]:
    """The raw ``config.json`` of a checkpoint (folder, file or Hub repo id)."""
    local = Path(path_or_repo)
    config_file = local if local.is_file() else resolve_checkpoint(path_or_repo, **hub_kwargs) / CONFIG_NAME
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read delta config {config_file}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object, got {type(data).__name__}")
    return data


def load_weights(folder: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint in ``folder``, checked against the digest its config records."""
    name = config.get("weights_file") or f"{WEIGHTS_PREFIX}{WEIGHTS_SUFFIX}"
    if Path(name).name != name:
        raise CheckpointError(f"weights_file {name!r} in {folder / CONFIG_NAME} must be a plain file name")
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{folder / CONFIG_NAME} names weights file {name!r}, which is missing")
    expected = config.get("weights_sha256")
    if expected and hashlib.sha256(path.read_bytes()).hexdigest() != expected:
        raise CheckpointError(f"{path} does not match the sha256 recorded in its config: the file is damaged")
    return load_file(str(path))
