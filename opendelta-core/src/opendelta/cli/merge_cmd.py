"""``opendelta merge``: bake a mergeable delta into its backbone's weights and save a plain transformers model.

The result loads with ``transformers`` alone (no opendelta, no hook) and computes what backbone + delta computed.
Only methods whose delta is a change of the backbone's own parameters can be merged (LoRA: ``W + s B A``; BitFit:
``b + delta``); an adapter or a prefix adds computation and is refused before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from opendelta.cli.backbones import build_skeleton, copy_tokenizer_files, load_config, load_pretrained, model_class
from opendelta.cli.common import CommandError
from opendelta.cli.config_checks import check_fits_in_memory
from opendelta.errors import BackboneMismatchError, DeltaStateError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register the ``merge`` command."""
    parser = subparsers.add_parser(
        "merge",
        help="bake a mergeable delta (LoRA, BitFit) into a backbone and save a plain transformers model",
        description="Load the backbone and the delta, fold the delta into the backbone's weights "
        "(merge_and_unload) and save the result with save_pretrained: a plain transformers model. Methods that "
        "cannot be merged (adapters, prefixes, prompts) are refused.",
    )
    parser.add_argument("--delta", required=True, metavar="DELTA_DIR", help="the delta checkpoint folder")
    parser.add_argument("--backbone", required=True, metavar="MODEL_DIR", help="the backbone's model folder")
    parser.add_argument("--output", required=True, metavar="OUT_DIR", help="where to save the merged model (new)")
    parser.add_argument(
        "--class",
        dest="class_name",
        metavar="NAME",
        help="transformers class to load the backbone as (default: the backbone class the delta records)",
    )
    parser.add_argument(
        "--safe-merge", action="store_true", help="refuse (writing nothing) if a merged weight would hold NaN/Inf"
    )
    parser.add_argument(
        "--no-check-hash",
        action="store_true",
        help="merge even if the delta was trained on another backbone (its recorded hash differs)",
    )
    parser.set_defaults(run=run)


def _check_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise CommandError(f"--output {output} already exists and is not an empty folder; choose a new folder")


def _saved_names(delta_dir: Path, raw: dict[str, Any]) -> set[str]:
    """The tensor names the delta checkpoint holds (its safetensors header only; nothing else is read)."""
    from safetensors import safe_open

    from opendelta.saving import WEIGHTS_PREFIX, WEIGHTS_SUFFIX

    weights = delta_dir / str(raw.get("weights_file", f"{WEIGHTS_PREFIX}{WEIGHTS_SUFFIX}"))
    try:
        with safe_open(str(weights), framework="pt") as handle:
            return set(handle.keys())
    except (OSError, ValueError, RuntimeError):
        return set()


def _report_missing(missing: list[str], saved: set[str], backbone: str) -> None:
    """Say which weights the backbone folder lacked, and whether the delta supplied them or they stay random."""
    supplied = [k for k in missing if k in saved]
    random = [k for k in missing if k not in saved]
    if supplied:
        print(f"{backbone} lacked {len(supplied)} weight(s) that the delta supplied: {', '.join(supplied)}")
    if random:
        print(
            f"warning: {backbone} lacked {len(random)} weight(s) the delta does not hold either; they are randomly "
            f"initialised in the merged model: {', '.join(random)}",
            file=sys.stderr,
        )


def run(args: argparse.Namespace) -> int:
    """Load, merge, save; print where the plain model went and how to load it."""
    from opendelta.auto import AutoDeltaModel
    from opendelta.registry import get_method
    from opendelta.saving import read_config_dict, resolve_checkpoint

    output = Path(args.output)
    _check_output(output)
    delta_dir = resolve_checkpoint(args.delta)
    raw = read_config_dict(delta_dir)
    spec = get_method(str(raw.get("delta_type")))  # not installed: the error names the distribution to install
    config = load_config(args.backbone)
    cls = model_class(config, requested=args.class_name, recorded=raw.get("backbone_class"))
    check_fits_in_memory(build_skeleton(config, cls), config, args.backbone)  # before transformers allocates any of it
    backbone, missing = load_pretrained(args.backbone, cls)
    check_hash = not args.no_check_hash
    try:
        delta_model = AutoDeltaModel.from_finetuned(delta_dir, backbone_model=backbone, check_hash=check_hash)
    except BackboneMismatchError as exc:
        raise CommandError(f"{exc} (on the command line: --no-check-hash)") from exc
    try:
        merged = delta_model.merge_and_unload(safe_merge=args.safe_merge)
    except DeltaStateError as exc:
        raise CommandError(
            f"the {spec.name!r} delta cannot be merged into plain weights ({exc}); only methods whose delta is a "
            f"change of the backbone's own weights (such as lora and bitfit) can. Serve it attached instead: "
            f"AutoDeltaModel.from_finetuned(delta_dir, backbone_model=model)"
        ) from exc
    merged.save_pretrained(str(output))
    copied = copy_tokenizer_files(args.backbone, output)
    print(f"merged the {spec.name!r} delta from {delta_dir} into {type(merged).__name__} from {args.backbone}")
    _report_missing(missing, _saved_names(delta_dir, raw), args.backbone)
    print(f"saved a plain transformers model to {output}" + (f" (with {', '.join(copied)})" if copied else ""))
    print(f"load it with: transformers.{type(merged).__name__}.from_pretrained({str(output)!r})")
    return 0
