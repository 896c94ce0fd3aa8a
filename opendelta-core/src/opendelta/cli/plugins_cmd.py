"""``opendelta plugins``: what is installed, where it comes from, and what failed to load.

The report comes from the registry itself (the same lookups ``LoraModel(...)`` does), so it shows exactly what a
program would get: each method and common-structure mapping with the plugin and distribution that provide it, and
each plugin that could not be loaded or registered something invalid, with the reason.
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
from typing import Any

from opendelta import plugins, registry
from opendelta.cli.common import format_table, one_line
from opendelta.errors import OpenDeltaPluginWarning
from opendelta.install_hint import install_hint
from opendelta.structures import CommonStructure

__all__ = ["add_parser", "collect", "run"]

_SOURCE_PLUGIN = re.compile(r"from plugin '([^']+)'$")


def add_parser(subparsers: Any) -> None:
    """Register the ``plugins`` command."""
    parser = subparsers.add_parser(
        "plugins",
        help="list delta methods, structure mappings and plugins (with distributions, versions and failures)",
        description="List installed delta methods, common-structure mappings and plugins, with the distribution "
        "and version that provide each, and every plugin that failed to load, with the reason.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.set_defaults(run=run)


def _dist(plugin_name: str | None) -> dict[str, str | None]:
    dist, version = plugins.distribution_of(plugin_name) if plugin_name else (None, None)
    return {"distribution": dist, "version": version}


def _structure_entry(structure: CommonStructure) -> dict[str, Any]:
    match = _SOURCE_PLUGIN.search(structure.source or "")
    plugin = match.group(1) if match else None
    return {
        "model_type": structure.model_type,
        "architectures": list(structure.architectures),
        "source": structure.source,
        "plugin": plugin,
        **_dist(plugin),
    }


def collect() -> dict[str, Any]:
    """Everything the command prints, as plain data (also the ``--json`` document).

    Problems reported while loading (an import error, an invalid mapping, a name clash) are captured and listed
    under ``problems`` instead of being printed as Python warnings.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OpenDeltaPluginWarning)
        methods = registry.list_methods()
        structures = registry.list_structures()
        infos = plugins.list_plugins()
    problems = [str(w.message) for w in caught if issubclass(w.category, OpenDeltaPluginWarning)]
    for w in caught:  # anything else (a library's deprecation notice) is not ours to hide
        if not issubclass(w.category, OpenDeltaPluginWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return {
        "methods": [
            {
                "name": spec.name,
                "model_class": spec.model_cls.__name__,
                "config_class": spec.config_cls.__name__,
                "aliases": list(spec.aliases),
                "plugin": spec.plugin,
                **_dist(spec.plugin),
            }
            for spec in methods
        ],
        "structures": [_structure_entry(s) for s in structures],
        "plugins": [
            {
                "name": p.name,
                "distribution": p.distribution,
                "version": p.version,
                "hooks": list(p.hooks),
                "error": p.error,
            }
            for p in infos
        ],
        "problems": problems,
    }


def _owner(entry: dict[str, Any]) -> str:
    if entry["distribution"]:
        return f"{entry['distribution']} {entry['version']}"
    return f"plugin {entry['plugin']}" if entry.get("plugin") else "-"


def _render(report: dict[str, Any]) -> str:
    out = []
    methods = report["methods"]
    out.append(f"Delta methods ({len(methods)}):")
    if methods:
        rows = [(m["name"], m["model_class"], m["config_class"], _owner(m)) for m in methods]
        out.append(format_table(("name", "class", "config", "distribution"), rows))
    else:
        out.append(f"  none installed ({install_hint('opendelta-lora')}; likewise opendelta-adapter, ...)")
    structures = report["structures"]
    out.append(f"\nCommon-structure mappings ({len(structures)}):")
    if structures:
        rows = [(s["model_type"], ", ".join(s["architectures"]), _owner(s)) for s in structures]
        out.append(format_table(("model_type", "architectures", "distribution"), rows))
    else:
        out.append(f"  none ({install_hint('opendelta-common-structures')})")
    # a plugin with hooks is loaded even when one of them misbehaved (that shows under "Problems" below)
    loaded = [p for p in report["plugins"] if p["hooks"] or not p["error"]]
    out.append(f"\nPlugins, entry-point group '{plugins.ENTRY_POINT_GROUP}' ({len(loaded)} loaded):")
    if loaded:
        rows = [(p["name"], p["distribution"] or "-", p["version"] or "-", ", ".join(p["hooks"])) for p in loaded]
        out.append(format_table(("name", "distribution", "version", "hooks"), rows))
    failed = [p for p in report["plugins"] if p not in loaded]
    if failed:
        out.append(f"\nPlugins that failed to load ({len(failed)}):")
        rows = [(p["name"], p["distribution"] or "-", p["version"] or "-", one_line(p["error"])) for p in failed]
        out.append(format_table(("name", "distribution", "version", "reason"), rows))
    if report["problems"]:
        out.append(f"\nProblems reported while loading ({len(report['problems'])}):")
        out.extend(f"  - {one_line(problem)}" for problem in report["problems"])
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    """Print the report; the exit status is 0 even when a plugin failed (the report says so)."""
    report = collect()
    print(json.dumps(report, indent=2) if args.json else _render(report))
    return 0
