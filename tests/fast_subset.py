"""Marks that keep a test out of the fast subset (``-m "not slow and not browser"``) for its running time alone.

Such a test is marked ``slow`` (the fast subset leaves it out, the full suite runs it) and ``lengthy``, which says why:
its running time, not what it checks (``-m lengthy`` selects them).
"""
from __future__ import annotations

import pytest

LENGTHY = [pytest.mark.slow, pytest.mark.lengthy]


def lengthy(test):
    """A test too slow for the fast subset: the full suite runs it."""
    for mark in LENGTHY:
        test = mark(test)
    return test


def lengthy_except(cases, *fast):
    """parametrize's cases, each lengthy but those in fast: the cheap ones that keep the fast subset's check."""
    missing = [case for case in fast if case not in cases]
    assert not missing, missing
    return [case if case in fast else pytest.param(*(case if isinstance(case, tuple) else (case,)), marks=LENGTHY)
            for case in cases]
