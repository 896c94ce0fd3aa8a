r"""0.3.2's ``opendelta.utils.name_based_addressing``: the matching rules of ``modified_modules``, one name at a time.

``endswith_in_normal`` and ``endswith_in_regex`` apply :mod:`opendelta.addressing`'s rules (the ones every delta
model uses): a plain entry matches a name that ends with it on whole components (``"attention.output"`` matches
``bert.encoder.layer.0.attention.output``; ``"uery"`` does not match ``...query``); a regular expression must match
a whole dotted suffix of the name (``r"[0-5]\.attention"``). ``endswith_in`` takes a mixed list whose expressions
start with ``[r]``, as ``modified_modules`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

from opendelta.addressing import REGEX_PREFIX, Pattern, compile_patterns

__all__ = ["endswith_in", "endswith_in_normal", "endswith_in_regex", "is_child_key", "superstring_in"]


def superstring_in(str_a: str, list_b: Sequence[str]) -> bool:
    """Whether some string of ``list_b`` contains ``str_a``."""
    return any(str_a in str_b for str_b in list_b)


def is_child_key(str_a: str, list_b: Sequence[str]) -> bool:
    """Whether ``str_a`` is a key of ``list_b`` or the name of a submodule of one (``a.b.c`` is a child of ``a.b``)."""
    return any(str_a == str_b or str_a.startswith(str_b + ".") for str_b in list_b)


def endswith_in(str_a: str, list_b: Sequence[str]) -> bool:
    """Whether ``str_a`` matches an entry of ``list_b`` (plain entries, and expressions starting with ``[r]``)."""
    return any(pattern.matches(str_a) for pattern in compile_patterns(list_b, "list_b"))


def endswith_in_normal(str_a: str, list_b: Sequence[str]) -> bool:
    """Whether ``str_a`` ends with an entry of ``list_b`` at a ``.`` boundary (or equals it); entries are literal."""
    return any(Pattern(str_b, None).matches(str_a) for str_b in list_b)


def endswith_in_regex(str_a: str, list_b: Sequence[str]) -> bool:
    """Whether an expression of ``list_b`` (written without ``[r]``) matches a whole dotted suffix of ``str_a``."""
    return endswith_in(str_a, [REGEX_PREFIX + s for s in list_b])
