"""The error for a user's mistake: a ValueError whose message names the fix.

    >>> from blip_trace_widgets.errors import BlipTraceError
    >>> issubclass(BlipTraceError, ValueError)
    True

Every check in this package raises a ``BlipTraceError``. The command line and the widgets show
one as a line; anything else, a plain ``ValueError`` from torch included, is a bug or an
environment problem, and they show its full traceback.
"""
from __future__ import annotations


class BlipTraceError(ValueError):
    """Bad input: the message says what was wrong and how to fix it."""


class UnavailableError(BlipTraceError, RuntimeError):
    """Something the user asked for cannot be had here (a model offline, a missing package or file);
    the message says how to get it. A RuntimeError too, as these were before."""
