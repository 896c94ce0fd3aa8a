"""Errors of the interactive module selection (subclasses of :class:`opendelta.errors.OpenDeltaError`)."""

from __future__ import annotations

from opendelta.errors import OpenDeltaError

__all__ = ["InteractiveSelectionCancelled", "InteractiveSelectionError", "InteractiveSelectionTimeout"]


class InteractiveSelectionError(OpenDeltaError, RuntimeError):
    """The selection page could not be served, or gave no selection."""


class InteractiveSelectionTimeout(InteractiveSelectionError, TimeoutError):
    """Nobody submitted a selection before the timeout; the server has been shut down."""


class InteractiveSelectionCancelled(InteractiveSelectionError):
    """The "cancel" button of the page was pressed; the server has been shut down."""
