"""Loading plugins: a lazy, tolerant entry-point loader around one pluggy ``PluginManager``.

Plugins are found through ``importlib.metadata`` entry points in the ``opendelta`` group (the entry-point name is the
plugin name). We do not use pluggy's ``load_setuptools_entrypoints``: a plugin that fails to import must only cost a
warning naming its distribution, and a second plugin with the same name must be reported, not silently skipped.
Every such warning is one sentence that names the plugin, its distribution and version, and the
``OPENDELTA_DISABLE_PLUGINS=<name>`` setting that skips it; ``list_plugins()`` keeps the reason.

Environment variables (read at load time):

* ``OPENDELTA_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry-point plugin at all.
* ``OPENDELTA_LOAD_PLUGINS=a,b``: load only these plugins (entry-point names).
* ``OPENDELTA_DISABLE_PLUGINS=a,b``: skip these plugins.
* ``OPENDELTA_TRACE_PLUGINS=1``: print every hook call (pluggy tracing) to stderr.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy

from opendelta import hookspecs
from opendelta.errors import OpenDeltaPluginWarning
from opendelta.install_hint import SHIPPED

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
DEFAULT_PLUGINS: dict[str, str] = {
    "structure_inference": "opendelta.structure_inference",
    "quantization_backends": "opendelta.quantization_backends",
}
"""Core's own hook implementations (name -> module), registered before the entry points: the last-resort mapping
inference and the quantization backends of the common libraries, since every method and every mapping comes from a
distribution. ``OPENDELTA_DISABLE_PLUGINS``
turns one off by name (``structure_inference``: a model no mapping covers is then refused); they are core, not
entry points, so :func:`list_plugins` and ``opendelta plugins`` leave them out."""

PLUGIN_ERRORS: tuple[type[BaseException], ...] = (Exception, SystemExit)
"""What a plugin may raise without taking the program down (a ``sys.exit()`` at import time included)."""

_DISABLE_ENV = "OPENDELTA_DISABLE_PLUGINS"

pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
pm.add_hookspecs(hookspecs)

_lock = threading.RLock()
_loaded = False
_generation = 0
"""Bumped by :func:`reset_plugins`: lookups built from the hooks (methods, mappings) rebuild when it changed."""


@dataclass(frozen=True)
class PluginInfo:
    """What ``list_plugins()`` reports about one plugin (``error``: why it failed or what it did wrong)."""

    name: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]
    error: str | None = None


@dataclass
class _LoadState:
    distributions: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    failed: list[PluginInfo] = field(default_factory=list)
    problems: dict[str, list[str]] = field(default_factory=dict)


_state = _LoadState()


def _env_list(name: str) -> set[str]:
    return {item.strip() for item in os.environ.get(name, "").split(",") if item.strip()}


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def normalize_distribution_name(name: str) -> str:
    """``Opendelta_Lora`` -> ``opendelta-lora`` (PEP 503), so that names from METADATA and hints compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def first_party_distribution(name: str) -> str:
    """The distribution named after a method or plugin (``lora``/``LoraModel`` -> ``opendelta-lora``).

    It doubles as the owner of that name: when two plugins claim it, the distribution named after it keeps it, so
    a third-party plugin cannot shadow ``lora`` or the shipped ``common_structures`` however it sorts.
    """
    stem = re.sub(r"(Model|Config)$", "", name)
    kebab = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", stem).lower().replace("_", "-")
    squashed = _squashed(kebab)
    return _SHIPPED_BY_SQUASHED.get(squashed) or SHIPPED_BESIDE.get(squashed, "opendelta-" + kebab)


def _squashed(name: str) -> str:
    """A name without case or separators, so the spellings of one method compare equal.

    ``BitFit``, ``bit-fit`` and ``bitfit`` are one, as are ``LowRankAdapter``, ``low_rank_adapter`` and
    ``lowrankadapter`` (the spellings a class, a method and an older release use).
    """
    return re.sub(r"[-_.]", "", name).lower()


_SHIPPED_BY_SQUASHED = {_squashed(dist.removeprefix("opendelta-")): dist for dist in SHIPPED}
SHIPPED_BESIDE = {"boft": "opendelta-oft"}
"""First-party methods shipped in a distribution named after another (BOFT beside OFT), by squashed name."""


