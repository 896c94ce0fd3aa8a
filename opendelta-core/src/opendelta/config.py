"""``DeltaConfig``: the hyper-parameters of a delta model, validated, and round-tripped through JSON.

A plugin subclasses it as a dataclass with its own fields and ``delta_type``. Every field is type-checked against
its annotation at construction, so a wrong type in a hand-written or downloaded ``config.json`` is refused with a
message naming the field, instead of failing deep inside a layer.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import types
import warnings
from collections import abc
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from opendelta.addressing import ALL_LINEAR, is_all_linear
from opendelta.classic_config import classic_parameters
from opendelta.errors import DeltaConfigError, OpenDeltaConfigWarning
from opendelta.file_patterns import PATTERN_FIELDS, FilePatterns, check_limits
from opendelta.ownership import refuse_foreign_config
from opendelta.versions import check_requirements, newer_writers, version_record, warn_unknown_fields

__all__ = ["METADATA_FIELDS", "DeltaConfig"]

METADATA_FIELDS = frozenset(
    {
        "delta_type",
        "opendelta_version",
        "transformers_version",
        "torch_version",
        "weights_file",
        "weights_sha256",
        "written_by",
        "requires",
        "backbone_hashes",
        "backbone_tensors",
    }
)
"""Keys a saved config carries besides the hyper-parameters; they describe the file, not the delta."""

C = TypeVar("C", bound="DeltaConfig")


INT64_RANGE = range(-(2**63), 2**63)
"""The integers a size or count may take: a tensor's sizes are int64, and JSON integers have no bound."""


def _beyond_int64(value: Any) -> bool:
    """Whether ``value`` is, or holds, an integer no int64 can hold (``2**70`` in a hand-written config)."""
    if isinstance(value, (list, tuple)):
        return any(_beyond_int64(v) for v in value)
    if isinstance(value, dict):
        return any(_beyond_int64(k) or _beyond_int64(v) for k, v in value.items())
    return isinstance(value, int) and not isinstance(value, bool) and value not in INT64_RANGE


def _type_ok(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, h) for h in get_args(hint))
    if origin is Literal:
        return value in get_args(hint)
    if origin in (list, tuple, abc.Sequence):
        (item,) = get_args(hint)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        key, val = get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(_type_ok(k, key) and _type_ok(v, val) for k, v in value.items())
    if hint is float:  # NaN and infinity pass every "x > 0" check a plugin writes, so they are refused here
        if isinstance(value, int) and value not in INT64_RANGE:
            return False  # math.isfinite(10**400) raises OverflowError
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and value in INT64_RANGE
    return isinstance(value, hint) if isinstance(hint, type) else True


