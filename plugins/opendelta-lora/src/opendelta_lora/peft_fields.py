"""The types and ranges of the ``adapter_config.json`` fields that a LoRA adapter is read with, checked first.

PEFT's own config class checks none of them when it reads the file, and the reader turns them into numbers with
``int()`` and ``float()``: ``r: 2.7`` would silently become rank 2, ``r: true`` rank 1, ``r: "abc"`` a raw
``ValueError`` and ``lora_alpha: 1e400`` (``10**400`` as a JSON integer) an ``OverflowError``. So each field is
checked against what PEFT writes, and a wrong one is refused with a :class:`~opendelta.CheckpointError` naming the
file and the field, as ``DeltaConfig`` does for this library's own ``config.json``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from opendelta.plugin_api import INT64_RANGE, CheckpointError

__all__ = ["check_peft_fields"]


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value in INT64_RANGE


def _positive_integer(value: Any) -> bool:
    return _integer(value) and value >= 1


def _number(value: Any) -> bool:
    """A finite number (``math.isfinite`` raises on an integer beyond a float's range, so those are kept out)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return value in INT64_RANGE if isinstance(value, int) else math.isfinite(value)


def _positive_number(value: Any) -> bool:
    return _number(value) and value > 0


def _dropout(value: Any) -> bool:
    return _number(value) and 0 <= value < 1


def _flag(value: Any) -> bool:
    return value is None or isinstance(value, bool)


def _name_list(value: Any) -> bool:
    return value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _names(value: Any) -> bool:
    return isinstance(value, str) or _name_list(value)


def _layers(value: Any) -> bool:
    is_layer = lambda v: _integer(v) and v >= 0  # noqa: E731
    return value is None or is_layer(value) or (isinstance(value, list) and all(is_layer(v) for v in value))


def _init(value: Any) -> bool:
    return isinstance(value, (bool, str))


def _text(value: Any) -> bool:
    return value is None or isinstance(value, str)


FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "peft_type": (_text, "a string ('LORA')"),
    "r": (_positive_integer, "a positive integer (the rank)"),
    "lora_alpha": (_positive_number, "a positive finite number"),
    "lora_dropout": (_dropout, "a number in [0, 1)"),
    "use_rslora": (_flag, "true or false"),
    "use_dora": (_flag, "true or false"),
    "fan_in_fan_out": (_flag, "true or false"),
    "inference_mode": (_flag, "true or false"),
    "target_modules": (_names, "a list of module names or one regular expression"),
    "exclude_modules": (_names, "a list of module names or one regular expression"),
    "modules_to_save": (_name_list, "a list of module names"),
    "layers_to_transform": (_layers, "a layer index or a list of them"),
    "layers_pattern": (_names, "a name or a list of names"),
    "bias": (_text, "one of 'none', 'all', 'lora_only'"),
    "task_type": (_text, "a task name such as 'SEQ_CLS'"),
    "init_lora_weights": (_init, "true, false or an initialisation's name such as 'pissa'"),
}
"""Each field read: the check its value must pass, and what that means, for the message."""


def _shown(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value not in INT64_RANGE:
        return "an integer beyond int64"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def check_peft_fields(config: Mapping[str, Any], source: str) -> None:
    """Refuse a field of a PEFT ``adapter_config.json`` whose type or range PEFT would never write.

    Args:
        config: the parsed ``adapter_config.json``.
        source: the file, for the message.

    Raises:
        CheckpointError: naming ``source`` and the first wrong field, its value and what it must be.
    """
    required = ("r", "lora_alpha")  # the reader's defaults are PEFT's, but null is no rank
    for field, (ok, what) in FIELDS.items():
        if field not in config or (config[field] is None and field not in required):
            continue
        if not ok(config[field]):
            raise CheckpointError(
                f"{source}: field {field!r} must be {what}, got {_shown(config[field])}; the file is damaged or was "
                f"not written by PEFT"
            )
