"""Writing and reading delta checkpoints: ``config.json`` plus the delta weights as safetensors, nothing else.

Atomicity: the weights go to a content-named file (``delta_model-<sha256 prefix>.safetensors``) written under a
temporary name and renamed into place, then ``config.json``, which names that file, replaces the old config in one
``os.replace``. The config is the commit point: a save killed at any moment leaves either the previous checkpoint
(its config still names its own, untouched weights) or the new one; our weight files no config names are removed
after the commit.

The user's files: a save replaces or removes only files it can prove it wrote (see :mod:`opendelta.ownership`);
a ``config.json`` that is not a delta config of ours (a transformers model's, a Trainer's) makes it refuse before
writing anything.

Concurrency: writers of one folder take an exclusive lock (``fcntl.flock`` on the folder), so two processes saving
to the same path run one after the other and the folder ends as one of them wrote it, never a mix (without the
lock, one writer's clean-up could delete the weights the other is about to commit). Readers take it shared, so a
load never sees a config whose weights a concurrent save just replaced. A killed process's lock is released by the
kernel; the temporary files of a save that was killed are removed by the next save.

Untrusted input: ``config.json`` is size-capped JSON; it and the weights file it names must be plain file names
inside the folder (a link may only lead into the Hub cache's blob store of the same repo, :func:`link_stays_inside`);
the weights are safetensors, which hold tensors and nothing that runs.

Checkpoints can also live on the Hugging Face Hub: a path that is not a local folder is resolved as a repo id
through ``huggingface_hub`` (honouring ``cache_dir``, ``local_files_only``, ``force_download``, ``HF_HUB_OFFLINE``),
and the cache entry it resolves to is checked not to lead outside the cache (``opendelta.hub_cache``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; saves stay atomic, concurrent saves are not serialised
    fcntl = None  # type: ignore[assignment]

from opendelta.errors import CheckpointError
from opendelta.ownership import (
    MAX_CONFIG_BYTES,
    OWN_TMP_PREFIX,
    file_sha256,
    is_own_temporary,
    is_own_weights_file,
    link_stays_inside,
    own_config,
    refuse_foreign_config,
)

__all__ = [
    "WEIGHTS_PREFIX",
    "checkpoint_lock",
    "contained_file",
    "file_sha256",
    "link_stays_inside",
    "load_weights",
    "read_config_dict",
    "read_safetensors",
    "resolve_checkpoint",
    "weights_name",
    "weights_path",
    "write_atomically",
    "write_checkpoint",
]

CONFIG_NAME = "config.json"
"""A checkpoint's config file: hyper-parameters, backbone record, versions (replaced last by a save)."""
WEIGHTS_PREFIX = "delta_model"
WEIGHTS_SUFFIX = ".safetensors"
TMP_PREFIX = OWN_TMP_PREFIX

_held = threading.local()


@contextlib.contextmanager
def checkpoint_lock(directory: str | os.PathLike[str], *, shared: bool = False) -> Iterator[None]:
    """Hold the folder's lock: exclusive to write (creating the folder), shared to read.

    The lock is ``flock`` on the folder itself, so no lock file appears among the checkpoint's files. Re-entrant
    within a thread, so a save that writes the checkpoint and then its model card holds it once.
    """
    folder = Path(directory)
    if not shared:
        folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    held: set[str] = _held.__dict__.setdefault("paths", set())
    if fcntl is None or key in held:
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not a folder we can open (then the read that follows reports what is wrong)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _remove_leftover_temporaries(directory: Path) -> None:
    """Delete the temporary files of saves that were killed (only called with the exclusive lock held).

    Only files with our own prefix (see :mod:`opendelta.ownership`): a user's ``.tmp-notes.md`` stays.
    """
    for leftover in directory.glob(TMP_PREFIX + "*"):
        if is_own_temporary(leftover):
            leftover.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    """Make the renames in ``directory`` durable (a power cut after the save keeps the new checkpoint)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def current_umask() -> int:
    """The process umask, read without changing it where the OS says it (Linux), else by setting it back at once."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_temporary(directory: str | os.PathLike[str], suffix: str = "") -> Path:
    """A new empty temporary file in ``directory`` (``.opendelta-tmp-*``, removed by the next save if left)."""
    fd, name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=directory)
    os.close(fd)
    return Path(name)


def move_into_place(temporary: Path, path: str | os.PathLike[str]) -> None:
    """Rename a written temporary over ``path``, with the mode an ordinary ``open()`` would have given it.

    ``mkstemp`` makes its files 0600 whatever the umask (and safetensors keeps that); renamed into place they would
    make a checkpoint others cannot read, unlike the 0644 files transformers writes beside it.
    """
    os.chmod(temporary, 0o666 & ~current_umask())
    os.replace(temporary, path)


def write_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step: a killed process leaves the old file or the new, never half.

    The data goes to a temporary file beside it (``.opendelta-tmp-*``, removed by the next checkpoint save if left), is
    flushed to disk, and is renamed over ``path``.
    """
    path = Path(path)
    tmp = new_temporary(path.parent, path.suffix)
    try:
        _fsync_write(tmp, data)
        move_into_place(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_checkpoint(
    directory: str | os.PathLike[str], config: dict[str, Any], tensors: Mapping[str, torch.Tensor]
) -> Path:
    """Atomically write ``config`` and ``tensors`` as a checkpoint in ``directory``.

    Returns:
        The path of the weights file.
    """
    directory = Path(directory)
    contiguous = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with checkpoint_lock(directory):
        refuse_foreign_config(directory, CONFIG_NAME)  # a transformers model's config.json is never replaced
        _remove_leftover_temporaries(directory)
        tmp_weights = new_temporary(directory, WEIGHTS_SUFFIX)
        try:
            metadata = {"format": "pt", "delta_type": str(config.get("delta_type"))}
            save_file(contiguous, str(tmp_weights), metadata=metadata)
            digest = file_sha256(tmp_weights)
            weights = directory / f"{WEIGHTS_PREFIX}-{digest[:16]}{WEIGHTS_SUFFIX}"
            move_into_place(tmp_weights, weights)
        finally:
            tmp_weights.unlink(missing_ok=True)
        full = {**config, "weights_file": weights.name, "weights_sha256": digest}
        write_atomically(directory / CONFIG_NAME, (json.dumps(full, indent=2) + "\n").encode())
        _fsync_directory(directory)
        _remove_unreferenced(directory)
    return weights


def _remove_unreferenced(directory: Path) -> None:
    """Delete our weights files that the committed config no longer names (earlier saves', or a killed one's).

    Only files proven ours by :func:`opendelta.ownership.is_own_weights_file`; anything else stays.
    """
    config = own_config(directory / CONFIG_NAME)
    if config is None:
        return
    for stale in directory.glob(f"{WEIGHTS_PREFIX}-*{WEIGHTS_SUFFIX}"):
        if stale.name != config.get("weights_file") and is_own_weights_file(stale):
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
    from opendelta.hub_cache import download_snapshot  # checks the repo id and that the cache entry stays inside

    return download_snapshot(str(path_or_repo), **hub_kwargs)


def read_config_dict(path_or_repo: str | os.PathLike[str], **hub_kwargs: Any) -> dict[str, Any]:
    """The raw ``config.json`` of a checkpoint (folder, file or Hub repo id)."""
    local = Path(path_or_repo)
    if local.is_file():  # the file itself was named: read it wherever it leads
        config_file = local
    else:
        config_file = contained_file(resolve_checkpoint(path_or_repo, **hub_kwargs), CONFIG_NAME, "the config")
    try:
        size = config_file.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise CheckpointError(
                f"{config_file} is {size:,} bytes; a delta config is a few kB (limit {MAX_CONFIG_BYTES:,}): "
                f"this is not an OpenDelta config"
            )
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        raise CheckpointError(f"cannot read delta config {config_file}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object, got {type(data).__name__}")
    return data


def contained_file(folder: Path, name: Any, field: str) -> Path:
    """``folder/name`` for a file name read from an untrusted config, refused if it could leave ``folder``.

    Raises:
        CheckpointError: ``name`` is not a plain file name (``../x``, ``/etc/x``, ``..``), or a link out of the folder.
    """
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise CheckpointError(
            f"{field} {name!r} in {folder / CONFIG_NAME} must be a plain file name inside the checkpoint folder; "
            f"the checkpoint is damaged or was crafted to read other files"
        )
    path = folder / name
    if (path.exists() or path.is_symlink()) and not link_stays_inside(path, folder):
        raise CheckpointError(f"{field} {name!r} in {folder} is a link that leads outside the checkpoint folder")
    return path


def weights_name(config: Mapping[str, Any]) -> Any:
    """The weights file a checkpoint's config names (unchecked: see :func:`contained_file`)."""
    return config.get("weights_file", f"{WEIGHTS_PREFIX}{WEIGHTS_SUFFIX}")


def weights_path(folder: Path, config: dict[str, Any]) -> Path:
    """The weights file ``config`` names in ``folder``, refused if it could leave the folder or is missing.

    The loader and ``opendelta inspect`` both go through it, so they accept and refuse the same checkpoints.
    """
    name = weights_name(config)
    path = contained_file(folder, name, "weights_file")
    if not path.is_file():
        raise CheckpointError(f"{folder / CONFIG_NAME} names weights file {name!r}, which is missing")
    return path


def load_weights(folder: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint in ``folder``, checked against the digest its config records."""
    path = weights_path(folder, config)
    expected = config.get("weights_sha256")
    if expected is not None and not isinstance(expected, str):
        raise CheckpointError(f"weights_sha256 in {folder / CONFIG_NAME} must be a hex string, got {expected!r}")
    if expected and file_sha256(path) != expected:
        raise CheckpointError(f"{path} does not match the sha256 recorded in its config: the file is damaged")
    return read_safetensors(path)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, for every format that stores them so (ours, PEFT's).

    Raises:
        CheckpointError: naming the file, when it is truncated, damaged or not safetensors at all (safetensors'
            own errors name neither the file nor what to do).
    """
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); the file is damaged") from exc
