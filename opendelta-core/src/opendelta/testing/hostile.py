"""Hostile weights, for tests of every checkpoint reader: values that are not trained weights, and damaged files.

One set for every format (this library's safetensors checkpoints, OpenDelta 0.3.x ``pytorch_model.bin``, PEFT
adapters), so each reader is tried with the same cases and held to the same checks
(:mod:`opendelta.tensor_checks`). Two kinds:

* :data:`BAD_VALUES` and :data:`ODD_TENSORS` turn one good tensor into a bad one (NaN, integers, float64 ``1e300``
  that overflows a float32 parameter; sparse, meta, nested, quantized tensors): the tests put it in place of a
  tensor the file really holds, so only that tensor is wrong;
* the ``write_*`` and ``damage_*`` functions write or break files: a deflated ``torch.save`` zip that inflates to
  far more than its size (:func:`write_zip_bomb`), a truncated file, garbage.
"""

from __future__ import annotations

import os
import random
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

__all__ = [
    "BAD_VALUES",
    "ODD_TENSORS",
    "damage_garbage",
    "damage_truncate",
    "write_deflated",
    "write_zip_bomb",
]


def _with(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def make(tensor: torch.Tensor) -> torch.Tensor:
        bad = tensor.detach().clone().float()
        bad.view(-1)[0] = value
        return bad

    return make


def _overflowing(tensor: torch.Tensor) -> torch.Tensor:
    bad = tensor.detach().to(torch.float64).clone()
    bad.view(-1)[0] = 1e300  # finite in float64, inf once cast to the float32 parameter
    return bad


BAD_VALUES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = {
    "nan": (_with(float("nan")), "NaN or infinite"),
    "inf": (_with(float("inf")), "NaN or infinite"),
    "-inf": (_with(float("-inf")), "NaN or infinite"),
    "int64": (lambda t: t.detach().to(torch.int64), "torch.int64, not a floating-point tensor"),
    "int8": (lambda t: t.detach().to(torch.int8), "torch.int8, not a floating-point tensor"),
    "bool": (lambda t: t.detach() != 0, "torch.bool, not a floating-point tensor"),
    "complex": (lambda t: t.detach().to(torch.complex64), "torch.complex64, not a floating-point tensor"),
    "float64 1e300": (_overflowing, "beyond the range of torch.float32"),
}
"""Case -> (the bad tensor made from a good one, what the refusal must say). Every format can store these."""


def _quiet(make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``make`` without torch's warnings that these layouts are beta, prototype or deprecated."""

    def quiet(tensor: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return make(tensor)

    return quiet


ODD_TENSORS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = {
    "sparse coo": (_quiet(lambda t: t.detach().to_sparse()), "a sparse tensor"),
    "sparse csr": (_quiet(lambda t: t.detach().reshape(t.shape[0], -1).to_sparse_csr()), "a sparse tensor"),
    "meta": (_quiet(lambda t: torch.empty_like(t, device="meta")), "a meta tensor"),
    "nested": (_quiet(lambda t: torch.nested.nested_tensor([t.detach().clone()])), "a nested tensor"),
    "quantized": (_quiet(lambda t: torch.quantize_per_tensor(t.detach().float(), 0.1, 0, torch.qint8)), "quantized"),
}
"""Case -> (tensor, refusal): tensors that are not dense values in memory; only pickles (``torch.save``) hold them."""


def write_deflated(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor]) -> Path:
    """``torch.save(tensors)`` at ``path``, its zip members deflated (``torch.load`` inflates them as it reads)."""
    path = Path(path)
    plain = path.with_name(path.name + ".stored")
    torch.save(dict(tensors), plain)
    try:
        with zipfile.ZipFile(plain) as source, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as out:
            for info in source.infolist():
                out.writestr(info.filename, source.read(info.filename))
    finally:
        plain.unlink(missing_ok=True)
    return path


def write_zip_bomb(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], inflated_bytes: int = 32 << 20
) -> Path:
    """``tensors`` plus a zero float32 ``padding`` tensor of ``inflated_bytes``, deflated (a zip bomb).

    The file is about a thousand times smaller than what ``torch.load`` allocates for it: 32 MiB of zeros deflate
    to about 32 kB.
    """
    return write_deflated(path, {**tensors, "padding": torch.zeros(inflated_bytes // 4)})


def damage_truncate(path: str | os.PathLike[str], keep: float = 0.5) -> Path:
    """Cut ``path`` to its first ``keep`` fraction (a download or copy that stopped)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def damage_garbage(path: str | os.PathLike[str], size: int = 4096, *, prefix: bytes = b"") -> Path:
    """Replace ``path`` with ``prefix`` and ``size`` random bytes (seeded: the same garbage every run).

    A ``prefix`` of the zip magic (``PK``, 3, 4) makes it start like a zip; bytes 0x80, 2 like a pickle.
    """
    path = Path(path)
    path.write_bytes(prefix + random.Random(0).randbytes(size))
    return path
