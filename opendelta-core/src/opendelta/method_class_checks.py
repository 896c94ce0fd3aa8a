"""What ``DeltaModel.__init_subclass__`` checks and fills in when a method class is defined.

Model layer, below ``base``: the method's name is written once (the config's ``delta_type``) and read from there;
the attributes core relies on are refused at import time, naming the class and the attribute, instead of failing
(or, for ``insertion``, silently placing a replacement) at a user's call.
"""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING

from opendelta.config import DeltaConfig
from opendelta.errors import DeltaClassError
from opendelta.insertion import placement_kinds

if TYPE_CHECKING:
    from opendelta.base import DeltaModel

__all__ = ["check_class_attributes", "declare_names"]


def _declares(cls: type) -> bool:
    """Whether ``cls`` is a method class (``DeltaModel`` itself declares only the defaults)."""
    return not (cls.__name__ == "DeltaModel" and cls.__module__ == "opendelta.base")


_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def declare_names(cls: type[DeltaModel]) -> None:
    """Give ``cls`` the method name its config declares, unless a model class declares one (then they must agree).

    A name taken from the config is marked as such, so a subclass with another config takes that config's name,
    while a subclass of a class that wrote its own ``delta_type`` keeps it (and is refused with a foreign config).
    """
    config_type = getattr(cls.config_class, "delta_type", "") or ""
    declared = next(
        (
            vars(k)["delta_type"]
            for k in cls.__mro__
            if _declares(k) and "delta_type" in vars(k) and not vars(k).get("_delta_type_from_config", False)
        ),
        None,
    )
    if declared is None:
        if config_type:
            cls.delta_type = config_type
            cls._delta_type_from_config = True
    elif declared and config_type and declared != config_type:
        raise DeltaClassError(
            f"{cls.__name__}.delta_type is {declared!r} but its config_class {cls.config_class.__name__} is the "
            f"config of delta_type {config_type!r}; give the method a config class of its own (or write the name "
            f"once, as the config's delta_type, and declare none on the model)"
        )
    named = any(
        "delta_name" in vars(k) and not vars(k).get("_delta_name_from_config", False)
        for k in cls.__mro__
        if _declares(k)
    )
    if cls.delta_type and not named:
        cls.delta_name = cls.delta_type
        cls._delta_name_from_config = True


def check_class_attributes(cls: type[DeltaModel]) -> None:
    """Refuse, when the class is defined, the attributes core would otherwise trip over at a user's call."""
    kinds = placement_kinds()
    if cls.insertion not in kinds:
        close = difflib.get_close_matches(str(cls.insertion), kinds, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DeltaClassError(
            f"{cls.__name__}.insertion is {cls.insertion!r}{hint}; it must be one of {', '.join(map(repr, kinds))} "
            f"(a new kind is registered with opendelta.plugin_api.register_placement before the class is defined)"
        )
    if not (isinstance(cls.config_class, type) and issubclass(cls.config_class, DeltaConfig)):
        raise DeltaClassError(f"{cls.__name__}.config_class must be a DeltaConfig subclass, got {cls.config_class!r}")
    if cls.delta_type and not _NAME.match(cls.delta_type):
        raise DeltaClassError(f"{cls.__name__}.delta_type {cls.delta_type!r} must match {_NAME.pattern}")
    if not (isinstance(cls.delta_name, str) and cls.delta_name.isidentifier()):
        raise DeltaClassError(f"{cls.__name__}.delta_name {cls.delta_name!r} must be a Python identifier")
    fields = cls.low_rank_fields
    if fields is not None and not (
        isinstance(fields, tuple) and len(fields) == 2 and set(fields) <= set(cls.config_class.field_names())
    ):
        raise DeltaClassError(
            f"{cls.__name__}.low_rank_fields must be None or (rank field, alpha field) of "
            f"{cls.config_class.__name__}, got {fields!r}"
        )
    types = cls.supported_layer_types
    if callable(types) and not isinstance(types, type):
        return  # a function giving the tuple (linear_types), called when targets are checked
    if types is not None and not (isinstance(types, tuple) and all(isinstance(t, type) for t in types)):
        raise DeltaClassError(
            f"{cls.__name__}.supported_layer_types must be None, a tuple of module classes or a function returning "
            f"one, got {types!r}; override supports(module) for any other test"
        )
