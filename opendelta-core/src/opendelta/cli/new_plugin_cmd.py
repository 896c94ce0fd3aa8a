"""``opendelta new-plugin NAME``: scaffold a third-party delta-method distribution (see ``opendelta.scaffold``)."""

from __future__ import annotations

import argparse
from typing import Any

from opendelta.cli.common import CommandError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register the ``new-plugin`` command."""
    parser = subparsers.add_parser(
        "new-plugin",
        help="scaffold a delta-method plugin distribution whose tests run the conformance battery",
        description="Create opendelta-NAME/: a complete plugin distribution (pyproject with the entry point, "
        "config, layer, model, hook, README, and tests running the conformance battery) implementing a small "
        "working method to replace with yours. The generated tests pass as generated.",
    )
    parser.add_argument("name", metavar="NAME", help="the method name: lowercase words joined by '_' or '-'")
    parser.add_argument(
        "--output", default=".", metavar="DIR", help="existing folder to create opendelta-NAME/ in (default: .)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Check that the name is free, write the distribution, print the next steps."""
    from opendelta.registry import list_methods
    from opendelta.scaffold import plugin_names, scaffold

    names = plugin_names(args.name)
    for spec in list_methods():
        if names.method in (spec.name, *spec.aliases) or names.method == spec.model_cls.delta_name:
            raise CommandError(
                f"the name {names.method!r} is taken by the installed method {spec.name!r} "
                f"({spec.distribution or 'plugin ' + spec.plugin}); pick another name"
            )
    folder = scaffold(args.name, args.output)
    print(f"created {folder} (method {names.method!r}, import name {names.package}, class {names.class_prefix}Model)")
    print("next steps:")
    print(f"  pip install -e {folder} 'opendelta-core[testing]'     # [testing]: pytest and hypothesis")
    print(f"  pytest {folder / 'tests'}     # the conformance battery on seven architectures")
    return 0
