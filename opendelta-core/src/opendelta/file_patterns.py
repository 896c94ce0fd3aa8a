r"""Module patterns that came from a file: untrusted input, checked and matched with bounds.

A saved ``config.json`` (``modified_modules``, ``exclude_modules``, ``unfrozen_modules``) or a PEFT
``adapter_config.json`` (``target_modules``, ``exclude_modules``, ``layers_pattern``, ``modules_to_save``) may come
from a stranger. Matched like a user's own patterns, a crafted file could hang the loader (a regular expression with
catastrophic backtracking, ``(\w|_|[a-z]|.)*\d``; one whose compilation expands nested counted repeats,
``(((a{100}){100}){100}){20}``) or make it crawl (tens of thousands of patterns, each tried on every module name and
then fuzzily compared to every name for a "did you mean"). So patterns from a file are:

* refused before any matching, with a :class:`~opendelta.errors.CheckpointError` naming the field and the limit,
  when there are more than :data:`MAX_PATTERNS` of them, one is longer than :data:`MAX_PATTERN_CHARS` or all
  together are longer than :data:`MAX_TOTAL_CHARS`;
* as regular expressions, parsed by the standard library's own parser (so the same syntax is accepted as in code),
  refused when their expanded size passes :data:`MAX_REGEX_SIZE`, then compiled and matched by the third-party
  ``regex`` module (a dependency of transformers, declared by opendelta-core), whose ``timeout=`` bounds every match:
  all the matching one field's patterns do shares :data:`MATCH_SECONDS`, after which a CheckpointError names the
  pattern;
* as names, matched literally (no character in them is a regex metacharacter).

A user's own patterns, written in code, never go through here: they keep the stdlib ``re`` and today's messages.
The mark travels with the list itself (:class:`FilePatterns`, a ``list``), set by the loaders through
``DeltaConfig.mark_read_from``, so every place that matches a config's patterns sees where they came from.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

import regex

from opendelta.errors import AddressingError, CheckpointError

try:
    from re import _constants as _sre_constants
    from re import _parser as _sre_parse
except ImportError:  # Python 3.10
    import sre_constants as _sre_constants
    import sre_parse as _sre_parse

__all__ = [
    "MATCH_SECONDS",
    "MAX_PATTERNS",
    "MAX_PATTERN_CHARS",
    "MAX_REGEX_SIZE",
    "MAX_TOTAL_CHARS",
    "PATTERN_FIELDS",
    "BoundedRegex",
    "FilePatterns",
    "MatchBudget",
    "check_limits",
    "compile_file_regex",
    "shown",
    "source_of",
]

MAX_PATTERNS = 4096
"""Patterns one field of a file may hold (a real adapter lists a few names, at most every module's full name)."""
MAX_PATTERN_CHARS = 8192
"""Characters one pattern may have (a regex alternating over a model's full module names stays far below)."""
MAX_TOTAL_CHARS = 1 << 18
"""Characters all the patterns of one field may have together."""
MAX_REGEX_SIZE = 100_000
"""Expanded size of one regex (counted repeats multiplied out); ``regex`` takes ~0.35 s to compile 10**6."""
MATCH_SECONDS = 1.0
"""Matching time all the regular expressions of one field share (real ones need microseconds per name)."""
PATTERN_FIELDS = ("modified_modules", "exclude_modules", "unfrozen_modules")
"""The fields of a native config that hold module patterns."""

_SHOWN_PATTERNS = 10
_SHOWN_CHARS = 80


class FilePatterns(list):  # type: ignore[type-arg]
    """A list of patterns read from a file (``source``): compared and serialised as the plain list it is."""

    def __init__(self, patterns: Iterable[Any] = (), source: str = "a file") -> None:
        super().__init__(patterns)
        self.source = source


def source_of(patterns: Any) -> str | None:
    """The file ``patterns`` were read from, or ``None`` for a user's own (in-code) patterns."""
    return patterns.source if isinstance(patterns, FilePatterns) else None


def check_limits(field: str, patterns: Any, source: str) -> None:
    """Refuse a field of a file whose patterns are too many or too long, before anything matches them.

    ``patterns`` is one string (a PEFT regex) or a list; entries that are not strings are left to the type checks.

    Raises:
        CheckpointError: naming the field, the file and the limit passed.
    """
    entries = [patterns] if isinstance(patterns, str) else patterns if isinstance(patterns, (list, tuple)) else []
    if len(entries) > MAX_PATTERNS:
        raise CheckpointError(
            f"{field} in {source} holds {len(entries):,} patterns, more than the {MAX_PATTERNS:,} a file may hold "
            f"(limit opendelta.file_patterns.MAX_PATTERNS): the file is damaged or crafted; name fewer modules, or "
            f"use a '[r]' regular expression"
        )
    lengths = [len(e) for e in entries if isinstance(e, str)]
    longest = max(lengths, default=0)
    if longest > MAX_PATTERN_CHARS:
        raise CheckpointError(
            f"{field} in {source} has a pattern of {longest:,} characters, longer than the {MAX_PATTERN_CHARS:,} a "
            f"pattern from a file may have (limit opendelta.file_patterns.MAX_PATTERN_CHARS): the file is damaged "
            f"or crafted"
        )
    if sum(lengths) > MAX_TOTAL_CHARS:
        raise CheckpointError(
            f"{field} in {source} has {sum(lengths):,} characters of patterns, more than the {MAX_TOTAL_CHARS:,} a "
            f"field of a file may have (limit opendelta.file_patterns.MAX_TOTAL_CHARS): the file is damaged or "
            f"crafted"
        )


class MatchBudget:
    """The matching time the regular expressions of one field share; spent, a match raises instead of running."""

    def __init__(self, field: str, source: str, seconds: float = MATCH_SECONDS) -> None:
        self.field, self.source, self.seconds, self.left = field, source, seconds, seconds

    def fullmatch(self, compiled: regex.Pattern[str], text: str, string: str) -> regex.Match[str] | None:
        """``compiled.fullmatch(string)`` in what is left of the budget.

        Raises:
            CheckpointError: the budget ran out (naming the pattern ``text``).
        """
        start = time.perf_counter()
        try:
            if self.left <= 0:
                raise TimeoutError
            return compiled.fullmatch(string, timeout=self.left)
        except TimeoutError:
            self.left = 0.0
            raise CheckpointError(
                f"{self.field} entry {_short(text)!r} in {self.source} took more than {self.seconds:g} s to match "
                f"module names (catastrophic backtracking): the file is damaged or crafted; rewrite the regular "
                f"expression without nested or overlapping repetition, or name the modules"
            ) from None
        finally:
            self.left -= time.perf_counter() - start


class BoundedRegex:
    """A regular expression from a file: ``fullmatch`` like a compiled ``re`` pattern's, under a time budget."""

    def __init__(self, compiled: regex.Pattern[str], text: str, budget: MatchBudget) -> None:
        self.compiled, self.text, self.budget = compiled, text, budget
        self.pattern = compiled.pattern

    def fullmatch(self, string: str) -> regex.Match[str] | None:
        return self.budget.fullmatch(self.compiled, self.text, string)


def compile_file_regex(expression: str, text: str, budget: MatchBudget) -> BoundedRegex:
    """Compile a regular expression read from a file, refusing what ``re`` refuses and what expands too far.

    Raises:
        AddressingError: not a valid regular expression (as for one written in code).
        CheckpointError: its expanded size passes :data:`MAX_REGEX_SIZE`.
    """
    where = f"{budget.field} entry {_short(text)!r} in {budget.source}"
    try:
        size = _expanded_size(_sre_parse.parse(expression))
    except (re.error, OverflowError, RecursionError) as exc:  # a{4294967296}; parentheses nested 500 deep
        raise AddressingError(
            f'{where} is not a valid regular expression ({exc}); in JSON, write a literal dot as "\\\\."'
        ) from exc
    if size > MAX_REGEX_SIZE:
        raise CheckpointError(
            f"{where} expands to {size:,} elements, more than the {MAX_REGEX_SIZE:,} a regular expression from a "
            f"file may (limit opendelta.file_patterns.MAX_REGEX_SIZE; nested counted repeats multiply): the file is "
            f"damaged or crafted"
        )
    try:
        return BoundedRegex(regex.compile(expression), text, budget)
    except (regex.error, OverflowError, RecursionError) as exc:
        raise AddressingError(f"{where} is not a regular expression the bounded matcher accepts ({exc})") from exc


_REPEATS = {
    getattr(_sre_constants, op)
    for op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
    if hasattr(_sre_constants, op)
}


def _expanded_size(parsed: Any) -> int:
    """Elements of a parsed regex with counted repeats multiplied out (an unbounded one counts its minimum)."""
    if isinstance(parsed, _sre_parse.SubPattern):
        return sum(_item_size(op, av) for op, av in parsed.data)
    if isinstance(parsed, (list, tuple)):
        return sum(_expanded_size(x) for x in parsed)
    return 0


def _item_size(op: Any, av: Any) -> int:
    if op in _REPEATS:
        low, high, sub = av
        count = high if high != _sre_constants.MAXREPEAT else max(low, 1)
        return max(count, 1) * max(_expanded_size(sub), 1)
    return 1 + _expanded_size(av)


def _short(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS]}...({len(text):,} characters)"


def shown(texts: Sequence[str]) -> str:
    """A list of patterns from a file for a message: the first few, each cut short, and how many more."""
    head = ", ".join(repr(_short(t)) for t in texts[:_SHOWN_PATTERNS])
    more = f", ... {len(texts) - _SHOWN_PATTERNS:,} more" if len(texts) > _SHOWN_PATTERNS else ""
    return f"[{head}{more}]"


def shortened(texts: Sequence[str], count: int = 3) -> list[str]:
    """The first ``count`` patterns, cut short: what a "did you mean" may compare with every module name."""
    return [t[:_SHOWN_CHARS] for t in texts[:count]]
