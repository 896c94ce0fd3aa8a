"""Loading plugins: a lazy, tolerant entry-point loader around one pluggy ``PluginManager``.

Plugins are found through ``importlib.metadata`` entry points in the ``opendelta`` group (the entry-point name is the
plugin name). We do not use pluggy's ``load_setuptools_entrypoints``: a plugin that fails to import must only cost a
warning naming its distribution, and a second plugin with the same name must be reported, not silently skipped.

Environment variables (read at load time):

* ``OPENDELTA_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry-point plugin at all.
* ``OPENDELTA_LOAD_PLUGINS=a,b``: load only these plugins (entry-point names).
* ``OPENDELTA_DISABLE_PLUGINS=a,b``: skip these plugins.
* ``OPENDELTA_TRACE_PLUGINS=1``: print every hook call (pluggy tracing) to stderr.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType

import pluggy

from opendelta import hookspecs
from opendelta.errors import OpenDeltaPluginWarning

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
DEFAULT_PLUGINS: tuple[str, ...] = ()
"""Modules registered before the entry points (none: every method and mapping comes from a distribution)."""

_DISABLE_ENV = "OPENDELTA_DISABLE_PLUGINS"

pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
pm.add_hookspecs(hookspecs)

_lock = threading.RLock()
_loaded = False


@dataclass(frozen=True)
class PluginInfo:
    """What ``list_plugins()`` reports about one plugin."""

    name: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]
    error: str | None = None


@dataclass
class _LoadState:
    distributions: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    failed: list[PluginInfo] = field(default_factory=list)


_state = _LoadState()


def _env_list(name: str) -> set[str]:
    return {item.strip() for item in os.environ.get(name, "").split(",") if item.strip()}


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def warn_plugin(plugin_name: str, problem: str) -> None:
    """Warn that ``plugin_name`` misbehaved, naming its distribution and how to switch it off."""
    dist, version = _state.distributions.get(plugin_name, (None, None))
    owner = f"plugin {plugin_name!r}" + (f" (distribution {dist} {version})" if dist else "")
    warnings.warn(
        f"OpenDelta {owner}: {problem}. Core and the other plugins keep working; "
        f"to skip this plugin set {_DISABLE_ENV}={plugin_name}.",
        OpenDeltaPluginWarning,
        stacklevel=3,
    )


def _register(plugin: object, name: str) -> bool:
    try:
        pm.register(plugin, name=name)
    except (pluggy.PluginValidationError, ValueError) as exc:
        warn_plugin(name, f"could not be registered: {exc}")
        _state.failed.append(PluginInfo(name, *_state.distributions.get(name, (None, None)), (), str(exc)))
        return False
    return True


def _load_entry_point(ep: metadata.EntryPoint) -> None:
    dist = ep.dist
    dist_name = dist.metadata["Name"] if dist is not None else None
    dist_version = dist.version if dist is not None else None
    if ep.name in _state.distributions:
        first = _state.distributions[ep.name][0]
        warn_plugin(
            ep.name, f"the name is also claimed by distribution {dist_name}, which was not loaded (first: {first})"
        )
        return
    _state.distributions[ep.name] = (dist_name, dist_version)
    try:
        plugin = ep.load()
    except Exception as exc:
        warn_plugin(ep.name, f"failed to import ({type(exc).__name__}: {exc})")
        _state.failed.append(PluginInfo(ep.name, dist_name, dist_version, (), f"{type(exc).__name__}: {exc}"))
        return
    _register(plugin, ep.name)


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
        for module_name in DEFAULT_PLUGINS:
            module: ModuleType = __import__(module_name, fromlist=["_"])
            _register(module, module_name)
        if _truthy("OPENDELTA_DISABLE_PLUGIN_AUTOLOAD"):
            return
        allow, deny = _env_list("OPENDELTA_LOAD_PLUGINS"), _env_list(_DISABLE_ENV)
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if (allow and ep.name not in allow) or ep.name in deny:
                continue
            _load_entry_point(ep)
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin) or repr(exc.plugin)
            warn_plugin(name, f"implements an unknown hook ({exc}); it was unregistered")
            pm.unregister(exc.plugin)


def distribution_of(plugin_name: str) -> tuple[str | None, str | None]:
    """The (distribution name, version) that provided ``plugin_name``, or ``(None, None)``."""
    load_plugins()
    return _state.distributions.get(plugin_name, (None, None))


def list_plugins() -> list[PluginInfo]:
    """Every plugin: the loaded ones with their hooks, then those that failed with the reason."""
    load_plugins()
    infos = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        callers = pm.get_hookcallers(plugin) or []
        dist, version = _state.distributions.get(name, (None, None))
        infos.append(PluginInfo(name, dist, version, tuple(sorted(c.name for c in callers))))
    return infos + list(_state.failed)


def reset_plugins() -> None:
    """Forget every loaded plugin so that the next use loads them again (for tests and interactive sessions)."""
    global _loaded
    with _lock:
        for _name, plugin in list(pm.list_name_plugin()):
            pm.unregister(plugin)
        _state.distributions.clear()
        _state.failed.clear()
        _loaded = False
