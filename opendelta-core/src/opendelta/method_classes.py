"""``XxxModel`` / ``XxxConfig`` looked up among the installed plugins: one resolver for every lazy namespace.

``opendelta``, ``opendelta.delta_models`` and 0.3.2's per-method modules (``opendelta.delta_models.lora``) all
serve the classes of installed plugins by name, on first access, through the registry. A name that a plugin could
provide but none does raises :class:`~opendelta.errors.DeltaMethodNotInstalledError` naming the distribution to
install; any other name (core's own classes among them) is a plain ``AttributeError``, so a typo of a core name
is never answered with "install opendelta-xxx".
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

from opendelta.errors import DeltaMethodNotInstalledError
from opendelta.install_hint import install_hint
from opendelta.registry import distribution_hint, list_methods

__all__ = ["CORE_CLASSES", "METHOD_CLASS", "could_be_plugin_class", "method_class", "namespace_attributes"]

METHOD_CLASS = re.compile(r"^[A-Z][A-Za-z0-9]*(Model|Config)$")
"""The shape of a delta method's class name: a plugin registers an ``XxxModel`` and an ``XxxConfig``."""

CORE_CLASSES = frozenset({"AutoDeltaConfig", "AutoDeltaModel", "BaseDeltaConfig", "DeltaConfig", "DeltaModel"})
"""Names of that shape that are core's (today's and 0.3.2's), never a plugin's."""


def could_be_plugin_class(name: str) -> bool:
    """Whether ``name`` is one a plugin could provide (so its absence means a plugin is missing)."""
    return bool(METHOD_CLASS.match(name)) and name not in CORE_CLASSES


def _installed(name: str) -> type | None:
    for spec in list_methods():
        for cls in (spec.model_cls, spec.config_cls):
            if cls.__name__ == name:
                return cls
    return None


def method_class(name: str, where: str = "opendelta") -> type:
    """The installed plugin class called ``name``, for ``from <where> import <name>``.

    Matching is by class name, not ``delta_type``, so a method renamed or aliased in the registry is found all
    the same (``LowRankAdapterModel``).

    Raises:
        AttributeError: ``name`` is not a name a plugin could provide.
        DeltaMethodNotInstalledError: no installed plugin provides it; the message names the pip command.
    """
    if not could_be_plugin_class(name):
        raise AttributeError(f"module {where!r} has no attribute {name!r}")
    cls = _installed(name)
    if cls is not None:
        return cls
    installed = ", ".join(s.model_cls.__name__ for s in list_methods()) or "none"
    raise DeltaMethodNotInstalledError(
        f"cannot import {name!r} from {where}: no installed plugin provides it (installed methods: {installed}). "
        f"Install its plugin: {install_hint(distribution_hint(name))}"
    )


def namespace_attributes(where: str, names: Iterable[str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module's ``__getattr__`` and ``__dir__`` serving exactly ``names`` (plugin classes) from the registry.

    For 0.3.2's ``opendelta.delta_models.<method>`` modules: ``lora`` serves ``LoraModel`` and ``LoraConfig``;
    any other name is a plain ``AttributeError``.
    """
    served = frozenset(names)

    def __getattr__(name: str) -> Any:
        if name not in served:
            raise AttributeError(f"module {where!r} has no attribute {name!r}")
        return method_class(name, where)

    def __dir__() -> list[str]:  # only what getattr can return: pydoc and inspect.getmembers walk dir()
        available = {name for name in served if _installed(name) is not None}
        return sorted(available | set(vars(sys.modules[where])))

    return __getattr__, __dir__