def owns(plugin_name: str, name: str) -> bool:
    """Whether ``plugin_name`` comes from the distribution named after ``name`` (:func:`first_party_distribution`)."""
    dist = _state.distributions.get(plugin_name, (None, None))[0]
    return dist is not None and normalize_distribution_name(dist) == first_party_distribution(name)


def _sentence(plugin_name: str, dist: str | None, version: str | None, problem: str, advice: str | None) -> str:
    owner = f"OpenDelta plugin {plugin_name!r}"
    if dist:
        owner += f" from distribution {dist}" + (f" {version}" if version else "")
    advice = advice or f"set {_DISABLE_ENV}={plugin_name} to skip it"
    return f"{owner} {' '.join(problem.split())}; core and the other plugins keep working ({advice})."


def _warn(message: str) -> None:
    warnings.warn(message, OpenDeltaPluginWarning, stacklevel=4)


def warn_plugin(plugin_name: str, problem: str) -> None:
    """Warn that the loaded plugin ``plugin_name`` misbehaved, and keep ``problem`` for ``list_plugins()``.

    ``problem`` is a verb phrase (``"raised inside register_delta_methods (RuntimeError: boom)"``); the warning
    adds the distribution and how to switch the plugin off. It is recorded before warning, so that the report
    stays complete when warnings are turned into errors.
    """
    dist, version = _state.distributions.get(plugin_name, (None, None))
    _state.problems.setdefault(plugin_name, []).append(" ".join(problem.split()))
    _warn(_sentence(plugin_name, dist, version, problem, None))


def _fail(
    name: str, dist: str | None, version: str | None, problem: str, reason: str | None = None, advice: str | None = None
) -> None:
    """Record a plugin that is not loaded at all, then warn about it."""
    _state.failed.append(PluginInfo(name, dist, version, (), reason or " ".join(problem.split())))
    _warn(_sentence(name, dist, version, problem, advice))


def _forget(plugin: object, name: str) -> None:
    """Undo a half-done ``pm.register`` (pluggy < 1.6 adds hooks one by one before validating the next)."""
    if pm.get_plugin(name) is plugin:
        pm.unregister(plugin)


def _register(plugin: object, name: str) -> None:
    dist, version = _state.distributions.get(name, (None, None))
    if plugin is None:  # pluggy would silently ignore it: say why nothing of this plugin shows up
        _fail(name, dist, version, "resolved to None instead of a module or object with hook implementations")
        return
    try:
        pm.register(plugin, name=name)
    except PLUGIN_ERRORS as exc:
        _forget(plugin, name)
        _fail(name, dist, version, f"could not be registered ({type(exc).__name__}: {exc})")


def _distribution_id(dist: metadata.Distribution | None) -> tuple[str | None, str | None]:
    if dist is None:
        return None, None
    try:
        return dist.metadata["Name"], dist.version
    except PLUGIN_ERRORS:  # an unreadable METADATA still lets the plugin load; it is just not named
        return None, None


def _load_entry_point(ep: metadata.EntryPoint) -> None:
    dist_name, dist_version = _distribution_id(ep.dist)
    _state.distributions[ep.name] = (dist_name, dist_version)
    try:
        plugin = ep.load()
    except PLUGIN_ERRORS as exc:
        reason = f"{type(exc).__name__}: {exc}"
        _fail(ep.name, dist_name, dist_version, f"failed to import {ep.value} ({reason})", reason)
        return
    _register(plugin, ep.name)


def _load_group(entry_points: list[metadata.EntryPoint]) -> None:
    """Load the plugins named ``entry_points[0].name``: one of them, the others are reported as shadowed."""
    name = entry_points[0].name
    first_party = first_party_distribution(name)
    chosen = next(
        (ep for ep in entry_points if normalize_distribution_name(_distribution_id(ep.dist)[0] or "") == first_party),
        entry_points[0],
    )
    _load_entry_point(chosen)
    kept, kept_version = _state.distributions[name]
    for ep in entry_points:
        if ep is not chosen:
            dist_name, version = _distribution_id(ep.dist)
            _fail(
                name,
                dist_name,
                version,
                f"was not loaded because distribution {kept} {kept_version} already provides a plugin of that name",
                advice=f"uninstall one of them, or set {_DISABLE_ENV}={name} to skip both",
            )


