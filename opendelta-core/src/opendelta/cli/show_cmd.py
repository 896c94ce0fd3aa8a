"""``opendelta show MODEL``: the module tree of a transformers model folder, or its common-structure view.

No weights are read: the model is built from its config on the ``meta`` device (see ``backbones``), so the command
is instant for any size, and a config whose sizes are negative or absurd (20,000 layers) is refused in one line
before anything is built (``opendelta.cli.config_checks``). The class is the config's first ``architectures``
entry (the task head the folder was saved with), ``--class`` to choose another, or ``AutoModel`` when the config
names none.
"""

from __future__ import annotations

import argparse
from typing import Any

from opendelta.cli.backbones import build_skeleton, load_config, model_class
from opendelta.visualization import LOG_WIDTH, count_parameters, tidy_tree

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register the ``show`` command."""
    parser = subparsers.add_parser(
        "show",
        help="print a model's module tree (or its common-structure view with --common); reads no weights",
        description="Print the module tree of a transformers model (a folder with config.json, or the config file), "
        "with repeated blocks folded. The model is built from its config on the meta device: no weights are read.",
    )
    parser.add_argument("model", metavar="MODEL_DIR_OR_CONFIG", help="a model folder (config.json) or a config file")
    parser.add_argument(
        "--common",
        action="store_true",
        help="show the common-structure names (encoder.block.0.attn.q, ...) that delta methods address",
    )
    parser.add_argument("--class", dest="class_name", metavar="NAME", help="transformers class to build (BertModel)")
    parser.add_argument("--expand-params", action="store_true", help="one line per parameter (plain tree only)")
    parser.add_argument(
        "--keep-non-params", action="store_true", help="also show modules without parameters (plain tree only)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Build the skeleton and print the requested tree, then the parameter count."""
    from bigmodelvis import Visualization
    from rich.console import Console

    config = load_config(args.model)
    cls = model_class(config, requested=args.class_name)
    model = build_skeleton(config, cls)
    title = f"{type(model).__name__} from {args.model} (model_type {config.model_type!r})"
    if args.common:
        from opendelta.cli.common_tree import common_structure_tree

        tree = common_structure_tree(model, rootname=f"{title}, common structure")
    else:
        tree = Visualization(model).structure_graph(
            rootname=title,
            expand_params=args.expand_params,
            keep_non_params=args.keep_non_params,
            printTree=False,
        )
        tidy_tree(tree)
    console = Console()
    if not console.is_terminal:  # piped or captured: do not fold long lines at 80 columns
        console = Console(width=max(console.width, LOG_WIDTH))
    console.print(tree)
    console.print(f"{count_parameters(model).total:,} parameters")
    return 0
