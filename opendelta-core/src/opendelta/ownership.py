"""Which files in a checkpoint folder are provably ours, so that a save replaces those and never the user's.

People save into folders that already hold things: a transformers model (``config.json`` with ``model_type``,
``model.safetensors``), a Trainer ``output_dir``, notes whose names merely look like ours. A save may replace or
delete only what it can prove it wrote:

* its config document: a ``config.json`` carrying our fields (a string ``delta_type`` and ``written_by`` or
  ``opendelta_version``) and none of a transformers config's (``model_type``, ``architectures``); any other
  ``config.json`` is *foreign* and the save refuses before writing anything (:func:`refuse_foreign_config`);
* weights files it wrote: ``delta_model-<16 hex>.safetensors`` whose name is the prefix of its own sha256 and
  whose safetensors header carries our ``delta_type`` entry (:func:`is_own_weights_file`); a user's
  ``delta_model-backup.safetensors`` matches neither;
* its temporaries: names starting with :data:`OWN_TMP_PREFIX`, a prefix only our writer uses;
* its model card: a ``README.md`` sealed with the sha256 of its own text (:func:`seal_card`); a card the user
  edited no longer matches its seal and is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any

from opendelta.errors import CheckpointError

__all__ = [
    "MAX_CONFIG_BYTES",
    "OWN_TMP_PREFIX",
    "file_sha256",
    "is_content_named",
    "is_own_card",
    "is_own_temporary",
    "is_own_weights_file",
    "link_stays_inside",
    "own_config",
    "refuse_foreign_config",
    "seal_card",
]

OWN_TMP_PREFIX = ".opendelta-tmp-"
"""The prefix of every temporary file our writer creates; nothing else in a folder starts with it."""

MAX_CONFIG_BYTES = 1 << 20
"""A delta config is a few kB; a bigger ``config.json`` is not one (and is not read into memory)."""
_MAX_HEADER_BYTES = 1 << 24  # a safetensors header bigger than this is not one we wrote
_WEIGHTS_NAME = re.compile(r"delta_model-([0-9a-f]{16})\.safetensors")
_MODEL_KEYS = ("model_type", "architectures")  # what a transformers config.json has and ours never has
_SEAL = re.compile(r"\n<!-- opendelta card sha256:([0-9a-f]{64}) -->\n\Z")


def _small_json(path: Path) -> Any:
    """The JSON document at ``path`` (links followed), or ``None`` when it is absent, too big or unreadable."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def _is_ours(data: Any) -> bool:
    """Whether a config document has our markers and none of a transformers model's."""
    if not isinstance(data, dict) or any(key in data for key in _MODEL_KEYS):
        return False
    if not isinstance(data.get("delta_type"), str) or not data["delta_type"]:
        return False
    return isinstance(data.get("written_by"), dict) or "opendelta_version" in data


def own_config(path: Path) -> dict[str, Any] | None:
    """The config document at ``path`` if we wrote it; ``None`` if it is absent, unreadable or someone else's."""
    data = None if path.is_symlink() else _small_json(path)
    return data if _is_ours(data) else None


def refuse_foreign_config(folder: Path, config_name: str = "config.json") -> None:
    """Raise, before anything is written, if ``folder`` holds a ``config.json`` that is not one of ours.

    Raises:
        CheckpointError: naming the file, what it looks like, and saying to pick another folder.
    """
    path = folder / config_name
    if not (path.exists() or path.is_symlink()):
        return
    data = _small_json(path)
    if not path.is_symlink() and _is_ours(data):
        return
    kind = "a file that is not an OpenDelta delta config"
    if isinstance(data, dict) and any(key in data for key in _MODEL_KEYS):
        kind = f"the config of a transformers model (model_type={data.get('model_type')!r})"
    raise CheckpointError(
        f"{path} is {kind}; saving a delta here would replace it. Nothing was written: save the delta into another "
        f"folder (a new one, or a subfolder such as {str(folder / 'delta')!r})"
    )


def is_content_named(name: str, sha256: str | None) -> bool:
    """Whether ``name`` is our weights name for a file of digest ``sha256`` (``delta_model-<its prefix>``)."""
    match = _WEIGHTS_NAME.fullmatch(name)
    return match is not None and isinstance(sha256, str) and sha256.startswith(match.group(1))


def file_sha256(path: Path) -> str:
    """The hex sha256 of the file at ``path``, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _safetensors_metadata(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > _MAX_HEADER_BYTES:
                return None
            header = json.loads(handle.read(size))
    except (OSError, ValueError, struct.error):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else None


def is_own_weights_file(path: Path) -> bool:
    """Whether ``path`` is a weights file our writer made: its name is its own digest, its header carries ours.

    This is what lets a save remove the weights of a save that was killed after writing them (no config names
    them then) without ever touching a user's file of a similar name.
    """
    if not _WEIGHTS_NAME.fullmatch(path.name) or path.is_symlink() or not path.is_file():
        return False
    metadata = _safetensors_metadata(path)
    if metadata is None or "delta_type" not in metadata:
        return False
    return is_content_named(path.name, file_sha256(path))


def is_own_temporary(path: Path) -> bool:
    """Whether ``path`` is a temporary file our writer left (a plain file with our prefix)."""
    return path.name.startswith(OWN_TMP_PREFIX) and not path.is_symlink() and path.is_file()


def seal_card(text: str) -> str:
    """``text`` with a last line holding its sha256, so that any later edit shows (see :func:`is_own_card`)."""
    body = text if text.endswith("\n") else text + "\n"
    return f"{body}\n<!-- opendelta card sha256:{hashlib.sha256(body.encode('utf-8')).hexdigest()} -->\n"


def is_own_card(path: Path) -> bool:
    """Whether the ``README.md`` at ``path`` is a card we wrote and nobody edited since (its seal still matches)."""
    try:
        if path.is_symlink() or not path.is_file():
            return False
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    match = _SEAL.search(text)
    if match is None:
        return False
    body = text[: match.start()]
    return hashlib.sha256(body.encode("utf-8")).hexdigest() == match.group(1)


def link_stays_inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (links followed) stays in ``folder``, or in the blob store of the Hub repo it snapshots.

    A Hub cache snapshot (``models--user--name/snapshots/<rev>``) links each file into ``models--user--name/blobs``;
    that store counts only where it is the repo's own folder, not a link to somewhere else (``blobs -> /``).
    """
    target = path.resolve()
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots":
        repo = folder.parent.parent.resolve()
        if (folder.parent.parent / "blobs").resolve() == repo / "blobs":
            roots.append(repo / "blobs")
    return any(target.is_relative_to(root) for root in roots)
