"""Configs written for OpenDelta 0.3.2: a plain subclass of ``BaseDeltaConfig`` with an ``__init__`` of its own.

The manual's way to define a method's config is not a dataclass::

    class MyConfig(BaseDeltaConfig):
        def __init__(self, my_dim=8, **kwargs):
            super().__init__(**kwargs)
            self.my_dim = my_dim

``BaseDeltaConfig`` is :class:`opendelta.DeltaConfig`, so such a class inherits the shared fields, their type checks
and every method; this module tells :class:`~opendelta.DeltaConfig` which extra hyper-parameters it has: the
parameters of the ``__init__`` of each such class in its bases (in order, base first), with their defaults. They are
then fields like any other for ``to_dict``, ``from_dict``, ``config.json``, ``defaults()`` and equality.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import fields
from typing import Any

__all__ = ["classic_parameters"]

_SKIPPED = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


@functools.cache
def classic_parameters(cls: type) -> dict[str, Any]:
    """The hyper-parameters the non-dataclass classes among ``cls``'s bases add, each with its default.

    A parameter without a default maps to :data:`inspect.Parameter.empty`. A dataclass config (ours) has none.
    """
    declared = {f.name for f in fields(cls)}
    found: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__dataclass_fields__" in klass.__dict__ or "__init__" not in klass.__dict__:
            continue
        if not any(getattr(base, "__dataclass_fields__", None) for base in klass.__mro__[1:]):
            continue  # not a config class at all (object, a mixin)
        for i, param in enumerate(inspect.signature(klass.__init__).parameters.values()):
            if i == 0 or param.kind in _SKIPPED or param.name in declared:
                continue
            found.setdefault(param.name, param.default)
    return found
