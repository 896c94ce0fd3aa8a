"""Where each part of a fused module's output lies: the part sizes and their layout, read from the model's config.

GPT-2's ``c_attn`` is ``[q | k | v]``, three equal slices, and a mapping needs to say nothing more than its parts.
Other fused modules are not that regular, and slicing them in equal thirds would train the wrong rows silently:

* Phi-3's ``qkv_proj`` under grouped-query attention is ``[q | k | v]`` with ``k`` and ``v`` narrower than ``q``
  (``num_attention_heads`` against ``num_key_value_heads`` heads);
* GPT-NeoX's ``query_key_value`` interleaves the parts per head: ``[h0: q k v | h1: q k v | ...]``;
* Falcon's depends on its config: per key/value group ``[q q ... | k | v]`` (the new decoder architecture),
  ``[q | k | v]`` with one key and value head (multi-query), else interleaved per head like GPT-NeoX.

A fused node's ``split`` (see the schema) says this once for every model of the architecture: the output is
``groups`` consecutive equal blocks, each holding every part in order, part ``i`` taking ``sizes[i] / sum(sizes)``
of a block. Sizes and groups are integers or names of config attributes; a list of variants picks the first whose
``when`` matches the config; a variant may ``refuse`` with a reason, for a layout these words cannot describe. A
refused or unreadable split refuses only targets that are *parts* of the module, by name: the whole module stays
addressable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from opendelta.errors import StructureValidationError, UnsupportedTargetError

__all__ = ["FusedSplit", "check_split_spec", "equal_split", "resolve_split"]


@dataclass(frozen=True)
class FusedSplit:
    """The resolved layout of one fused module on one model: ``groups`` blocks of parts in ``sizes`` proportions."""

    sizes: tuple[int, ...]
    """Relative size of each part inside one block (``(1, 1, 1)`` for equal thirds)."""
    groups: int = 1
    """How many consecutive blocks repeat the parts: 1 is contiguous, the number of heads interleaves per head."""
    refusal: str | None = None
    """Why the parts cannot be sliced on this model (``None``: they can); slicing raises it."""

    @property
    def is_equal_and_contiguous(self) -> bool:
        """Whether this is the plain layout of GPT-2's ``c_attn``: one block of equal parts."""
        return self.refusal is None and self.groups == 1 and len(set(self.sizes)) == 1

    def describe(self) -> str:
        """The layout in words, for messages (``2 blocks of parts in proportions 2:1:1``)."""
        if self.refusal is not None:
            return f"not sliceable ({self.refusal})"
        ratio = ":".join(map(str, self.sizes))
        return f"parts in proportions {ratio}" + (f", repeated in {self.groups} blocks" if self.groups > 1 else "")

    def index(
        self, out_features: int, parts: Sequence[int], device: torch.device | str | None = None, where: str = ""
    ) -> torch.Tensor:
        """Indices of the output features of ``parts``, part by part, each part's features block by block.

        For one part the order is the order of its heads, so its features read as the part's own projection would
        give them (GPT-NeoX's keys come out ``[h0 | h1 | ...]``).

        Raises:
            UnsupportedTargetError: the split is refused on this model, or ``out_features`` does not divide into
                it; the message names ``where`` (the module) and the layout.
        """
        label = where or "the fused module"
        if self.refusal is not None:
            raise UnsupportedTargetError(
                f"cannot target a part of {label}: {self.refusal}. Target the whole module (its own real name in "
                f"modified_modules) instead"
            )
        if any(p < 0 or p >= len(self.sizes) for p in parts):
            raise ValueError(f"parts {tuple(parts)} out of range for a split into {len(self.sizes)} parts")
        block, rest = divmod(out_features, self.groups)
        total = sum(self.sizes)
        if rest or block % total:
            raise UnsupportedTargetError(
                f"cannot target a part of {label}: its {out_features} output features do not split into "
                f"{self.describe()} as the common-structure mapping says. Target the whole module (its own real "
                f"name in modified_modules), or fix the mapping's split"
            )
        unit = block // total
        starts = [sum(self.sizes[:i]) * unit for i in range(len(self.sizes))]
        pieces = [
            torch.arange(g * block + starts[p], g * block + starts[p] + self.sizes[p] * unit, device=device)
            for p in parts
            for g in range(self.groups)
        ]
        return torch.cat(pieces)


def equal_split(num_parts: int) -> FusedSplit:
    """The split of a fused node that says none: ``num_parts`` equal contiguous slices (GPT-2's ``c_attn``)."""
    return FusedSplit((1,) * num_parts)


def check_split_spec(spec: Any, num_parts: int, where: str) -> None:
    """What the schema cannot say: every variant of a fused node's ``split`` gives one size per part.

    Raises:
        StructureValidationError: a variant's ``sizes`` has the wrong length; the message names ``where``.
    """
    if spec is None:
        return
    for variant in spec if isinstance(spec, list) else [spec]:
        sizes = variant.get("sizes")
        if sizes is not None and len(sizes) != num_parts:
            raise StructureValidationError(
                f"{where}: the split's sizes {sizes!r} give {len(sizes)} size(s) for {num_parts} fused parts; give "
                f"one size per part, in the order of `fused`"
            )


def _config_value(config: Any, value: int | str, field: str) -> int | str:
    """An integer of the split: itself, or the config attribute it names; a string is the reason it is unusable."""
    if isinstance(value, int):
        return value
    found = getattr(config, value, None)
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:
        owner = type(config).__name__ if config is not None else "the model (it has no config)"
        return f"its {field} names the config attribute {value!r}, which {owner} gives as {found!r}, not a count"
    return found


def _matches(config: Any, when: dict[str, Any]) -> bool:
    return all(getattr(config, key, None) == wanted for key, wanted in when.items())


def resolve_split(spec: Any, num_parts: int, config: Any) -> FusedSplit:
    """The split of one fused node (its ``split`` field, ``None`` when absent) on a model with ``config``.

    Never raises for a model the words do not fit: the returned split carries the reason as its ``refusal``, so
    only a target that is a part of the module is refused (see :meth:`FusedSplit.index`).
    """
    if spec is None:
        return equal_split(num_parts)
    variants = spec if isinstance(spec, list) else [spec]
    chosen = next((v for v in variants if _matches(config, v.get("when", {}))), None)
    if chosen is None:
        conditions = "; ".join(repr(v.get("when", {})) for v in variants)
        refusal = f"no variant of the mapping's split fits this config ({conditions})"
        return FusedSplit((1,) * num_parts, refusal=refusal)
    if "refuse" in chosen:
        return FusedSplit((1,) * num_parts, refusal=str(chosen["refuse"]))
    values = [_config_value(config, s, "size") for s in chosen.get("sizes", [1] * num_parts)]
    groups = _config_value(config, chosen.get("groups", 1), "groups")
    problems = [v for v in [*values, groups] if isinstance(v, str)]
    if problems:
        return FusedSplit((1,) * num_parts, refusal=problems[0])
    return FusedSplit(tuple(int(v) for v in values), int(groups))
