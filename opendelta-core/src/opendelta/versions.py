"""Version skew between the opendelta that wrote a checkpoint and the one reading it: the rules and the record.

A saved ``config.json`` records ``written_by`` (the version of ``opendelta-core`` and of the plugin distribution
that defines the method) and ``requires`` (the lowest versions that read it faithfully). A field added to a config
in a later release declares it with ``field(default=..., metadata={"since": "0.3.0"})``; it enters ``requires``
only when its value differs from the default, because an older reader that ignores a field left at its default
computes the same thing. So:

* a checkpoint that ``requires`` a newer distribution than the installed one is refused, saying which version
  to install;
* fields the installed version does not know are ignored with a warning when ``written_by`` shows a newer
  writer (they are optional, or ``requires`` would have said so), and refused otherwise (a typo or a tampered
  file, named in the error).

Plugins layer: reading these needs installed versions and which distribution provides a config class (from the
plugin loader's records), never the methods registry, so a config can check them without loading method classes.
"""

from __future__ import annotations

import warnings
from dataclasses import MISSING, fields, is_dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from packaging.version import InvalidVersion, Version

from opendelta import plugins
from opendelta.errors import CheckpointError, OpenDeltaVersionWarning
from opendelta.install_hint import install_hint

if TYPE_CHECKING:
    from opendelta.config import DeltaConfig

__all__ = [
    "CORE_DISTRIBUTION",
    "check_requirements",
    "installed_version",
    "method_distribution",
    "newer_writers",
    "version_record",
    "warn_unknown_fields",
]

CORE_DISTRIBUTION = "opendelta-core"


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, or ``None`` when it is not installed."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _parse(text: Any) -> Version | None:
    try:
        return Version(str(text))
    except InvalidVersion:
        return None


def method_distribution(config_cls: type[DeltaConfig]) -> str | None:
    """The distribution whose plugin provides ``config_cls`` (its import package's), when a plugin of it is loaded."""
    if not config_cls.delta_type:
        return None
    return plugins.distribution_of_package(config_cls.__module__.split(".")[0])


def _field_owner(config_cls: type[DeltaConfig], name: str) -> str | None:
    root = next(k for k in reversed(config_cls.__mro__) if is_dataclass(k))  # DeltaConfig: core's own fields
    core_fields = {f.name for f in fields(root)}
    return CORE_DISTRIBUTION if name in core_fields else method_distribution(config_cls)


def version_record(config: DeltaConfig) -> dict[str, dict[str, str]]:
    """``written_by`` and ``requires`` for a checkpoint of ``config`` (see the module docstring)."""
    owners = {CORE_DISTRIBUTION, method_distribution(type(config))} - {None}
    written_by = {dist: v for dist in sorted(owners) if (v := installed_version(dist))}  # type: ignore[arg-type]
    needed: dict[str, Version] = {}
    for f in fields(config):
        since = _parse(f.metadata.get("since")) if "since" in f.metadata else None
        if since is None:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        owner = _field_owner(type(config), f.name)
        if owner and getattr(config, f.name) != default and since > needed.get(owner, Version("0")):
            needed[owner] = since
    return {"written_by": written_by, "requires": {dist: f">={v}" for dist, v in sorted(needed.items())}}


def _install_hint(dist: str, minimum: str) -> str:
    return install_hint(f"{dist}>={minimum}", upgrade=True)


def check_requirements(raw: dict[str, Any], source: str) -> None:
    """Refuse a checkpoint whose ``requires`` names a newer (or missing) distribution than the installed one.

    Raises:
        CheckpointError: naming the distribution, the version needed, the one installed and the pip command.
    """
    requires = raw.get("requires")
    if requires is None:
        return
    if not isinstance(requires, dict) or not all(isinstance(v, str) for v in requires.values()):
        raise CheckpointError(f"{source}: field 'requires' must map distribution names to '>=version' strings")
    for dist, spec in requires.items():
        minimum = _parse(spec.removeprefix(">="))
        if not spec.startswith(">=") or minimum is None:
            raise CheckpointError(f"{source}: requires[{dist!r}] = {spec!r} is not of the form '>=1.2.3'")
        have = installed_version(dist)
        if have is None:
            raise CheckpointError(
                f"{source} needs {dist}>={minimum}, but {dist} is not installed. Install it with: "
                f"{install_hint(f'{dist}>={minimum}')}"
            )
        if (_parse(have) or Version("0")) < minimum:
            raise CheckpointError(
                f"{source} needs {dist}>={minimum}, but {dist} {have} is installed: it was saved with settings older "
                f"versions cannot read faithfully. Upgrade with: {_install_hint(dist, str(minimum))}"
            )


def newer_writers(raw: dict[str, Any], config_cls: type[DeltaConfig]) -> list[str]:
    """The distributions in ``written_by`` that are newer than the installed ones, as ``"name 1.2 (installed 1.1)"``."""
    written_by = raw.get("written_by")
    if not isinstance(written_by, dict):
        return []
    relevant = {CORE_DISTRIBUTION, method_distribution(config_cls)}
    newer = []
    for dist, wrote in sorted(written_by.items()):
        have = installed_version(dist) if dist in relevant else None
        if have is None or _parse(wrote) is None:
            continue
        if _parse(wrote) > (_parse(have) or Version("0")):  # type: ignore[operator]
            newer.append(f"{dist} {wrote} (installed {have})")
    return newer


def warn_unknown_fields(config_cls: type[DeltaConfig], unknown: list[str], writers: list[str]) -> None:
    """Say that ``unknown`` fields from a newer writer are ignored, and how to upgrade."""
    upgrades = install_hint(*(f"{w.split()[0]}>={w.split()[1]}" for w in writers), upgrade=True)
    warnings.warn(
        f"this config was written by {', '.join(writers)}; {config_cls.__name__} ignores the field(s) {unknown} it "
        f"does not know. They are optional (the checkpoint would require the newer version otherwise), so the delta "
        f"computes the same; to use them, {upgrades}",
        OpenDeltaVersionWarning,
        stacklevel=4,
    )
