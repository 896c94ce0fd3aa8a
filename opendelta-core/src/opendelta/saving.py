"""Writing and reading delta checkpoints: ``config.json`` plus the delta weights as safetensors, nothing else.

Atomicity: the weights go to a content-named file (``delta_model-<sha256 prefix>.safetensors``) written under a
temporary name and renamed into place, then ``config.json``, which names that file, replaces the old config in one
``os.replace``. The config is the commit point: a save killed at any moment leaves either the previous checkpoint
(its config still names its own, untouched weights) or the new one; weight files no config names are removed
after the commit.

Concurrency: writers of one folder take an exclusive lock (``fcntl.flock`` on the folder), so two processes saving
to the same path run one after the other and the folder ends as one of them wrote it, never a mix (without the
lock, one writer's clean-up could delete the weights the other is about to commit). Readers take it shared, so a
load never sees a config whose weights a concurrent save just replaced. A killed process's lock is released by the
kernel; the temporary files of a save that was killed are removed by the next save.

Untrusted input: ``config.json`` is size-capped JSON; the weights file it names must be a plain file name inside
the folder (a link may only lead into the Hub cache's blob store of the same repo); the weights are safetensors,
which hold tensors and nothing that runs.

Checkpoints can also live on the Hugging Face Hub: a path that is not a local folder is resolved as a repo id
through ``huggingface_hub`` (honouring ``cache_dir``, ``local_files_only``, ``force_download``, ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import contextlib
import hashlib
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

from opendelta.config import CONFIG_NAME
from opendelta.errors import CheckpointError

__all__ = [
    "WEIGHTS_PREFIX",
    "checkpoint_lock",
    "contained_file",
    "load_weights",
    "read_config_dict",
    "resolve_checkpoint",
    "write_atomically",
    "write_checkpoint",
]

WEIGHTS_PREFIX = "delta_model"
WEIGHTS_SUFFIX = ".safetensors"
TMP_PREFIX = ".tmp-"
MAX_CONFIG_BYTES = 1 << 20
"""A delta config is a few kB; a bigger ``config.json`` is not one (and is not read into memory)."""

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
    """Delete the temporary files of saves that were killed (only called with the exclusive lock held)."""
    for pattern in (f"*{WEIGHTS_SUFFIX}", "*.json", "*.md"):  # ours: weights, config, model card
        for leftover in directory.glob(TMP_PREFIX + pattern):
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    """A new empty temporary file in ``directory`` (``.tmp-*``, which the next checkpoint save removes if left)."""
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

    The data goes to a temporary file beside it (``.tmp-*``, removed by the next checkpoint save if left), is
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
        _remove_leftover_temporaries(directory)
        tmp_weights = new_temporary(directory, WEIGHTS_SUFFIX)
        try:
            metadata = {"format": "pt", "delta_type": str(config.get("delta_type"))}
            save_file(contiguous, str(tmp_weights), metadata=metadata)
            digest = _sha256(tmp_weights)
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


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (links followed) stays in ``folder``, or in the blob store of the Hub repo it snapshots.

    A Hub cache snapshot (``models--user--name/snapshots/<rev>``) links each file into ``models--user--name/blobs``.
    """
    target = path.resolve()
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots":
        roots.append((folder.parent.parent / "blobs").resolve())
    return any(target.is_relative_to(root) for root in roots)


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
    if path.exists() and not _inside(path, folder):
        raise CheckpointError(f"{field} {name!r} in {folder} is a link that leads outside the checkpoint folder")
    return path


def load_weights(folder: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint in ``folder``, checked against the digest its config records."""
    name = config.get("weights_file", f"{WEIGHTS_PREFIX}{WEIGHTS_SUFFIX}")
    path = contained_file(folder, name, "weights_file")
    if not path.is_file():
        raise CheckpointError(f"{folder / CONFIG_NAME} names weights file {name!r}, which is missing")
    expected = config.get("weights_sha256")
    if expected is not None and not isinstance(expected, str):
        raise CheckpointError(f"weights_sha256 in {folder / CONFIG_NAME} must be a hex string, got {expected!r}")
    if expected and _sha256(path) != expected:
        raise CheckpointError(f"{path} does not match the sha256 recorded in its config: the file is damaged")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc
