"""The ``opendelta`` command line (also ``python -m opendelta``).

Commands: ``plugins``, ``show``, ``inspect``, ``merge``, ``new-plugin``; ``opendelta COMMAND --help`` describes
each. Exit status: 0 on success, 2 for a usage error (argparse), 1 for an error, reported as one line on stderr
without a traceback (``--traceback`` shows it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import import_module

from opendelta.cli.common import CommandError, one_line
from opendelta.errors import OpenDeltaError

__all__ = ["COMMANDS", "CommandError", "build_parser", "main"]

COMMANDS: dict[str, tuple[str, str]] = {
    "plugins": (
        "opendelta.cli.plugins_cmd",
        "list delta methods, structure mappings and plugins (with distributions, versions and failures)",
    ),
    "show": (
        "opendelta.cli.show_cmd",
        "print a model's module tree (or its common-structure view with --common); reads no weights",
    ),
    "inspect": (
        "opendelta.cli.inspect_cmd",
        "describe a delta checkpoint (config, tensors, parameter counts, backbone, versions) and verify it",
    ),
    "merge": (
        "opendelta.cli.merge_cmd",
        "bake a mergeable delta (LoRA, BitFit) into a backbone and save a plain transformers model",
    ),
    "new-plugin": (
        "opendelta.cli.new_plugin_cmd",
        "scaffold a delta-method plugin distribution whose tests run the conformance battery",
    ),
}
"""Each command's module and one-line help. A command's module (torch, transformers...) is imported only when that
command runs or its own ``--help`` is asked for, so ``opendelta --help`` answers without importing torch; a test
checks that each module's ``add_parser`` gives the same help."""


def _command_in(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names (its first argument that is not an option), if it is one of :data:`COMMANDS`."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def build_parser(only: str | None = None, *, stubs: bool = False) -> argparse.ArgumentParser:
    """The argument parser: every command registered, or (``stubs``) only ``only`` in full and the others by name."""
    from opendelta import __version__

    parser = argparse.ArgumentParser(
        prog="opendelta",
        description="OpenDelta: inspect plugins, models and delta checkpoints; merge deltas; scaffold plugins.",
    )
    parser.add_argument("--version", action="version", version=f"opendelta-core {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        if stubs and name != only:
            subparsers.add_parser(name, help=help_text)
        else:
            import_module(module).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_in(argv), stubs=True)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2): argparse already printed why
        return exc.code if isinstance(exc.code, int) else 2
    try:
        status: int = args.run(args)
    except (OpenDeltaError, OSError) as exc:
        if args.traceback:
            raise
        what = "error" if isinstance(exc, OpenDeltaError) else type(exc).__name__
        print(f"opendelta {args.command}: {what}: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"opendelta {args.command}: interrupted", file=sys.stderr)
        return 130
    return status
