"""0.3.2's ``opendelta.utils.model_md5``: a fingerprint of a model, now :mod:`opendelta.hashing`'s backbone hash.

0.3.2 hashed ``repr(model)`` and every weight with md5 (about 2 s for 110M parameters, and it failed on
bfloat16). ``gen_model_hash`` returns the hash our checkpoints record and check instead (``"sha256:..."``), so its
value differs from 0.3.2's: a recorded 0.3.2 hash can't be compared with it (loading a 0.3.2 checkpoint does not
try). Delta parameters are left out, so the hash describes the backbone alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from opendelta.hashing import backbone_hash, parameter_sample

__all__ = ["gen_model_hash", "gen_parameter_hash"]


def gen_model_hash(model: nn.Module, with_parameters: bool = True) -> str:
    """The backbone hash of ``model``; ``with_parameters=False`` hashes its structure only (names, shapes, dtypes).

    Two models with the same architecture and sizes share their structure hash whatever their weights.
    """
    if with_parameters:
        return backbone_hash(model)
    no_values = {name: b"" for name, _ in model.named_parameters()}  # an empty sample: the header alone is hashed
    return backbone_hash(model, samples=no_values)


def gen_parameter_hash(generator: Iterable[torch.Tensor], md5: Any = None) -> Any:
    """``md5`` (a ``hashlib`` object; a new SHA-256 if ``None``) fed what the backbone hash reads of each tensor.

    It is returned, as 0.3.2 returned its updated md5 object: ``.hexdigest()`` gives the text.
    """
    digest = md5 if md5 is not None else hashlib.sha256()
    for tensor in generator:
        digest.update(parameter_sample(tensor))
    return digest
