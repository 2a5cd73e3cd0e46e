"""The error for a user's mistake: a ValueError whose message names the fix.

    >>> from blip_trace_widgets.core.errors import BlipTraceError
    >>> issubclass(BlipTraceError, ValueError)
    True

Every check in this package raises a ``BlipTraceError``. The command line and the widgets show
one as a line; anything else, a plain ``ValueError`` from torch included, is a bug or an
environment problem, and they show its full traceback.
"""
from __future__ import annotations

from typing import Any


class BlipTraceError(ValueError):
    """Bad input: the message says what was wrong and how to fix it."""


class UnavailableError(BlipTraceError, RuntimeError):
    """Something the user asked for cannot be had here (a model offline, a missing package or file);
    the message says how to get it. A RuntimeError too, as these were before."""


def renamed(new: Any, old: Any, old_name: str, new_name: str, *, stacklevel: int = 3) -> Any:
    """``new``, or the value passed under a keyword's old name (with a DeprecationWarning that names the new one,
    for one release); both at once is refused."""
    if old is None:
        return new
    if new is not None:
        raise BlipTraceError(f"{old_name}= is the old name of {new_name}=: pass {new_name}= alone")
    import warnings

    warnings.warn(f"{old_name}= is now {new_name}= ({old_name}= goes in the next release)", DeprecationWarning,
                  stacklevel=stacklevel)
    return old
