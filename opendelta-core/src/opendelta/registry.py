"""The methods registry: the only list of delta methods, filled by plugin hooks (mappings: ``structure_registry``).

There is no enum of methods in core. Each ``register_delta_methods`` implementation is called with a ``register``
callback bound to its plugin, so a bad registration is reported naming that plugin; one bad plugin never stops the
others from registering. Every hook implementation is called on its own (not through ``pm.hook``), so that one that
raises or returns garbage is reported and skipped while the others still run.

When two plugins claim one name (a method, its delta attribute, an alias, a model type), the distribution named
after it keeps it (``opendelta-lora`` for ``lora``, ``opendelta-common-structures`` for the shipped mappings),
then the plugin registered first: a third-party plugin cannot shadow a first-party one by sorting before it.
"""

from __future__ import annotations

import difflib
import re
import threading
from dataclasses import dataclass
from typing import Any

from opendelta import plugins, structure_registry
from opendelta.base import DeltaModel
from opendelta.config import DeltaConfig
from opendelta.errors import UnknownDeltaMethodError
from opendelta.install_hint import install_hint
from opendelta.structure_registry import get_structure, list_structures, structure_for_model

__all__ = [
    "MethodSpec",
    "distribution_hint",
    "get_method",
    "get_structure",
    "list_methods",
    "list_structures",
    "registered_name",
    "reload",
    "structure_for_model",
]

METHOD_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class MethodSpec:
    """One registered delta method."""

    name: str
    config_cls: type[DeltaConfig]
    model_cls: type[DeltaModel]
    plugin: str
    aliases: tuple[str, ...] = ()

    @property
    def distribution(self) -> str | None:
        """The distribution that installed the method (``opendelta-lora``), when known."""
        return plugins.distribution_of(self.plugin)[0]


_lock = threading.RLock()
_methods: dict[str, MethodSpec] | None = None
_built_at = -1
"""The :func:`opendelta.plugins.generation` ``_methods`` was built at."""
_aliases: dict[str, str] = {}


def distribution_hint(method_or_class: str) -> str:
    """The distribution that provides a first-party method (``lora`` or ``LoraModel`` -> ``opendelta-lora``)."""
    return plugins.first_party_distribution(method_or_class)


def _method_problem(name: Any, config_cls: Any, model_cls: Any, aliases: Any) -> str | None:
    """What is wrong with one ``register(...)`` call on its own (clashes with other plugins are checked later)."""
    if not isinstance(name, str) or not METHOD_NAME.match(name):
        return f"registered method name {name!r}, which must match {METHOD_NAME.pattern}; it was ignored"
    if not (isinstance(config_cls, type) and issubclass(config_cls, DeltaConfig)):
        return f"registered a config class for {name!r} that does not subclass opendelta.DeltaConfig: {config_cls!r}"
    if not (isinstance(model_cls, type) and issubclass(model_cls, DeltaModel)):
        return f"registered a model class for {name!r} that does not subclass opendelta.DeltaModel: {model_cls!r}"
    for cls in (config_cls, model_cls):  # a saved config names its class by delta_type: it must come back here
        if cls.delta_type != name:
            return (
                f"registered method {name!r} with {cls.__name__}, whose delta_type is {cls.delta_type!r}; "
                f"configs it saves could not be loaded back, so it was ignored"
            )
    if isinstance(aliases, str) or not isinstance(aliases, (tuple, list)):
        return f"registered aliases for {name!r} as {aliases!r}, not a tuple of names; the method was ignored"
    bad = [alias for alias in aliases if not isinstance(alias, str) or not METHOD_NAME.match(alias)]
    if bad:
        return f"registered alias(es) {bad!r} for {name!r}, which must match {METHOD_NAME.pattern}; it was ignored"
    return None