def _unregister_unknown_hooks() -> None:
    """Unregister, one by one, every plugin that implements a hook OpenDelta does not define (a misspelled name)."""
    for _ in range(len(pm.get_plugins()) + 1):
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin) or repr(exc.plugin)
            pm.unregister(exc.plugin)
            dist, version = _state.distributions.get(name, (None, None))
            _fail(name, dist, version, f"implements an unknown hook ({exc}) and was unregistered")
        else:
            return


def load_plugins() -> None:
    """Register the default plugins and every installed entry-point plugin, once.

    Idempotent and thread-safe; the registry calls it on first use, so importing ``opendelta`` loads nothing.
    """
    global _loaded
    with _lock:
        if _loaded:
            return
        _loaded = True
        if _truthy("OPENDELTA_TRACE_PLUGINS"):
            pm.trace.root.setwriter(lambda text: sys.stderr.write(text))
            pm.enable_tracing()
        allow, deny = _env_list("OPENDELTA_LOAD_PLUGINS"), _env_list(_DISABLE_ENV)
        for name, module_name in DEFAULT_PLUGINS.items():
            if name not in deny:
                module: ModuleType = __import__(module_name, fromlist=["_"])
                _register(module, name)
        if _truthy("OPENDELTA_DISABLE_PLUGIN_AUTOLOAD"):
            return
        groups: dict[str, list[metadata.EntryPoint]] = {}
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if not ((allow and ep.name not in allow) or ep.name in deny):
                groups.setdefault(ep.name, []).append(ep)
        for name in sorted(groups):
            _load_group(groups[name])
        _unregister_unknown_hooks()


def distribution_of(plugin_name: str) -> tuple[str | None, str | None]:
    """The (distribution name, version) that provided ``plugin_name``, or ``(None, None)``."""
    load_plugins()
    return _state.distributions.get(plugin_name, (None, None))


def distribution_of_package(package: str) -> str | None:
    """The distribution of the loaded plugin whose module lives in import package ``package``, or ``None``.

    ``opendelta_lora`` -> ``opendelta-lora``: the distribution that provides a class defined in that package, as
    its entry point says (a plugin registered in code, with no distribution, gives ``None``).
    """
    load_plugins()
    for name, plugin in pm.list_name_plugin():
        module = plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__module__
        if module.split(".")[0] == package:
            return _state.distributions.get(name, (None, None))[0]
    return None


def list_plugins() -> list[PluginInfo]:
    """Every plugin: the loaded ones with their hooks, then those that failed with the reason.

    A loaded plugin whose hooks raised or registered something invalid carries that in ``error`` (once the registry
    has been used: its hooks run on the first lookup).
    """
    load_plugins()
    infos = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        if plugin is None or name in DEFAULT_PLUGINS:  # a name blocked with pm.set_blocked; core's own
            continue
        callers = pm.get_hookcallers(plugin) or []
        dist, version = _state.distributions.get(name, (None, None))
        error = "; ".join(_state.problems.get(name, ())) or None
        infos.append(PluginInfo(name, dist, version, tuple(sorted(c.name for c in callers)), error))
    return infos + list(_state.failed)


def reset_plugins() -> None:
    """Forget every loaded plugin so that the next use loads them again (for tests and interactive sessions)."""
    global _loaded, _generation
    with _lock:
        for _name, plugin in list(pm.list_name_plugin()):
            if plugin is not None:
                pm.unregister(plugin)
        _state.distributions.clear()
        _state.failed.clear()
        _state.problems.clear()
        _loaded = False
        _generation += 1


def generation() -> int:
    """How many times the plugins were reset: a cache of what their hooks registered is stale once this changed."""
    return _generation


def call_each(hook_name: str, make_argument: Callable[[str], Any]) -> None:
    """Call every implementation of ``hook_name`` on its own, with ``make_argument(plugin_name)`` for each argument.

    Not through ``pm.hook``: one implementation that raises (or calls ``sys.exit``) is reported as a warning naming
    its distribution (:func:`warn_plugin`), and the others still run.
    """
    load_plugins()
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        argument = make_argument(impl.plugin_name)
        try:
            impl.function(**{arg: argument for arg in impl.argnames})
        except PLUGIN_ERRORS as exc:
            warn_plugin(impl.plugin_name, f"raised inside {hook_name} ({type(exc).__name__}: {exc})")
