"""``opendelta inspect DELTA_DIR``: what a delta checkpoint holds, checked, without loading a backbone.

Reads ``config.json`` and the safetensors header (not the tensors; an OpenDelta 0.3.x ``pytorch_model.bin`` is
read with ``weights_only=True``), recomputes the weights file's sha256 (streamed, so a large file is never held in
memory) and compares it with the one the config records. Which files it reads follows the loader's rules, through
the loader's own functions: a repo id resolves through the checked Hub cache, the config and weights must not be
links out of the folder, and the header must pass ``safetensors``' own parser.

Tensors are split into the delta's own (their names carry the method's ``delta_name``,
``...attention.self.query.lora.lora_A``) and trainable backbone parameters saved with it (a task head), when the
method is installed to tell which is which.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from opendelta.cli.common import CommandError, format_table, human_bytes
from opendelta.config import METADATA_FIELDS, DeltaConfig
from opendelta.errors import CheckpointError, UnknownDeltaMethodError
from opendelta.install_hint import install_hint
from opendelta.legacy import LEGACY_WEIGHTS_NAME, is_legacy_checkpoint, read_legacy_weights
from opendelta.registry import distribution_hint, get_method
from opendelta.saving import contained_file, file_sha256, read_config_dict, resolve_checkpoint, weights_path

__all__ = ["add_parser", "describe", "read_safetensors_header", "run"]

_BASE_FIELDS = DeltaConfig.field_names()
_BACKBONE_FIELDS = ("backbone_class", "backbone_checkpoint_name", "backbone_hash")
_VERSION_FIELDS = ("opendelta_version", "transformers_version", "torch_version")
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def add_parser(subparsers: Any) -> None:
    """Register the ``inspect`` command."""
    parser = subparsers.add_parser(
        "inspect",
        help="describe a delta checkpoint (config, tensors, parameter counts, backbone, versions) and verify it",
        description="Describe a delta checkpoint folder: method and hyper-parameters, addressed modules, tensors "
        "and parameter counts, the backbone it was trained on (class, checkpoint, hash), library versions; and "
        "verify the weights file against the sha256 its config records (exit status 1 on a mismatch).",
    )
    parser.add_argument("delta", metavar="DELTA_DIR", help="a folder written by save_finetuned()")
    parser.add_argument("--tensors", action="store_true", help="also list every tensor with its dtype and shape")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.set_defaults(run=run)


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Each tensor's ``dtype``, ``shape`` and byte size, read from a safetensors file's header only.

    The header is first checked by ``safetensors``' own parser (``safe_open``, the one the loader's ``load_file``
    uses, which maps the file but reads no tensor), so a crafted header (a length of 2**60, bad JSON, offsets past
    the end of the file or not matching the shape) is refused here exactly as loading would refuse it.

    Raises:
        CheckpointError: the file is not a readable safetensors file.
    """
    try:
        with safe_open(str(path), framework="pt"):
            pass
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (SafetensorError, OSError, ValueError, struct.error) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    header.pop("__metadata__", None)
    return {
        name: {"dtype": e["dtype"], "shape": list(e["shape"]), "bytes": e["data_offsets"][1] - e["data_offsets"][0]}
        for name, e in sorted(header.items())
    }


def _describe_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """The header entries a safetensors file would hold for ``tensors`` (for checkpoints in the old format)."""
    return {
        name: {
            "dtype": _SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype).removeprefix("torch.")),
            "shape": list(t.shape),
            "bytes": t.numel() * t.element_size(),
        }
        for name, t in sorted(tensors.items())
    }


def _method(delta_type: str) -> tuple[dict[str, Any], Any]:
    try:
        spec = get_method(delta_type)
    except UnknownDeltaMethodError:
        hint = install_hint(distribution_hint(delta_type))
        return {"installed": False, "install": hint}, None
    from opendelta.plugins import distribution_of

    dist, version = distribution_of(spec.plugin)
    info = {"installed": True, "class": spec.model_cls.__name__, "distribution": dist, "version": version}
    return info, spec


def _is_delta_tensor(name: str, delta_name: str) -> bool:
    """A delta's child is ``<delta_name>``, ``<delta_name>_2`` (a second one) or ``<delta_name>_<parameter>``."""
    return re.search(rf"(^|\.){re.escape(delta_name)}(_\w+)?\.", name) is not None