@dataclass(kw_only=True)
class DeltaConfig:
    """Fields every delta method shares (manual section 1.20.1, ``BaseDeltaConfig``).

    Attributes:
        modified_modules: patterns of the modules to modify (name-based addressing); ``None`` uses the method's
            default common names.
        exclude_modules: patterns of modules never to modify, even when matched.
        unfrozen_modules: what ``freeze_module()`` leaves trainable by default; ``"deltas"`` means every delta
            parameter.
        common_structure: whether ``modified_modules`` are common names (``attn.q``) rather than real ones.
        modules_to_save: real names (end-matched like ``modified_modules``) of backbone modules the delta model
            copies as its own trainable task heads (PEFT's ``modules_to_save``; see ``opendelta.task_heads``).
            Keyword only; ``None`` (the default, and what a checkpoint without it means): no head.
        backbone_class: the backbone's class name, recorded on save.
        backbone_checkpoint_name: the backbone's checkpoint (``config._name_or_path``), recorded on save.
        backbone_hash: the backbone's fingerprint (see ``opendelta.hashing``), recorded on save and checked on load.

    A field added in a later release of a plugin declares it: ``field(default=..., metadata={"since": "0.3.0"})``.
    A checkpoint that sets it to a non-default value then requires that version (see ``opendelta.versions``).
    """

    delta_type: ClassVar[str] = ""
    """The method's name, written once here: the model class, its deltas' child name and the registry read it."""
    delta_aliases: ClassVar[tuple[str, ...]] = ()
    """Other names a saved ``delta_type`` may give this method (one an earlier release wrote); registered with it."""

    modified_modules: list[str] | None = None
    exclude_modules: list[str] | None = None
    unfrozen_modules: list[str] = field(default_factory=lambda: ["deltas"])
    common_structure: bool | None = None
    modules_to_save: list[str] | None = None
    backbone_class: str | None = None
    backbone_checkpoint_name: str | None = None
    backbone_hash: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.modified_modules, str) and is_all_linear(self.modified_modules):
            self.modified_modules = [ALL_LINEAR]  # PEFT's spelling, kept as a list so the field keeps its type
        hints = get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
                setattr(self, f.name, value)
            if not _type_ok(value, hints[f.name]):
                beyond = _beyond_int64(value)
                shown = repr(value) if not beyond else f"a {type(value).__name__} holding an integer beyond int64"
                shown = "an integer beyond int64" if beyond and isinstance(value, int) else shown
                raise DeltaConfigError(
                    f"{type(self).__name__}.{f.name} must be {hints[f.name]}, got {shown}"
                    + (" (no tensor size or count can be that large)" if beyond else f" ({type(value).__name__})")
                )
        self.validate()

    def validate(self) -> None:
        """Check value ranges; subclasses extend this (call ``super().validate()``) and raise DeltaConfigError."""

    @classmethod
    def field_names(cls) -> list[str]:
        """The names of the hyper-parameters, in declaration order (a 0.3.2-style subclass's own ones last)."""
        return [f.name for f in fields(cls)] + list(classic_parameters(cls))

    def to_dict(self) -> dict[str, Any]:
        """Serialise to a JSON-ready dict, ``delta_type`` first."""
        own = {name: getattr(self, name) for name in classic_parameters(type(self)) if hasattr(self, name)}
        plain = {k: list(v) if isinstance(v, FilePatterns) else v for k, v in {**asdict(self), **own}.items()}
        return {"delta_type": self.delta_type, **plain}

    def __eq__(self, other: object) -> bool:
        """Same class and same hyper-parameters (a 0.3.2-style subclass's own ones included)."""
        if type(other) is not type(self):
            return NotImplemented
        return self.to_dict() == other.to_dict()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "delta_type")
        return f"{type(self).__name__}({shown})"

    def mark_read_from(
        self, path: str | os.PathLike[str], *, overridden: abc.Iterable[str] = (), fields: abc.Iterable[str] = ()
    ) -> None:
        """Record that this config's module patterns were read from the file ``path``: untrusted input.

        Each pattern field (``fields``, by default all of ``opendelta.file_patterns.PATTERN_FIELDS``) not in
        ``overridden`` (set in code by the caller) is checked against the file limits now, before any matching, and
        becomes a ``FilePatterns`` list, which every matcher then handles with bounds (see
        :mod:`opendelta.file_patterns`). The loaders call this; patterns set in code afterwards are the user's own.

        Raises:
            CheckpointError: a field holds too many or too long patterns (named, with the limit).
        """
        skip = set(overridden)
        for name in tuple(fields) or PATTERN_FIELDS:
            value = getattr(self, name, None)
            if name in skip or not isinstance(value, list):
                continue
            check_limits(name, value, str(path))
            setattr(self, name, FilePatterns(value, str(path)))

    @property
    def read_from(self) -> dict[str, str]:
        """The pattern fields that came from a file, and the file (see :meth:`mark_read_from`)."""
        return {
            name: value.source
            for name in PATTERN_FIELDS
            if isinstance(value := getattr(self, name, None), FilePatterns)
        }

    def copy_marks(self, other: DeltaConfig, overridden: abc.Iterable[str] = ()) -> None:
        """Mark the pattern fields ``other`` read from a file as read from it here too, unless ``overridden``."""
        skip = set(overridden)
        for name, source in other.read_from.items():
            if name not in skip:
                self.mark_read_from(source, fields=[name])

    @classmethod
    def from_dict(cls: type[C], config_dict: dict[str, Any], **kwargs: Any) -> C:
        """Build a config from a dict made in code (``kwargs`` override its entries).

        A dict made in code may hold more than this method's fields: 0.3.2's pipelines pass whole argument
        namespaces (``AutoDeltaConfig.from_dict(asdict(delta_args))``, ``vars(args)``), holding other methods'
        fields and pipeline options. So, as 0.3.2 did:

        * a key of ``config_dict`` that is no field of this config is dropped, and one
          :class:`~opendelta.errors.OpenDeltaConfigWarning` names every dropped key;
        * a key set to ``None`` for a field that cannot be ``None`` (``lora_r`` of an argparse option whose
          default is ``None``: "not given") takes the field's default, and the same warning names it. 0.3.2 kept the
          ``None``, which failed later inside a layer; an optional field (``modified_modules``) keeps its ``None``.

        Keyword arguments stay strict, as every keyword argument in code is (``LoraModel(model, lora_rr=4)``): an
        unknown one, or ``None`` for a field that cannot be ``None``, is refused by name with the known fields. A
        dict with a ``written_by`` of a newer release than the installed one is read as a checkpoint is (see
        :meth:`from_saved`). A ``config.json`` read from a checkpoint goes through :meth:`from_saved`, which refuses
        unknown keys.

        Raises:
            DeltaConfigError: an unknown keyword argument, a wrong type or value, or a ``delta_type`` of another
                method.
            CheckpointError: the dict ``requires`` a newer distribution than the installed one.
        """
        return cls._from_mapping(config_dict, kwargs, saved_in=None)

    @classmethod
    def from_saved(cls: type[C], config_dict: dict[str, Any], saved_in: str, **kwargs: Any) -> C:
        """Build a config from the ``config.json`` of a checkpoint (``kwargs`` override its entries).

        Unlike :meth:`from_dict`, an unknown key is refused by name (a typo or a tampered file), unless
        ``written_by`` shows a newer release than the installed one: then it is an optional field of that release,
        ignored with an :class:`~opendelta.errors.OpenDeltaVersionWarning` (see :mod:`opendelta.compat`).
        ``saved_in`` (the file or folder) is named in the errors.
        """
        return cls._from_mapping(config_dict, kwargs, saved_in=saved_in)

    @classmethod
    def _from_mapping(
        cls: type[C], config_dict: dict[str, Any], overrides: dict[str, Any], *, saved_in: str | None
    ) -> C:
        """The one implementation of :meth:`from_dict` (``saved_in=None``) and :meth:`from_saved`."""
        if not isinstance(config_dict, dict):
            raise DeltaConfigError(f"a delta config must be a dict, got {type(config_dict).__name__}")
        check_requirements(config_dict, f"this {cls.__name__} (saved config)")
        merged = {**config_dict, **overrides}
        cls._check_delta_type(merged.get("delta_type"))
        known = set(cls.field_names())
        unknown = sorted(set(merged) - known - METADATA_FIELDS)
        newer = newer_writers(config_dict, cls) if unknown else []
        mistyped = sorted(set(unknown) & set(overrides))  # a keyword argument is typed in code: never tolerated
        in_code = saved_in is None
        if unknown and newer and not mistyped:  # optional fields of a newer release, in a file or a dict
            warn_unknown_fields(cls, unknown, newer)
        elif unknown and (mistyped or not in_code):
            where = f" in {saved_in}" if saved_in else ""
            raise DeltaConfigError(
                f"unknown field(s) {mistyped if in_code else unknown} for {cls.__name__} (delta_type "
                f"{cls.delta_type!r}){where}; known fields: {sorted(known)}"
            )
        dropped = unknown if in_code and not newer else []
        unset = cls._unset_by_none(config_dict, overrides) if in_code else []
        if dropped or unset:
            _warn_dropped(cls, dropped, unset)
        return cls(**{k: v for k, v in merged.items() if k in known and k not in unset})

    @classmethod
    def _check_delta_type(cls, given: Any) -> None:
        """Refuse a ``delta_type`` naming another method; an alias of this one (``lowrankadapter``) is this one."""
        if given in (None, cls.delta_type) or not cls.delta_type:
            return
        if given not in cls.delta_aliases:
            raise DeltaConfigError(
                f"{cls.__name__} is for delta_type {cls.delta_type!r}, got {given!r}; use "
                f"AutoDeltaConfig.from_dict to pick the class from delta_type"
            )

    @classmethod
    def _unset_by_none(cls, config_dict: dict[str, Any], overrides: dict[str, Any]) -> list[str]:
        """The keys of ``config_dict`` (not ``overrides``) set to ``None`` for a field that has a default.

        Only fields that cannot be ``None``: there ``None`` means "not given", as an argparse or dataclass option
        whose default is ``None`` says.
        """
        hints = get_type_hints(cls)
        return sorted(
            f.name
            for f in fields(cls)
            if config_dict.get(f.name, MISSING) is None
            and f.name not in overrides
            and (f.default is not MISSING or f.default_factory is not MISSING)
            and not _type_ok(None, hints[f.name])
        )

    def to_json_string(self) -> str:
        """The config as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def save_finetuned(self, save_directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` into ``save_directory`` (created if needed); returns the file's path.

        Raises:
            CheckpointError: the folder holds a ``config.json`` that is not a delta config of ours (a transformers
                model's); nothing is written then.
        """
        from opendelta.saving import CONFIG_NAME, write_atomically  # the facade: persistence is the layer above

        directory = Path(save_directory)
        refuse_foreign_config(directory, CONFIG_NAME)  # a transformers model's config.json is never replaced
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_NAME
        document = {**self.to_dict(), **version_record(self)}  # what reading it needs, as in a full checkpoint
        write_atomically(path, (json.dumps(document, indent=2) + "\n").encode())  # never a half-written file
        return path

    @classmethod
    def from_finetuned(cls: type[C], finetuned_delta_path: str | os.PathLike[str], **kwargs: Any) -> C:
        """Read a config from a checkpoint folder or a ``config.json`` file (``kwargs`` override entries)."""
        from opendelta.saving import read_config_dict

        raw = read_config_dict(finetuned_delta_path, **_hub_kwargs(kwargs))
        config = cls.from_saved(raw, str(finetuned_delta_path), **kwargs)
        config.mark_read_from(finetuned_delta_path, overridden=kwargs)
        return config

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default value."""
        out = {}
        for f in fields(cls):
            if f.default is not MISSING:
                out[f.name] = f.default
            elif f.default_factory is not MISSING:
                out[f.name] = f.default_factory()
        out.update({k: v for k, v in classic_parameters(cls).items() if v is not inspect.Parameter.empty})
        return out


def _warn_dropped(config_cls: type[DeltaConfig], dropped: list[str], unset: list[str]) -> None:
    """The one warning of :meth:`DeltaConfig.from_dict` for the keys it dropped and the ``None`` it read as unset."""
    parts = []
    if dropped:
        parts.append(f"dropped the key(s) {dropped} (not its fields)")
    if unset:
        parts.append(f"took the default of {unset}, given as None (a value those fields cannot have)")
    warnings.warn(
        f"{config_cls.__name__}.from_dict {' and '.join(parts)}. Its fields are {config_cls.field_names()}; pass a "
        f"dict of those only to silence this (a keyword argument that is not one of them is an error)",
        OpenDeltaConfigWarning,
        stacklevel=_caller_stacklevel(),
    )


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside opendelta (the user's call)."""
    package = str(Path(__file__).parent)
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "revision", "token")


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the download options out of ``kwargs`` (they are not config fields)."""
    return {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