def _collect_methods() -> dict[str, MethodSpec]:
    pending: list[MethodSpec] = []

    def make_register(plugin_name: str) -> Any:
        def register(
            name: Any, config_cls: Any = None, model_cls: Any = None, *, aliases: tuple[str, ...] = ()
        ) -> None:
            if config_cls is None and model_cls is None and isinstance(name, type) and issubclass(name, DeltaModel):
                name, config_cls, model_cls = name.delta_type, name.config_class, name  # register(ModelClass)
            problem = _method_problem(name, config_cls, model_cls, aliases)
            if problem is None:  # the config knows its aliases (a saved config may use one), so does the registry
                aliases = tuple(dict.fromkeys((*config_cls.delta_aliases, *aliases)))
                config_cls.delta_aliases = aliases
            if problem:
                plugins.warn_plugin(plugin_name, problem)
                return
            pending.append(MethodSpec(name, config_cls, model_cls, plugin_name, tuple(aliases)))

        return register

    _aliases.clear()
    plugins.call_each("register_delta_methods", make_register)
    methods: dict[str, MethodSpec] = {}
    attr_owner: dict[str, str] = {}
    accepted: list[MethodSpec] = []
    # sorted() is stable: among plugins that do not own the name, the first registered keeps it
    for spec in sorted(pending, key=lambda spec: not plugins.owns(spec.plugin, spec.name)):
        attr = spec.model_cls.delta_name
        if spec.name in methods:
            plugins.warn_plugin(
                spec.plugin,
                f"registered method {spec.name!r}, which is already registered by plugin "
                f"{methods[spec.name].plugin!r}; this one was ignored",
            )
        elif attr in attr_owner:
            plugins.warn_plugin(
                spec.plugin,
                f"registered method {spec.name!r} whose delta attribute name {attr!r} ({spec.model_cls.__name__}) is "
                f"already used by method {attr_owner[attr]!r}; this one was ignored",
            )
        else:
            methods[spec.name] = spec
            attr_owner[attr] = spec.name
            accepted.append(spec)
    for spec in accepted:  # after every method: a name always wins over another plugin's alias
        for alias in spec.aliases:
            taken = methods.get(alias) or methods.get(_aliases.get(alias, ""))
            if taken is not None and taken is not spec:
                plugins.warn_plugin(
                    spec.plugin,
                    f"registered alias {alias!r} for method {spec.name!r}, but {alias!r} already names method "
                    f"{taken.name!r} of plugin {taken.plugin!r}; the alias was ignored",
                )
            elif alias != spec.name:
                _aliases[alias] = spec.name
    return methods


def _ensure() -> dict[str, MethodSpec]:
    """The methods, collected on first use and after a reload.

    The mappings are collected with them, so a first lookup runs every plugin's registration hooks once and reports
    their problems together.
    """
    global _methods, _built_at
    with _lock:
        plugins.load_plugins()
        if _methods is None or _built_at != plugins.generation():
            _built_at = plugins.generation()
            _methods = _collect_methods()
        structure_registry.list_structures()
        return _methods


def reload() -> None:
    """Forget every plugin and registration; the next lookup loads the installed plugins again."""
    plugins.reset_plugins()


def list_methods() -> list[MethodSpec]:
    """Every registered delta method, sorted by name."""
    return sorted(_ensure().values(), key=lambda spec: spec.name)


def get_method(name: str) -> MethodSpec:
    """The method registered as ``name`` (or an alias of it).

    Raises:
        UnknownDeltaMethodError: no installed plugin registers ``name``; the message lists the installed methods
            and the distribution to install.
    """
    methods = _ensure()
    key = _aliases.get(name, name)
    if key in methods:
        return methods[key]
    installed = ", ".join(sorted(methods)) or "none"
    close = difflib.get_close_matches(str(name), list(methods) + list(_aliases), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownDeltaMethodError(
        f"unknown delta_type {name!r}.{hint} Installed delta methods: {installed}. If {name!r} is an OpenDelta "
        f"method, install its plugin: {install_hint(distribution_hint(str(name)))}"
    )


def registered_name(name: str) -> str:
    """The name ``name`` is registered under: itself, or the method an alias names.

    ``lowrankadapter`` -> ``low_rank_adapter``; ``name`` unchanged when no installed method knows it.

    A saved ``delta_type`` is compared through this, so a checkpoint that names its method by an alias (one an
    earlier release wrote) is the method's own.
    """
    _ensure()
    return _aliases.get(name, name)
