"""The parallel adapter's hyper-parameters, and the two forms of its ``modified_modules``: patterns and spans."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from opendelta.plugin_api import ACTIVATIONS, DeltaConfig, DeltaConfigError


def spans_from_flat_pairs(flat: Sequence[str]) -> list[str | list[str]] | None:
    """OpenDelta 0.3.2's flat pairs as entries of this plugin: ``["attn", ["ff.w1", "ff.w2"]]`` from the flat pairs.

    ``["attn", "attn", "ff.w1", "ff.w2"]`` pairs two by two: an equal pair is one module, two different ones a span.

    Returns ``None`` for an odd number of patterns, which the original could not pair either.
    """
    if len(flat) % 2:
        return None
    return [start if start == end else [start, end] for start, end in zip(flat[::2], flat[1::2], strict=True)]


def _is_flat_pairs(entries: object) -> bool:
    """Whether ``modified_modules`` is written in 0.3.2's flat pairs: plain patterns, one of them repeated.

    A list of distinct patterns keeps this plugin's meaning (one adapter beside each module): only the repetition,
    which that meaning refuses, tells the two spellings apart.
    """
    if not isinstance(entries, (list, tuple)) or not all(isinstance(e, str) for e in entries):
        return False
    return len(set(entries)) < len(entries)


@dataclass(kw_only=True)
class ParallelAdapterConfig(DeltaConfig):
    """Configuration of :class:`~opendelta_parallel_adapter.ParallelAdapterModel`.

    Attributes:
        modified_modules: where the adapters go. Each entry is either a pattern (the adapter runs beside each
            matched module, from its input to its output) or a two-pattern list ``[start, end]``, a *span*: the
            adapter runs from the input of each ``start`` module to the output of the first ``end`` module after it
            (``["fc1", "fc2"]`` covers BART's feed-forward block, which no single module contains). ``None`` uses
            the defaults: common names ``"attn"`` and ``["ff.w1", "ff.w2"]``. OpenDelta 0.3.2's flat pairs
            (``["attn", "attn", "ff.w1", "ff.w2"]``: two by two, an equal pair one module) are accepted and stored
            in this form (``["attn", ["ff.w1", "ff.w2"]]``); they are told apart by a repeated pattern, so a 0.3.2
            list of spans only (``["fc1", "fc2"]``) must be written ``[["fc1", "fc2"]]``.
        bottleneck_dim: width of the bottleneck; 24 by default. Parameters per adapter:
            ``in * dim + dim + dim * out + out``.
        non_linearity: activation between the projections (``gelu_new`` by default; see
            ``opendelta.layers.ACTIVATIONS``).
        scaled: the scale ``s`` of the branch, ``out = f(x) + s * up(act(down(x)))``; 1.0 by default, as in the
            original OpenDelta. He et al. (2022) found a scaled parallel adapter with ``s = 4`` on the feed-forward
            block worked best (their "MAM adapter" setting).
    """

    delta_type: ClassVar[str] = "parallel_adapter"

    modified_modules: list[str | list[str]] | None = None
    bottleneck_dim: int = 24
    non_linearity: str = "gelu_new"
    scaled: float = 1.0

    def __post_init__(self) -> None:
        # A span given as a tuple becomes a list, so the config equals its own JSON round trip.
        if _is_flat_pairs(self.modified_modules):
            spans = spans_from_flat_pairs(self.modified_modules)  # type: ignore[arg-type]
            if spans is None:
                raise DeltaConfigError(
                    f"{type(self).__name__}.modified_modules={self.modified_modules!r} repeats a pattern, as OpenDelta "
                    "0.3.2's flat pairs do (['attn', 'attn', 'ff.w1', 'ff.w2']: two by two, from the first's input to "
                    "the second's output), but has an odd number of patterns to pair; write each entry once, a "
                    "pattern for one module or a nested list for a span: ['attn', ['ff.w1', 'ff.w2']]"
                )
            self.modified_modules = spans
        if isinstance(self.modified_modules, (list, tuple)):
            self.modified_modules = [list(e) if isinstance(e, tuple) else e for e in self.modified_modules]
        super().__post_init__()

    def validate(self) -> None:
        """Refuse bad values early, naming the field, instead of failing deep inside a layer.

        A bottleneck below 1, an unknown activation, a scale that is not a positive finite number, and span entries
        that are not exactly two patterns are refused.
        """
        super().validate()
        name = type(self).__name__
        if self.bottleneck_dim < 1:
            raise DeltaConfigError(f"{name}.bottleneck_dim must be >= 1, got {self.bottleneck_dim}")
        if self.non_linearity.lower() not in ACTIVATIONS:
            raise DeltaConfigError(
                f"{name}.non_linearity {self.non_linearity!r} is unknown; choose one of {sorted(ACTIVATIONS)}"
            )
        if not (math.isfinite(self.scaled) and self.scaled > 0):
            raise DeltaConfigError(f"{name}.scaled must be a finite number > 0, got {self.scaled}")
        self._validate_modified_modules()

    def _validate_modified_modules(self) -> None:
        """Spans are ``[start, end]`` pairs of non-empty strings; a repeated entry is refused.

        The original OpenDelta's *flat* pairs (``["attn", "attn", "ff.w1", "ff.w2"]``) were turned into entries of
        this form when the config was made; a pattern repeated among them (``["attn", "attn", "attn", "attn"]``)
        is refused here like any other repetition.
        """
        name = type(self).__name__
        seen: list[str | list[str]] = []
        for entry in self.modified_modules or []:
            is_pair = isinstance(entry, list) and len(entry) == 2
            if isinstance(entry, list) and not (is_pair and all(isinstance(p, str) and p.strip() for p in entry)):
                raise DeltaConfigError(
                    f"{name}.modified_modules: a span must be a list of exactly two non-empty patterns "
                    f"[start, end], got {entry!r}"
                )
            if entry in seen:
                raise DeltaConfigError(
                    f"{name}.modified_modules lists {entry!r} twice ({self.modified_modules!r}). Write each entry "
                    "once: a pattern for one module ('attn'), or a nested list for a span (['ff.w1', 'ff.w2']); the "
                    "original OpenDelta's flat pairs ['attn', 'attn', 'ff.w1', 'ff.w2'] are written "
                    "['attn', ['ff.w1', 'ff.w2']] here"
                )
            seen.append(entry)
