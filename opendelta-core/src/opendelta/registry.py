"""The registry: the only list of delta methods and common-structure mappings, filled by plugin hooks.

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
from typing import TYPE_CHECKING, Any

from opendelta import plugins
from opendelta.errors import StructureNotFoundError, StructureValidationError, UnknownDeltaMethodError
from opendelta.install_hint import install_hint
from opendelta.structures import CommonStructure, find_config_model

if TYPE_CHECKING:
    from torch import nn

    from opendelta.base import DeltaConfig, DeltaModel

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
_aliases: dict[str, str] = {}
_structures: dict[str, CommonStructure] | None = None
_failed_resolvers: set[str] = set()
"""Plugins whose ``resolve_common_structure`` raised or returned garbage: warned about once, then skipped."""


def distribution_hint(method_or_class: str) -> str:
    """The distribution that provides a first-party method (``lora`` or ``LoraModel`` -> ``opendelta-lora``)."""
    return plugins.first_party_distribution(method_or_class)


def _call_each(hook_name: str, make_register: Any) -> None:
    hook = getattr(plugins.pm.hook, hook_name)
    for impl in hook.get_hookimpls():
        register = make_register(impl.plugin_name)
        try:
            impl.function(**{arg: register for arg in impl.argnames})
        except plugins.PLUGIN_ERRORS as exc:
            plugins.warn_plugin(impl.plugin_name, f"raised inside {hook_name} ({type(exc).__name__}: {exc})")


def _method_problem(name: Any, config_cls: Any, model_cls: Any, aliases: Any) -> str | None:
    """What is wrong with one ``register(...)`` call on its own (clashes with other plugins are checked later)."""
    from opendelta.base import DeltaConfig, DeltaModel

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
        def register(name: str, config_cls: type, model_cls: type, *, aliases: tuple[str, ...] = ()) -> None:
            problem = _method_problem(name, config_cls, model_cls, aliases)
            if problem:
                plugins.warn_plugin(plugin_name, problem)
                return
            pending.append(MethodSpec(name, config_cls, model_cls, plugin_name, tuple(aliases)))

        return register

    _aliases.clear()
    _call_each("register_delta_methods", make_register)
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


def _collect_structures() -> dict[str, CommonStructure]:
    pending: list[tuple[bool, int, str, CommonStructure]] = []

    def make_register(plugin_name: str) -> Any:
        def register(document: dict[str, Any], *, source: str | None = None) -> None:
            where = f"{source} from plugin {plugin_name!r}" if source else f"from plugin {plugin_name!r}"
            try:
                structure = CommonStructure(document, source=where)
            except plugins.PLUGIN_ERRORS as exc:  # a schema violation, or a document jsonschema cannot even walk
                detail = str(exc) if isinstance(exc, StructureValidationError) else f"{type(exc).__name__}: {exc}"
                plugins.warn_plugin(plugin_name, f"registered an invalid mapping, which was ignored: {detail}")
                return
            shipped = plugins.owns(plugin_name, "common_structures")  # opendelta-common-structures, core's own
            pending.append((not shipped, len(pending), plugin_name, structure))

        return register

    _call_each("register_common_structures", make_register)
    structures: dict[str, CommonStructure] = {}
    for _, _, plugin_name, structure in sorted(pending, key=lambda item: item[:2]):
        if structure.model_type in structures:
            plugins.warn_plugin(
                plugin_name,
                f"registered a mapping for {structure.model_type!r}, which is already registered "
                f"({structures[structure.model_type].source}); {structure.source} was ignored",
            )
            continue
        structures[structure.model_type] = structure
    return structures


def _ensure() -> tuple[dict[str, MethodSpec], dict[str, CommonStructure]]:
    global _methods, _structures
    with _lock:
        if _methods is None or _structures is None:
            plugins.load_plugins()
            _methods = _collect_methods()
            _structures = _collect_structures()
        return _methods, _structures


def reload() -> None:
    """Forget every plugin and registration; the next lookup loads the installed plugins again."""
    global _methods, _structures
    with _lock:
        plugins.reset_plugins()
        _methods = _structures = None
        _failed_resolvers.clear()


def list_methods() -> list[MethodSpec]:
    """Every registered delta method, sorted by name."""
    return sorted(_ensure()[0].values(), key=lambda spec: spec.name)


def get_method(name: str) -> MethodSpec:
    """The method registered as ``name`` (or an alias of it).

    Raises:
        UnknownDeltaMethodError: no installed plugin registers ``name``; the message lists the installed methods
            and the distribution to install.
    """
    methods, _ = _ensure()
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


def list_structures() -> list[CommonStructure]:
    """Every registered common-structure mapping, sorted by model type."""
    return sorted(_ensure()[1].values(), key=lambda s: s.model_type)


def get_structure(model_type: str) -> CommonStructure | None:
    """The registered mapping for ``model_type``, or ``None``."""
    return _ensure()[1].get(model_type)


def structure_for_model(model: nn.Module) -> CommonStructure:
    """The mapping that names ``model``'s modules: a registered one, else the first a plugin resolves.

    Raises:
        StructureNotFoundError: nothing maps this model; the message says how to proceed without a mapping.
    """
    located = find_config_model(model)
    model_type = located[1].config.model_type if located else None
    structure = get_structure(model_type) if model_type else None
    if structure is not None:
        return structure
    owner = located[1] if located else model
    structure = _resolve(owner, model_type, model_type or type(model).__name__)
    if structure is not None:
        return structure
    known = ", ".join(s.model_type for s in list_structures()) or "none"
    raise StructureNotFoundError(
        f"no common-structure mapping for {type(model).__name__} (model_type={model_type!r}); mapped model types: "
        f"{known}. Pass modified_modules=[...] with real module names (list them with `opendelta show "
        f"<model folder>`, which reads no weights), or install a plugin that maps this architecture (a clone of "
        f"OpenDelta has one for LLaMA in tests/third_party/opendelta-llama-structure)."
    )


def _resolve(model: nn.Module, model_type: str | None, what: str) -> CommonStructure | None:
    """The first valid document a ``resolve_common_structure`` implementation returns, in pluggy's call order.

    Each implementation is called on its own: one that raises or returns something that is not a valid mapping
    is warned about once (naming its distribution) and skipped until the next ``reload()``; the next one is tried.
    """
    _ensure()
    kwargs = {"model": model, "model_type": model_type}
    impls = [i for i in plugins.pm.hook.resolve_common_structure.get_hookimpls() if not (i.hookwrapper or i.wrapper)]
    for impl in reversed(impls):  # pluggy calls the last registered (and tryfirst) first
        name = impl.plugin_name
        if name in _failed_resolvers:
            continue
        try:
            document = impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            if document is None:
                continue
            return CommonStructure(document, source=f"resolve_common_structure for {what} from plugin {name!r}")
        except plugins.PLUGIN_ERRORS as exc:
            with _lock:
                _failed_resolvers.add(name)
            if isinstance(exc, StructureValidationError):
                problem = f"returned an invalid mapping from resolve_common_structure for {what}: {exc}"
            else:
                problem = f"raised inside resolve_common_structure for {what} ({type(exc).__name__}: {exc})"
            plugins.warn_plugin(name, f"{problem}; its resolver is skipped until opendelta.registry.reload()")
    return None
