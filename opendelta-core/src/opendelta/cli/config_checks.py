"""The sizes a transformers config asks for, checked before ``show`` or ``merge`` builds anything from it.

A config is a file someone else may have written. Built as it stands, ``num_hidden_layers: 20000`` keeps ``show``
constructing modules for minutes (on the meta device too: the cost is the Python objects), a negative
``hidden_size`` ends in a torch traceback that names no setting, and ``hidden_size: 10**12`` overflows a tensor's
size (or, for ``merge``, which allocates real weights, exhausts memory). So every integer setting whose name says it
is a size or a count (``*_size``, ``*_dim``, ``num_*_layers``, ``n_head``, ``vocab_size``...), in the config and in
the configs nested in it (a multimodal model's ``text_config``), must be within a bound no published model comes
near: :data:`MAX_LAYERS` for layer and block counts, :data:`MAX_SIZE` for the rest; and those that become tensor
shapes or module counts must not be negative. Ids and indices (``pad_token_id: -1``, ``vision_feature_layer: -2``)
are not sizes and are left alone. Every default config of the installed transformers passes (tested).

Sizes each within bounds can still multiply to more than the machine holds; ``merge``, which loads real weights,
also checks the model's size (its skeleton on the meta device) against the memory available
(:func:`check_fits_in_memory`), so it is refused before transformers starts allocating.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from opendelta.budget import memory_limit
from opendelta.cli.common import CommandError

__all__ = ["MAX_LAYERS", "MAX_SIZE", "check_config_sizes", "check_fits_in_memory"]

MAX_LAYERS = 1024
"""Layers or blocks of one stack; the deepest published models have a few hundred (1024 build in about 4 s)."""

MAX_SIZE = 2**27
"""Any other size or count (hidden size, vocabulary, positions, heads, experts); 10M-token contexts fit."""

_LAYER_COUNT = re.compile(r"(layers|blocks|^n_layer)$")
_SIZE_KEY = re.compile(
    r"size|dim|embd|embed|hidden|intermediate|inner|d_model|d_ff|d_kv|positions|n_ctx|heads?($|_)|layers$|blocks$|"
    r"^n_layer$|experts|vocab|width|channels"
)
_SHAPE_KEY = re.compile(
    r"hidden|intermediate|inner|embd|embed|d_model|d_ff|d_kv|head_dim|vocab|position_embeddings|n_positions|n_ctx|"
    r"heads?($|_)|layers$|"
    r"blocks$|^n_layer$|experts"
)
"""Sizes that become tensor shapes or module counts, so a negative one is never an "unset" marker (``chunk_size:
-1`` is one)."""
_NOT_A_SIZE = re.compile(r"(_id|_ids|_idx|_index|_indices|_token)$")
_WHOLE_NUMBER_KEY = re.compile(
    r"(_size|_dim|^d_model|^d_ff|^d_kv|^n_embd|^n_inner|^n_head|^n_layer|^n_positions|^n_ctx|^num_\w+_(layers|heads)|"
    r"^max_position_embeddings)$"
)
"""Sizes that must be whole numbers when set: transformers 5 refuses ``hidden_size: "wide"`` when it reads the
config, transformers 4.57 only when a tensor is built from it, with an error that names no setting."""


def _settings(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every setting in ``data`` (nested configs included), as ``("text_config.hidden_size", 4096)``."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _settings(value, f"{name}.")
        else:
            yield name, value


def _numbers(data: Mapping[str, Any], source: str) -> Iterator[tuple[str, int | float]]:
    """Every numeric setting in ``data``; a size set to a string is refused instead (floats are bounded like sizes)."""
    for name, value in _settings(data):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield name, value
        elif isinstance(value, str) and _WHOLE_NUMBER_KEY.search(name.rsplit(".", 1)[-1]):
            raise CommandError(
                f"the config in {source} sets {name}={value!r}, which is not a whole number: it is damaged or was "
                f"crafted, and nothing was built from it. Fix {name} in its config.json"
            )


def check_config_sizes(config: Any, source: str) -> None:
    """Refuse ``config`` (a ``PretrainedConfig``) when a size or count is negative or beyond any real model.

    Raises:
        CommandError: one line naming the setting, its value, the bound, and that nothing was built.
    """
    for name, value in _numbers(config.to_dict(), source):
        key = name.rsplit(".", 1)[-1]
        if _NOT_A_SIZE.search(key) or not _SIZE_KEY.search(key):
            continue
        limit = MAX_LAYERS if _LAYER_COUNT.search(key) else MAX_SIZE
        if value <= limit and (value >= 0 or not _SHAPE_KEY.search(key)):
            continue
        why = "a negative size" if value < 0 else f"more than {limit:,}, beyond any published model"
        raise CommandError(
            f"the config in {source} sets {name}={value:,}, {why}: it is damaged or was crafted, and nothing was "
            f"built from it. Fix {name} in its config.json"
        )


def _weights_dtype(config: Any) -> torch.dtype | None:
    """The dtype the config says its weights are stored in (``dtype``, formerly ``torch_dtype``), if it says."""
    value = config.dtype if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)  # no deprecation warning
    value = getattr(torch, value, None) if isinstance(value, str) else value
    return value if isinstance(value, torch.dtype) else None


def check_fits_in_memory(skeleton: nn.Module, config: Any, source: str) -> None:
    """Refuse to load a model whose parameters and buffers (sizes read from its meta ``skeleton``) exceed memory.

    Floating-point parameters are counted in the dtype ``config`` records for the weights (a bfloat16 checkpoint
    takes half the room of the float32 skeleton), so a model that fits is not refused.

    Raises:
        CommandError: one line with the model's size and the memory available; nothing was allocated.
    """
    stored = _weights_dtype(config)
    size = stored.itemsize if stored is not None and stored.is_floating_point else None
    needed = sum(
        p.numel() * (size if size and p.is_floating_point() else p.element_size()) for p in skeleton.parameters()
    )
    needed += sum(b.numel() * b.element_size() for b in skeleton.buffers())
    available = memory_limit(torch.device("cpu"))
    if available is not None and needed > available:
        raise CommandError(
            f"the model in {source} needs {needed / 2**30:,.1f} GiB for its weights, and {available / 2**30:,.1f} "
            f"GiB of memory is available: it was not loaded. Run on a machine with more memory, or check its config"
        )
