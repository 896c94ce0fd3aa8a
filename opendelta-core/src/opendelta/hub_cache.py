"""Resolving a Hub repo id to a checkpoint folder in the ``huggingface_hub`` cache, and nothing outside that cache.

The cache is a folder per repo, ``<cache>/models--org--name``, holding ``refs/<branch>`` (a file with the 40-hex
commit the branch pointed at), ``snapshots/<commit>/<file>`` (links) and ``blobs/<hash>`` (the contents). Offline,
``snapshot_download`` returns ``snapshots/<whatever refs/main says>`` and the loader reads the files there, following
their links. A cache is not written by us: another tool, a shared cache or a crafted archive unpacked into
``~/.cache`` may hold a ``refs/main`` of ``../../../../home/me/.ssh``, a ``blobs`` that is a link to ``/``, or
snapshot links to any file. So the folder a repo id resolves to is checked against the layout: it must be
``snapshots/<40-hex>`` of that repo's own folder, with the real folders (not links) of the cache, and every file in
it must lead into the repo's ``blobs`` or stay in the snapshot; :func:`opendelta.ownership.link_stays_inside` is the
same rule that a local checkpoint's weights file follows.

Repo ids are checked by our own rules (the Hub's: ``org/name``, letters, digits, ``-_.``, at most 96 characters a
part, no ``--`` or ``..``), so a wrong one is a :class:`~opendelta.errors.CheckpointError` that says what to give,
not the Hub client's ``HFValidationError``; a delta checkpoint on the Hub is always named with its namespace.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from opendelta.errors import CheckpointError
from opendelta.ownership import link_stays_inside

__all__ = ["COMMIT_RE", "check_hub_repo_id", "check_snapshot", "download_snapshot", "repo_id_problem"]

COMMIT_RE = re.compile(r"[0-9a-f]{40}")
"""A snapshot folder's name: the full commit hash (what ``huggingface_hub`` names them, and nothing else)."""

_PART_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_MAX_PART = 96
_PATTERNS = ["*.json", "*.safetensors", "*.md", "pytorch_model.bin"]


def repo_id_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` cannot name a Hub repo holding a delta, or ``None`` when it can (never looser than the Hub)."""
    parts = repo_id.split("/")
    if len(parts) != 2:
        return "a Hub repo id is 'org/name', with one '/'"
    for part in parts:
        if not part:
            return "the org and the name must both be non-empty"
        if len(part) > _MAX_PART:
            return f"each part is at most {_MAX_PART} characters"
        if not _PART_RE.fullmatch(part):
            return "the parts use letters, digits, '-', '_' and '.', and do not start or end with '-' or '.'"
        if "--" in part or ".." in part:
            return "'--' and '..' are not allowed"
    if repo_id.endswith(".git"):
        return "a repo id does not end with '.git'"
    return None


def check_hub_repo_id(repo_id: str) -> str:
    """``repo_id`` if it can name a Hub repo, checked before the Hub client sees it.

    Raises:
        CheckpointError: it is no folder here and cannot be a repo id; the message says both and what to give.
    """
    problem = repo_id_problem(repo_id)
    if problem is not None:
        raise CheckpointError(
            f"no delta checkpoint at {repo_id!r}: no such folder, and not a Hub repo id ({problem}); give the "
            f"folder save_finetuned() wrote, or a Hub repo id such as 'org/my-lora-delta'"
        )
    return repo_id


def _tampered(storage: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"the Hub cache entry {storage} {what}: the cache was damaged or crafted to read other files, so nothing was "
        f"read from it. Delete {storage} and download the repo again"
    )


def check_snapshot(
    snapshot: str | os.PathLike[str], storage: str | os.PathLike[str], cache: str | os.PathLike[str]
) -> Path:
    """``snapshot`` if it is a snapshot of the repo folder ``storage`` of the Hub cache ``cache``, and stays there.

    Raises:
        CheckpointError: ``snapshot`` is not ``storage/snapshots/<40-hex>`` (a ``refs`` file that is no commit), or
            the repo folder, ``snapshots``, ``blobs`` or a file leads outside the cache (a link out).
    """
    snapshot, storage, cache = Path(snapshot), Path(storage), Path(cache)
    if snapshot.parent != storage / "snapshots" or not COMMIT_RE.fullmatch(snapshot.name):
        raise _tampered(
            storage,
            f"resolves the revision to the folder {str(snapshot)!r}, not snapshots/<40-hex commit> (its refs/ "
            f"file holds something else than a commit hash)",
        )
    real_storage = storage.resolve()
    if not real_storage.is_relative_to(cache.resolve()):
        raise _tampered(storage, f"is a link to {real_storage}, outside the cache {cache}")
    for sub in ("snapshots", "blobs"):
        real = (storage / sub).resolve()
        if real != real_storage / sub and (storage / sub).exists():
            raise _tampered(storage, f"has a {sub!r} folder that is a link to {real}, outside the cache")
    if snapshot.resolve() != real_storage / "snapshots" / snapshot.name:
        raise _tampered(storage, f"has a snapshot {snapshot.name} that is a link to {snapshot.resolve()}")
    for path in sorted(snapshot.rglob("*")):
        if not link_stays_inside(path, snapshot):
            raise _tampered(storage, f"has {path.relative_to(snapshot)} linking to {path.resolve()}, outside its blobs")
    return snapshot


def download_snapshot(repo_id: str, **hub_kwargs: Any) -> Path:
    """The checked snapshot folder of the Hub repo ``repo_id`` (downloaded, or read from the cache offline).

    ``hub_kwargs`` go to ``huggingface_hub.snapshot_download`` (``cache_dir``, ``revision``, ``local_files_only``,
    ``force_download``).

    Raises:
        CheckpointError: an invalid repo id, a repo that cannot be fetched, or a cache entry that leads outside.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from huggingface_hub.file_download import repo_folder_name

    check_hub_repo_id(repo_id)
    try:
        folder = snapshot_download(repo_id, allow_patterns=_PATTERNS, **hub_kwargs)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise CheckpointError(
            f"no local folder {repo_id!r}, and the Hub repo could not be fetched ({type(exc).__name__}: {exc})"
        ) from exc
    cache = Path(hub_kwargs.get("cache_dir") or constants.HF_HUB_CACHE)
    return check_snapshot(folder, cache / repo_folder_name(repo_id=repo_id, repo_type="model"), cache)
