"""The ``opendelta`` command line (also ``python -m opendelta``).

Commands: ``plugins``, ``show``, ``inspect``, ``merge``, ``new-plugin``; ``opendelta COMMAND --help`` describes
each. Exit status: 0 on success, 2 for a usage error (argparse), 1 for an error, reported as one line on stderr
without a traceback (``--traceback`` shows it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from opendelta.cli import inspect_cmd, merge_cmd, new_plugin_cmd, plugins_cmd, show_cmd
from opendelta.cli.common import CommandError, one_line
from opendelta.errors import OpenDeltaError

__all__ = ["CommandError", "build_parser", "main"]

_COMMANDS = (plugins_cmd, show_cmd, inspect_cmd, merge_cmd, new_plugin_cmd)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command registered."""
    from opendelta import __version__

    parser = argparse.ArgumentParser(
        prog="opendelta",
        description="OpenDelta: inspect plugins, models and delta checkpoints; merge deltas; scaffold plugins.",
    )
    parser.add_argument("--version", action="version", version=f"opendelta-core {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in _COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
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
