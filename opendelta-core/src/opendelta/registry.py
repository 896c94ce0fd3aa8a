"""The registry: the only list of delta methods and common-structure mappings, filled by plugin hooks.

There is no enum of methods in core. Each ``register_delta_methods`` implementation is called with a ``register``
callback bound to its plugin, so a bad registration is reported naming that plugin; one bad plugin never stops the
others from registering.
"""

from __future__ import annotations

import difflib
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opendelta import plugins
from opendelta.errors import StructureNotFoundError, StructureValidationError, UnknownDeltaMethodError
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


def distribution_hint(method_or_class: str) -> str:
    """The distribution that provides a first-party method (``lora`` or ``LoraModel`` -> ``opendelta-lora``)."""
    stem = re.sub(r"(Model|Config)$", "", method_or_class)
    kebab = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", stem).lower().replace("_", "-")
    return "opendelta-" + {"bit-fit": "bitfit", "lowrankadapter": "low-rank-adapter"}.get(kebab, kebab)


def _call_each(hook_name: str, make_register: Any) -> None:
    hook = getattr(plugins.pm.hook, hook_name)
    for impl in hook.get_hookimpls():
        register = make_register(impl.plugin_name)
        try:
            impl.function(**{arg: register for arg in impl.argnames})
        except Exception as exc:
            plugins.warn_plugin(impl.plugin_name, f"raised inside {hook_name} ({type(exc).__name__}: {exc})")


def _collect_methods() -> dict[str, MethodSpec]:
    from opendelta.base import DeltaConfig, DeltaModel

    methods: dict[str, MethodSpec] = {}
    attr_owner: dict[str, str] = {}

    def make_register(plugin_name: str) -> Any:
        def register(name: str, config_cls: type, model_cls: type, *, aliases: tuple[str, ...] = ()) -> None:
            problem = None
            if not isinstance(name, str) or not METHOD_NAME.match(name):
                problem = f"method name {name!r} must match {METHOD_NAME.pattern}"
            elif not (isinstance(config_cls, type) and issubclass(config_cls, DeltaConfig)):
                problem = f"config class for {name!r} must subclass opendelta.DeltaConfig, got {config_cls!r}"
            elif not (isinstance(model_cls, type) and issubclass(model_cls, DeltaModel)):
                problem = f"model class for {name!r} must subclass opendelta.DeltaModel, got {model_cls!r}"
            elif name in methods or name in _aliases:
                owner = methods[name].plugin if name in methods else methods[_aliases[name]].plugin
                problem = f"method {name!r} is already registered by plugin {owner!r}; this one was ignored"
            elif model_cls.delta_name in attr_owner:
                problem = (
                    f"delta attribute name {model_cls.delta_name!r} of {model_cls.__name__} is already used by "
                    f"method {attr_owner[model_cls.delta_name]!r}; this one was ignored"
                )
            if problem:
                plugins.warn_plugin(plugin_name, problem)
                return
            methods[name] = MethodSpec(name, config_cls, model_cls, plugin_name, tuple(aliases))
            attr_owner[model_cls.delta_name] = name
            for alias in aliases:
                _aliases.setdefault(alias, name)

        return register

    _aliases.clear()
    _call_each("register_delta_methods", make_register)
    return methods


def _collect_structures() -> dict[str, CommonStructure]:
    structures: dict[str, CommonStructure] = {}

    def make_register(plugin_name: str) -> Any:
        def register(document: dict[str, Any], *, source: str | None = None) -> None:
            where = f"{source} from plugin {plugin_name!r}" if source else f"from plugin {plugin_name!r}"
            try:
                structure = CommonStructure(document, source=where)
            except StructureValidationError as exc:
                plugins.warn_plugin(plugin_name, f"registered an invalid mapping: {exc}")
                return
            if structure.model_type in structures:
                first = structures[structure.model_type].source
                plugins.warn_plugin(
                    plugin_name,
                    f"a mapping for {structure.model_type!r} is already registered ({first}); {where} ignored",
                )
                return
            structures[structure.model_type] = structure

        return register

    _call_each("register_common_structures", make_register)
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
        f"method, install its plugin: pip install {distribution_hint(str(name))}"
    )


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
    document = plugins.pm.hook.resolve_common_structure(model=owner, model_type=model_type)
    if document is not None:
        return CommonStructure(document, source=f"resolve_common_structure for {model_type or type(model).__name__}")
    known = ", ".join(s.model_type for s in list_structures()) or "none"
    raise StructureNotFoundError(
        f"no common-structure mapping for {type(model).__name__} (model_type={model_type!r}); mapped model types: "
        f"{known}. Pass modified_modules=[...] with real module names (print them with "
        f"bigmodelvis.Visualization(model).structure_graph()), or install a plugin that maps this architecture."
    )