def describe(path: str) -> dict[str, Any]:
    """Everything ``inspect`` reports about the checkpoint at ``path``, as plain data (the ``--json`` document).

    Raises:
        CheckpointError: not a delta checkpoint, or its weights file is missing or unreadable.
    """
    folder = resolve_checkpoint(path)
    raw = read_config_dict(folder)
    delta_type = raw.get("delta_type")
    if not isinstance(delta_type, str):
        raise CheckpointError(f"{folder}/config.json has no delta_type: not an OpenDelta delta checkpoint")
    method, spec = _method(delta_type)
    own_fields = spec.config_cls.field_names() if spec is not None else [k for k in raw if k not in METADATA_FIELDS]
    hyper = {k: raw[k] for k in own_fields if k in raw and k not in _BASE_FIELDS}
    unknown = sorted(set(raw) - set(own_fields) - set(_BASE_FIELDS) - METADATA_FIELDS)

    if is_legacy_checkpoint(folder, raw):  # the loader's own checks of where the weights are, not copies of them
        weights = contained_file(folder, LEGACY_WEIGHTS_NAME, "weights file")
        file_format = "OpenDelta 0.3.x pickle, read with weights_only=True"
        tensors = _describe_tensors(read_legacy_weights(folder))
    else:
        weights, file_format = weights_path(folder, raw), "safetensors"
        tensors = read_safetensors_header(weights)
    digest = file_sha256(weights)
    recorded = raw.get("weights_sha256")

    delta_name = spec.model_cls.delta_name if spec is not None and spec.model_cls.insertion != "replace" else None
    delta = {n for n in tensors if delta_name is None or _is_delta_tensor(n, delta_name)}
    backbone_names = sorted(set(tensors) - delta)

    def summary(names: set[str]) -> dict[str, Any]:
        return {
            "count": len(names),
            "parameters": sum(math.prod(tensors[n]["shape"]) for n in names),
            "bytes": sum(tensors[n]["bytes"] for n in names),
        }

    return {
        "path": str(folder),
        "delta_type": delta_type,
        "method": method,
        "hyper_parameters": hyper,
        "addressing": {k: raw.get(k) for k in ("modified_modules", "exclude_modules", "unfrozen_modules")},
        "unknown_fields": unknown,
        "backbone": {k.removeprefix("backbone_"): raw.get(k) for k in _BACKBONE_FIELDS},
        "versions": {k.removesuffix("_version"): raw.get(k) for k in _VERSION_FIELDS},
        "weights": {
            "file": weights.name,
            "format": file_format,
            "bytes": weights.stat().st_size,
            "sha256": digest,
            "recorded_sha256": recorded,
            "verified": None if not recorded else digest == recorded,
        },
        "tensors": {
            "all": summary(set(tensors)),
            "delta": summary(delta) if delta_name else None,
            "backbone": {**summary(set(backbone_names)), "names": backbone_names} if delta_name else None,
            "dtypes": dict(Counter(t["dtype"] for t in tensors.values())),
            "list": tensors,
        },
    }


def _render(report: dict[str, Any], with_tensors: bool) -> str:
    method = report["method"]
    if method["installed"]:
        where = f"{method['class']} from {method['distribution'] or 'an unregistered plugin'} {method['version'] or ''}"
    else:
        where = f"not installed here: {method['install']}"
    lines = [f"Delta checkpoint {report['path']}", f"  delta_type: {report['delta_type']} ({where.strip()})"]
    hyper = report["hyper_parameters"]
    lines.append("  hyper-parameters: " + (", ".join(f"{k}={v!r}" for k, v in hyper.items()) or "none"))
    lines += [f"  {k}: {v!r}" for k, v in report["addressing"].items()]
    if report["unknown_fields"]:
        lines.append(f"  fields the installed method does not know: {', '.join(report['unknown_fields'])}")
    backbone = report["backbone"]
    lines.append(f"  backbone: {backbone['class']} (checkpoint {backbone['checkpoint_name']!r})")
    lines.append(f"  backbone hash: {backbone['hash']}")
    lines.append("  saved with: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v))
    tensors = report["tensors"]
    everything = tensors["all"]
    lines.append(
        f"  tensors: {everything['count']} ({everything['parameters']:,} parameters, "
        f"{human_bytes(everything['bytes'])}; {', '.join(f'{n} {d}' for d, n in tensors['dtypes'].items())})"
    )
    if tensors["delta"] is not None:
        delta, backbone_part = tensors["delta"], tensors["backbone"]
        lines.append(f"    delta: {delta['count']} tensors, {delta['parameters']:,} parameters")
        lines.append(
            f"    backbone (trainable parameters saved with the delta, e.g. a task head): {backbone_part['count']} "
            f"tensors, {backbone_part['parameters']:,} parameters"
            + (f": {', '.join(backbone_part['names'][:6])}" if backbone_part["names"] else "")
            + (" ..." if len(backbone_part["names"]) > 6 else "")
        )
    weights = report["weights"]
    verdict = {True: "verified", False: "MISMATCH (the file is damaged)", None: "no digest recorded to verify"}
    size = human_bytes(weights["bytes"])
    lines.append(f"  weights: {weights['file']} ({weights['format']}), {size}, sha256 {verdict[weights['verified']]}")
    if with_tensors:
        rows = [(name, t["dtype"], "x".join(map(str, t["shape"])) or "scalar") for name, t in tensors["list"].items()]
        lines += ["", format_table(("tensor", "dtype", "shape"), rows)]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the description; a weights file whose sha256 differs from the recorded one is an error (status 1)."""
    report = describe(args.delta)
    if args.json:
        if not args.tensors:
            report["tensors"].pop("list")
        print(json.dumps(report, indent=2))
    else:
        print(_render(report, args.tensors))
    if report["weights"]["verified"] is False:
        raise CommandError(
            f"{report['weights']['file']} does not match the sha256 recorded in config.json "
            f"({report['weights']['recorded_sha256']}); the file is damaged or was replaced"
        )
    return 0
