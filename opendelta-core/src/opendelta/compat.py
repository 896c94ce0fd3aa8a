"""Version skew, and the installed method for a saved ``delta_type``: what reading a checkpoint needs of the registry.

The rules and the record (``written_by``, ``requires``, fields of a newer release) live in :mod:`opendelta.versions`
(re-exported here), below the model layer; this module adds what needs the methods registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from opendelta.errors import CheckpointError, UnknownDeltaMethodError
from opendelta.install_hint import install_hint
from opendelta.registry import MethodSpec, get_method, registered_name
from opendelta.saving import CONFIG_NAME
from opendelta.versions import (
    CORE_DISTRIBUTION,
    check_requirements,
    installed_version,
    method_distribution,
    newer_writers,
    version_record,
    warn_unknown_fields,
)

if TYPE_CHECKING:
    from opendelta.base import DeltaModel
    from opendelta.config import DeltaConfig

__all__ = [
    "CORE_DISTRIBUTION",
    "check_requirements",
    "installed_version",
    "method_and_config",
    "method_distribution",
    "method_for",
    "newer_writers",
    "version_record",
    "warn_unknown_fields",
]


def method_for(raw: dict[str, Any]) -> MethodSpec:
    """The installed method for a saved config's ``delta_type``; when none, name the distribution that wrote it.

    Raises:
        UnknownDeltaMethodError: the installed methods, plus ``pip install '<dist>>=<version>'`` for the
            distribution the checkpoint's ``written_by`` records (a third-party method's name is not guessable).
    """
    try:
        return get_method(raw["delta_type"])
    except UnknownDeltaMethodError as exc:
        written_by = raw.get("written_by")
        plugins = (
            {d: v for d, v in written_by.items() if d != CORE_DISTRIBUTION} if isinstance(written_by, dict) else {}
        )
        if not plugins:
            raise
        wanted = install_hint(*(f"{d}>={v}" for d, v in sorted(plugins.items())))
        raise UnknownDeltaMethodError(f"{exc}. This checkpoint was written by it: {wanted}") from exc


def method_and_config(
    folder: Path,
    raw: dict[str, Any],
    cls: type[DeltaModel],
    delta_config: DeltaConfig | None,
    overrides: dict[str, Any],
) -> tuple[type[DeltaModel], DeltaConfig]:
    """The method a saved config names (a missing plugin named first) and its config, for both OpenDelta formats.

    ``cls`` is the class ``from_finetuned`` was called on (``DeltaModel`` or ``AutoDeltaModel``'s: any method).

    Raises:
        CheckpointError: no ``delta_type``, a ``requires`` this installation does not meet, or another method's.
        UnknownDeltaMethodError: no installed plugin provides the method (naming the one that wrote it).
    """
    delta_type = raw.get("delta_type")
    if not isinstance(delta_type, str):
        raise CheckpointError(f"{folder}/config.json has no delta_type: not an OpenDelta checkpoint")
    model_cls = method_for(raw).model_cls if cls.delta_type in ("", None) else cls  # a missing plugin first
    check_requirements(raw, str(folder))
    if model_cls.delta_type != registered_name(delta_type):  # an alias an earlier release wrote is the same
        raise CheckpointError(f"{folder} holds a {delta_type!r} delta, not one for {cls.__name__}")
    config = delta_config or model_cls.config_class.from_saved(raw, str(folder / CONFIG_NAME), **overrides)
    if delta_config is None:  # its patterns are the file's: checked now, matched with bounds
        config.mark_read_from(folder / CONFIG_NAME, overridden=overrides)
    return model_cls, config
