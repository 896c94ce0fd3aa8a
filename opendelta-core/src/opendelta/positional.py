"""Positional hyper-parameters, as OpenDelta 0.3.2's constructors took them (``LoraModel(model, 4)`` is ``lora_r=4``).

Each method declares its order once (``DeltaModel.positional_args``, the manual's signature order); the
constructor binds positional values to those names, refuses too many and a value given both by position and by
name, exactly as a Python signature would, and ``inspect.signature(LoraModel)`` shows that same order.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from opendelta.errors import DeltaConfigError

__all__ = [
    "CONSTRUCTOR_OPTIONS",
    "RECORD_FIELDS",
    "SHARED_POSITIONALS",
    "bind_positionals",
    "constructor_signature",
    "positional_names",
]

CONSTRUCTOR_OPTIONS: dict[str, Any] = {"interactive_modify": False, "backend": "hf", "dummy_inputs": None}
"""Constructor arguments that are not config fields, with their defaults."""
SHARED_POSITIONALS = (
    "modified_modules",
    "exclude_modules",
    "unfrozen_modules",
    "common_structure",
    "interactive_modify",
    "backend",
)
"""The addressing arguments and options most of the manual's signatures list, in this order, after or before the
method's own hyper-parameters (``positional_args = ("bottleneck_dim", "non_linearity", *SHARED_POSITIONALS)``)."""
RECORD_FIELDS = ("backbone_class", "backbone_checkpoint_name", "backbone_hash")
"""Config fields the library records on save; never given by position."""
KEYWORD_ONLY_FIELDS = ("modules_to_save",)
"""Shared config fields added after 0.3.2's signatures: by name only, so no method's positional order shifts."""


def positional_names(owner: str, declared: Sequence[str] | None, field_names: Sequence[str]) -> tuple[str, ...]:
    """The names positional arguments after the backbone stand for: ``declared``, or the config's field order.

    Raises:
        DeltaConfigError: ``declared`` names something that is neither a field nor a constructor option, or a name
            twice (a plugin's mistake, reported when its class is defined).
    """
    if declared is None:
        return tuple(n for n in field_names if n not in RECORD_FIELDS and n not in KEYWORD_ONLY_FIELDS)
    known = [*field_names, *CONSTRUCTOR_OPTIONS]
    unknown = [n for n in declared if n not in known]
    repeated = sorted({n for n in declared if list(declared).count(n) > 1})
    if unknown or repeated or isinstance(declared, str):
        raise DeltaConfigError(
            f"{owner}.positional_args must be a tuple of distinct config fields or constructor options; "
            f"{'unknown: ' + repr(unknown) if unknown else ''}{' repeated: ' + repr(repeated) if repeated else ''}"
            f"{' (a string, not a tuple)' if isinstance(declared, str) else ''}; known: {known}"
        )
    return tuple(declared)


def bind_positionals(
    owner: str, names: Sequence[str], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """``kwargs`` with the positional ``args`` added under ``names``, in order.

    Raises:
        TypeError: more positional arguments than ``names``, or one also given by name (Python's own wording).
    """
    if len(args) > len(names):
        raise TypeError(
            f"{owner}() takes the backbone and at most {len(names)} positional hyper-parameter(s) "
            f"({', '.join(names) or 'none'}), but {len(args)} were given; pass the rest by name"
        )
    bound = dict(kwargs)
    for name, value in zip(names, args, strict=False):
        if name in bound:
            raise TypeError(f"{owner}() got multiple values for argument {name!r} (by position and by name)")
        bound[name] = value
    return bound


def constructor_signature(names: Sequence[str], defaults: Mapping[str, Any]) -> inspect.Signature:
    """The constructor's signature: the backbone, ``names`` by position or name, every other field by name only."""
    every = {**defaults, **CONSTRUCTOR_OPTIONS}
    params = [inspect.Parameter("backbone_model", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=every[n]) for n in names]
    params += [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d) for n, d in every.items() if n not in names
    ]
    return inspect.Signature(params)
