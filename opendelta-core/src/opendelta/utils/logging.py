"""0.3.2's ``opendelta.utils.logging``: verbosity and handlers of the ``opendelta`` logger.

Every module of core logs to a child of the ``opendelta`` logger (``logging.getLogger(__name__)``), so these
functions govern all of OpenDelta's messages. ``import opendelta`` configures nothing (a library must not); the
first call of one of these functions does what 0.3.2 did on import of its modules: it gives the ``opendelta``
logger its own stderr handler (``[INFO|(OpenDelta)module:line]time >> message``), sets its level from
``TRANSFORMERS_VERBOSITY`` (``debug``, ``info``, ...; INFO by default) and stops its propagation to the root
logger, so that an application that configured logging does not print each message twice
(:func:`enable_propagation` undoes that).

One deliberate difference: 0.3.2's ``get_logger(name)`` pinned the named logger to INFO, so a later
``set_verbosity_error()`` did not silence it; here ``get_logger`` leaves the level alone unless ``verbosity`` is
given, and ``set_verbosity*`` governs every logger below ``opendelta``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from logging import CRITICAL, DEBUG, ERROR, FATAL, INFO, NOTSET, WARN, WARNING

__all__ = [
    "CRITICAL",
    "DEBUG",
    "ERROR",
    "FATAL",
    "INFO",
    "NOTSET",
    "WARN",
    "WARNING",
    "add_handler",
    "disable_default_handler",
    "disable_propagation",
    "enable_default_handler",
    "enable_explicit_format",
    "enable_propagation",
    "get_log_levels_dict",
    "get_logger",
    "get_verbosity",
    "log_levels",
    "remove_handler",
    "reset_format",
    "set_verbosity",
    "set_verbosity_debug",
    "set_verbosity_error",
    "set_verbosity_info",
    "set_verbosity_warning",
]

LIBRARY_LOGGER = "opendelta"
VERBOSITY_ENV = "TRANSFORMERS_VERBOSITY"
"""The variable 0.3.2 read its default level from (it shares it with transformers)."""

log_levels = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR, "critical": CRITICAL}

_FORMAT = "[%(levelname)s|(OpenDelta)%(module)s:%(lineno)d]%(asctime)s >> %(message)s"
_EXPLICIT_FORMAT = "[%(levelname)s|%(filename)s:%(lineno)s] %(asctime)s >> %(message)s"
_lock = threading.Lock()
_default_handler: logging.Handler | None = None


def _library_logger() -> logging.Logger:
    return logging.getLogger(LIBRARY_LOGGER)


def _default_level() -> tuple[int, str | None]:
    """The level named by the environment (INFO if none) and a complaint about a value that names none."""
    name = os.getenv(VERBOSITY_ENV)
    if not name or name in log_levels:
        return log_levels.get(name or "info", INFO), None
    return INFO, f"unknown {VERBOSITY_ENV}={name!r}, which must be one of {', '.join(log_levels)}; using info"


def _configure() -> logging.Logger:
    """Give the ``opendelta`` logger its handler and level, once (see the module docstring)."""
    global _default_handler
    logger = _library_logger()
    with _lock:
        if _default_handler is not None:
            return logger
        _default_handler = logging.StreamHandler(sys.stderr)
        _default_handler.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(_default_handler)
        level, complaint = _default_level()
        logger.setLevel(level)
        logger.propagate = False
    if complaint:
        logger.warning(complaint)
    return logger


def _reset() -> None:
    """Undo :func:`_configure`: the ``opendelta`` logger as ``import opendelta`` leaves it (for tests)."""
    global _default_handler
    logger = _library_logger()
    with _lock:
        if _default_handler is not None:
            logger.removeHandler(_default_handler)
        _default_handler = None
        logger.setLevel(NOTSET)
        logger.propagate = True


def get_log_levels_dict() -> dict[str, int]:
    """The level names ``get_logger(verbosity=...)`` accepts, with their values."""
    return dict(log_levels)


def get_logger(name: str | None = None, verbosity: str | None = None) -> logging.Logger:
    """The logger called ``name`` (the ``opendelta`` logger when ``None``), with OpenDelta's logging configured.

    Call it with ``__name__`` from a module of your own delta method, as 0.3.2's methods did. ``verbosity``
    (``"info"``, ``"debug"``, ...) sets that logger's own level; without it the logger follows ``set_verbosity``.
    """
    _configure()
    logger = logging.getLogger(name or LIBRARY_LOGGER)
    if verbosity is not None:
        if verbosity not in log_levels:
            raise ValueError(f"verbosity={verbosity!r} is not one of {', '.join(log_levels)}")
        logger.setLevel(log_levels[verbosity])
    return logger


def get_verbosity() -> int:
    """The effective level of the ``opendelta`` logger (``logging.INFO`` = 20, ...)."""
    return _configure().getEffectiveLevel()


def set_verbosity(verbosity: int) -> None:
    """Set the level of the ``opendelta`` logger, and so of every logger below it that has none of its own."""
    _configure().setLevel(verbosity)


def set_verbosity_info() -> None:
    """Show INFO messages and above."""
    set_verbosity(INFO)


def set_verbosity_warning() -> None:
    """Show warnings and errors only."""
    set_verbosity(WARNING)


def set_verbosity_debug() -> None:
    """Show everything."""
    set_verbosity(DEBUG)


def set_verbosity_error() -> None:
    """Show errors only."""
    set_verbosity(ERROR)


def disable_default_handler() -> None:
    """Stop printing through OpenDelta's stderr handler (add your own with :func:`add_handler`)."""
    logger = _configure()
    if _default_handler is not None:
        logger.removeHandler(_default_handler)


def enable_default_handler() -> None:
    """Print through OpenDelta's stderr handler again."""
    logger = _configure()
    if _default_handler is not None:
        logger.addHandler(_default_handler)


def add_handler(handler: logging.Handler) -> None:
    """Send OpenDelta's messages to ``handler`` too."""
    _configure().addHandler(handler)


def remove_handler(handler: logging.Handler) -> None:
    """Stop sending OpenDelta's messages to ``handler``."""
    _configure().removeHandler(handler)


def disable_propagation() -> None:
    """Keep OpenDelta's messages away from the root logger (the default once configured)."""
    _configure().propagate = False


def enable_propagation() -> None:
    """Pass OpenDelta's messages on to the root logger too (disable the default handler to avoid doubles)."""
    _configure().propagate = True


def enable_explicit_format() -> None:
    """Format every handler of the ``opendelta`` logger as ``[LEVEL|file:line] time >> message``."""
    for handler in _library_logger().handlers:
        handler.setFormatter(logging.Formatter(_EXPLICIT_FORMAT))


def reset_format() -> None:
    """Back to the plain ``logging`` format on every handler of the ``opendelta`` logger."""
    for handler in _library_logger().handlers:
        handler.setFormatter(None)
