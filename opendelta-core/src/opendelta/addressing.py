r"""Name-based addressing: which modules of a backbone a list of patterns designates.

The rules are those of the original OpenDelta (manual section 1.15):

* A plain pattern matches a module whose dotted name *ends with* it on whole components: ``"attention.out_lin"``
  matches ``distilbert.transformer.layer.0.attention.out_lin``; ``"uery"`` does not match ``...query``.
* A pattern starting with ``[r]`` is a regular expression that must match a whole dotted suffix of the name
  (a span that starts at a ``.`` boundary and ends at the end): ``"[r][0-5]\.attention"``.
* A name is *excluded* when it, or one of its ancestors, matches an ``exclude_modules`` pattern by the same rules
  (so an exclusion written as a full prefix, ``"bert.encoder.layer.11"``, keeps working).

Patterns read from a file (a :class:`~opendelta.file_patterns.FilePatterns` list, or ``source=``) follow the same
rules, with bounds: see :mod:`opendelta.file_patterns`.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from opendelta import file_patterns
from opendelta.errors import AddressingError, ModuleNotFoundInStructureError, OpenDeltaAddressingWarning

__all__ = ["Pattern", "compile_patterns", "find_matches", "is_excluded", "suggest_names"]

REGEX_PREFIX = "[r]"


@dataclass(frozen=True)
class Pattern:
    """One compiled pattern; ``text`` is what the user wrote; ``source`` the file it came from, if any."""

    text: str
    regex: re.Pattern[str] | file_patterns.BoundedRegex | None
    source: str | None = None

    def matches(self, name: str) -> bool:
        """Whether ``name`` (a dotted module name) ends with this pattern on whole components."""
        if self.regex is None:
            return name == self.text or name.endswith("." + self.text)
        parts = name.split(".")
        return any(self.regex.fullmatch(".".join(parts[i:])) for i in range(len(parts)))


ALL_LINEAR = "all-linear"
"""``modified_modules="all-linear"``: every linear layer in the blocks (see :mod:`opendelta.all_linear`), as PEFT spells
it (compared case-insensitively)."""


def is_all_linear(modified_modules: object) -> bool:
    """Whether ``modified_modules`` is the keyword: the string itself, or a one-entry list holding it (as saved)."""
    if isinstance(modified_modules, str):
        return modified_modules.lower() == ALL_LINEAR
    if isinstance(modified_modules, (list, tuple)) and len(modified_modules) == 1:
        entry = modified_modules[0]
        return isinstance(entry, str) and entry.lower() == ALL_LINEAR
    return False


def compile_patterns(
    patterns: Iterable[str] | str | None, argument: str = "modified_modules", *, source: str | None = None
) -> list[Pattern]:
    """Validate and compile a list of patterns, naming ``argument`` in every error.

    Patterns read from a file (``source`` names it, or ``patterns`` is a ``FilePatterns``) are checked against the
    limits of :mod:`opendelta.file_patterns` and their regular expressions matched under its time budget.
    """
    if patterns is None:
        return []
    source = source or file_patterns.source_of(patterns)
    if source is not None:
        file_patterns.check_limits(argument, patterns, source)
        budget = file_patterns.MatchBudget(argument, source)
    if isinstance(patterns, (str, bytes)):
        raise AddressingError(f"{argument} must be a list of strings, got the string {patterns!r}; use [{patterns!r}]")
    if not isinstance(patterns, Iterable):
        raise AddressingError(
            f"{argument} must be a list of strings, got {patterns!r} ({type(patterns).__name__}); e.g. ['query']"
        )
    patterns = list(patterns)  # a generator would be half consumed when an error quotes the list
    compiled = []
    for text in patterns:
        if not isinstance(text, str) or not text.strip():
            raise AddressingError(f"{argument} entries must be non-empty strings, got {text!r} in {patterns!r}")
        if text.startswith(REGEX_PREFIX):
            expression = text[len(REGEX_PREFIX) :]
            if not expression.strip():  # would silently match nothing: fullmatch of "" never fits a module name
                raise AddressingError(
                    f"{argument} entry {text!r} has no regular expression after '[r]'; e.g. '[r][0-5]\\.attention'"
                )
            if source is not None:
                compiled.append(Pattern(text, file_patterns.compile_file_regex(expression, text, budget), source))
                continue
            try:
                compiled.append(Pattern(text, re.compile(expression)))
            except (re.error, OverflowError, RecursionError) as exc:  # a{4294967296}; parentheses nested 500 deep
                raise AddressingError(
                    f"{argument} entry {text!r} is not a valid regular expression ({exc}); in JSON, write a literal "
                    f'dot as "\\\\."'
                ) from exc
        else:
            compiled.append(Pattern(text, None, source))
    return compiled


def is_excluded(name: str, exclude: Sequence[Pattern]) -> bool:
    """Whether ``name`` or one of its ancestors matches an exclusion pattern."""
    if not exclude:
        return False
    parts = name.split(".")
    return any(p.matches(".".join(parts[: i + 1])) for i in range(len(parts)) for p in exclude)


def suggest_names(patterns: Sequence[str], names: Iterable[str], n: int = 5) -> list[str]:
    """The dotted suffixes of ``names`` closest to the patterns, for "did you mean" messages."""
    suffixes: set[str] = set()
    for name in names:
        parts = name.split(".")
        suffixes.update(".".join(parts[i:]) for i in range(max(0, len(parts) - 3), len(parts)))
    close: list[str] = []
    for pattern in patterns:
        text = pattern[len(REGEX_PREFIX) :] if pattern.startswith(REGEX_PREFIX) else pattern
        for match in difflib.get_close_matches(text, sorted(suffixes), n=n, cutoff=0.5):
            if match not in close:
                close.append(match)
    return close[:n]


def find_matches(
    names: Sequence[str],
    patterns: Sequence[Pattern],
    exclude: Sequence[Pattern] = (),
    *,
    require_each: bool = True,
    warn_unmatched: bool = False,
    describe: str = "the backbone",
    explained: Collection[str] = (),
) -> list[str]:
    """The names that match any pattern and are not excluded, in the order given.

    Args:
        names: candidate dotted names.
        patterns: compiled target patterns.
        exclude: compiled exclusion patterns.
        require_each: raise when one pattern matches no name at all (a typo), not only when all fail.
        warn_unmatched: without ``require_each``, warn (:class:`~opendelta.errors.OpenDeltaAddressingWarning`) about
            the patterns that matched nothing while others matched: a list written for several architectures
            (``["query", "q_proj"]``) is fine, but a typo among them should not pass unseen.
        describe: how to name the searched model in messages.
        explained: pattern texts already warned about by the caller (say, a mapping that fits the model only partly),
            left out of the unmatched warning so one cause gives one warning.

    Raises:
        ModuleNotFoundInStructureError: a pattern (or the whole list) matched nothing; the message echoes the
            patterns and suggests the closest real names.
    """
    texts = [p.text for p in patterns]
    if not texts:  # else the message below would read "modified_modules=[]:  matched no module"
        raise ModuleNotFoundInStructureError(
            f"got an empty modified_modules list, which designates no module of {describe}; name the modules to "
            f"modify, e.g. modified_modules=['query']"
        )
    hits = {p.text: [n for n in names if p.matches(n)] for p in patterns}
    missing = [t for t in texts if not hits[t]]
    if (require_each and missing) or not any(hits.values()):
        raise ModuleNotFoundInStructureError(
            f"{_unmatched_message(patterns, missing or texts, names, describe)} A pattern matches the end of a module "
            f"name on whole components ('key' matches '...attention.self.key'); start it with '[r]' for a regular "
            f"expression."
        )
    chosen = {n for hit in hits.values() for n in hit}
    result = [n for n in names if n in chosen and not is_excluded(n, exclude)]
    if not result:
        excluded = [p.text for p in exclude]
        from_file = any(p.source for p in [*patterns, *exclude])
        raise ModuleNotFoundInStructureError(
            f"modified_modules={file_patterns.shown(texts) if from_file else repr(texts)} matched {len(chosen)} "
            f"module(s) of {describe}, but exclude_modules="
            f"{file_patterns.shown(excluded) if from_file else repr(excluded)} excluded all of them."
        )
    missing = [t for t in missing if t not in explained]
    if warn_unmatched and missing:
        warnings.warn(
            f"{_unmatched_message(patterns, missing, names, describe)} The other entries matched and are used; drop "
            f"the unmatched ones if they are not meant for another architecture.",
            OpenDeltaAddressingWarning,
            stacklevel=2,
        )
    return result


def _unmatched_message(patterns: Sequence[Pattern], missing: list[str], names: Sequence[str], describe: str) -> str:
    """The "<patterns>: <unmatched> matched no module of <model>. Closest module names: ..." sentence.

    A file's list is shortened, and its misses compared by their shortened form.
    """
    texts = [p.text for p in patterns]
    source = next((p.source for p in patterns if p.source), None)
    if source is None:
        listed, unmatched, suggestions = repr(texts), ", ".join(map(repr, missing)), suggest_names(missing, names)
    else:  # a file's: thousands of misses must not each be echoed and fuzzily compared with every name
        listed = f"{file_patterns.shown(texts)} (in {source})"
        unmatched = file_patterns.shown(missing)[1:-1]
        suggestions = suggest_names(file_patterns.shortened(missing), names)
    hint = f" Closest module names: {', '.join(map(repr, suggestions))}." if suggestions else ""
    return f"modified_modules={listed}: {unmatched} matched no module of {describe}.{hint}"
