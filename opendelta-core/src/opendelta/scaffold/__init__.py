"""Scaffolding a third-party delta-method distribution: ``opendelta new-plugin NAME``.

The template (``template/``, package data) is a complete, working plugin: a ``pyproject.toml`` with the entry point
in the ``opendelta`` group, a config dataclass, a layer, a ``DeltaModel`` subclass, the hook implementation, a
README and tests that run core's conformance battery on every mapped architecture. Its method is real and small
(a learned scale and shift of the targeted modules' outputs), so the generated tests pass out of the box and the
author replaces the math, not the plumbing. Placeholders ``{{name}}`` in file contents and paths are filled with
plain string replacement; files end in ``.tmpl`` so the template itself is never imported, linted or collected.
"""

from __future__ import annotations

import keyword
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

from opendelta.errors import OpenDeltaError

__all__ = ["PluginNames", "ScaffoldError", "core_requirement", "plugin_names", "scaffold"]

TEMPLATE_SUFFIX = ".tmpl"
_METHOD = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
_MAX_LENGTH = 40
_PLACEHOLDER = re.compile(r"\{\{[A-Za-z_]+\}\}")


class ScaffoldError(OpenDeltaError, ValueError):
    """A plugin name that cannot be used, or a destination that already exists."""


@dataclass(frozen=True)
class PluginNames:
    """Every spelling of one plugin's name that the template needs."""

    method: str
    """The registered method name and entry-point name (``scale_shift``)."""
    distribution: str
    """The distribution name (``opendelta-scale-shift``), also the folder's name."""
    package: str
    """The import name (``opendelta_scale_shift``)."""
    class_prefix: str
    """The prefix of the model and config classes (``ScaleShift`` -> ``ScaleShiftModel``)."""


def plugin_names(name: str) -> PluginNames:
    """Validate ``name`` (``scale_shift``, ``scale-shift`` or ``opendelta-scale-shift``) and spell it every way.

    Raises:
        ScaffoldError: the name cannot be a method name; the message says what to use instead.
    """
    stem = name.strip()
    for prefix in ("opendelta-", "opendelta_"):
        stem = stem.removeprefix(prefix)
    method = stem.replace("-", "_")
    if not _METHOD.match(method) or len(method) > _MAX_LENGTH:
        suggestion = re.sub(r"_+", "_", re.sub(r"[^a-z0-9]+", "_", method.lower())).strip("_")
        suggestion = suggestion if suggestion[:1].isalpha() else f"my_{suggestion}".rstrip("_")
        raise ScaffoldError(
            f"plugin name {name!r} is not usable: it must be lowercase letters, digits and single '-' or '_' "
            f"between words, start with a letter, and be at most {_MAX_LENGTH} characters (try {suggestion!r})"
        )
    if keyword.iskeyword(method):
        raise ScaffoldError(f"plugin name {name!r} is a Python keyword; pick another name (try '{method}_delta')")
    return PluginNames(
        method=method,
        distribution="opendelta-" + method.replace("_", "-"),
        package="opendelta_" + method,
        class_prefix="".join(word.capitalize() for word in method.split("_")),
    )


def core_requirement(version: str) -> str:
    """The requirement on ``opendelta-core`` a plugin declares: the hook API of this minor version.

    ``"0.1.0"`` -> ``"opendelta-core>=0.1,<0.2"``.
    """
    major, minor = (int(part) for part in re.findall(r"\d+", version)[:2])
    return f"opendelta-core>={major}.{minor},<{major}.{minor + 1}"


def _substitute(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def _walk(folder: Traversable, relative: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Traversable]]:
    found = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name == "__pycache__":
            continue
        if entry.is_dir():
            found += _walk(entry, (*relative, entry.name))
        elif entry.name.endswith(TEMPLATE_SUFFIX):
            found.append(((*relative, entry.name.removesuffix(TEMPLATE_SUFFIX)), entry))
    return found


def scaffold(name: str, parent: str | os.PathLike[str] = ".", core_version: str | None = None) -> Path:
    """Write a new plugin distribution for method ``name`` into ``parent/opendelta-<name>/`` and return that folder.

    The folder is assembled under a temporary name beside it and renamed into place, so a failure leaves nothing.

    Args:
        name: the method name (see :func:`plugin_names`).
        parent: the folder to create the distribution in (it must exist).
        core_version: the ``opendelta-core`` version to require (default: the installed one).

    Raises:
        ScaffoldError: a bad name, a missing parent, or a destination that already exists.
    """
    names = plugin_names(name)
    parent_dir = Path(parent)
    if not parent_dir.is_dir():
        raise ScaffoldError(f"{parent_dir} is not an existing folder; create it or pass another --output")
    destination = parent_dir / names.distribution
    if destination.exists() or destination.is_symlink():
        raise ScaffoldError(f"{destination} already exists; remove it or choose another name or --output folder")
    if core_version is None:
        from opendelta import __version__ as core_version
    values = {
        "method": names.method,
        "distribution": names.distribution,
        "package": names.package,
        "Class": names.class_prefix,
        "core_requirement": core_requirement(core_version),
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{names.distribution}-", dir=parent_dir))
    try:
        for relative, source in _walk(resources.files(__name__).joinpath("template")):
            target = staging.joinpath(*(_substitute(part, values) for part in relative))
            target.parent.mkdir(parents=True, exist_ok=True)
            text = _substitute(source.read_text(encoding="utf-8"), values)
            leftover = _PLACEHOLDER.search(text)
            if leftover:
                raise ScaffoldError(f"template file {'/'.join(relative)} has an unknown placeholder {leftover.group()}")
            target.write_text(text, encoding="utf-8")
        os.rename(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination
