"""0.3.2's ``opendelta.utils.signature``: the argument names of a function, for methods that save their arguments.

0.3.2's delta models recorded their constructor's arguments with
``arg_names = get_arg_names_inside_func(self.__init__)``; user methods written in that style import these.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["Signature", "get_arg_names", "get_arg_names_inside_func", "signature"]


class Signature(NamedTuple):
    """``f``'s positional-or-keyword arguments, their defaults (``None`` if none), and its ``*``/``**`` names."""

    args: list[str]
    defaults: list[Any] | None
    varargs: str | None
    keywords: str | None


def signature(f: Callable[..., Any]) -> Signature:
    """``f``'s input arguments: ``(args, defaults, varargs, keywords)``.

    ``args`` are the positional-or-keyword parameters (``self`` included for a function taken from a class), and
    ``defaults`` the defaults of those that have one, in order; keyword-only parameters are in neither, as in 0.3.2.
    """
    parameters = inspect.signature(f).parameters.values()
    plain = [p for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    varargs = next((p.name for p in parameters if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
    keywords = next((p.name for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    defaults = [p.default for p in plain if p.default is not inspect.Parameter.empty] or None
    return Signature([p.name for p in plain], defaults, varargs, keywords)


def get_arg_names(f: Callable[..., Any]) -> list[str]:
    """``signature(f).args`` without a leading ``self``."""
    args = signature(f).args
    return args[1:] if args[:1] == ["self"] else args


def get_arg_names_inside_func(func: Callable[..., Any]) -> tuple[str, ...]:
    """The names of ``func``'s positional arguments as its code object lists them, without ``self`` (a tuple).

    It reads the code of the function itself (past a ``functools.wraps`` wrapper), so it works from inside the
    function, on ``self.__init__`` included, whose bound ``self`` is in the code and dropped all the same.
    """
    code = inspect.unwrap(func).__code__
    names = code.co_varnames[: code.co_argcount]
    return names[1:] if names[:1] == ("self",) else names
