"""How many CPU threads torch should use here: fewer than the cores when other work is running.

    >>> from blip_trace_widgets.core.threads import choose_threads
    >>> 1 <= choose_threads() <= __import__("os").cpu_count()
    True

On a shared machine (Binder, Colab's CPU, a busy laptop) torch's default of one thread per
core oversubscribes the CPU: threads wait on each other and a heatmap can take many times
longer than on one thread (see ``benchmarks/bench_threads.py``). The explorers and the
command line call :func:`use_sensible_threads` once: it leaves an explicit
``OMP_NUM_THREADS`` (or ``BLIP_TRACE_THREADS``) alone, and otherwise uses the cores that
other running tasks leave free, at least one.
"""
from __future__ import annotations

import os

_APPLIED = False


def choose_threads() -> int:
    """The threads to use: ``$BLIP_TRACE_THREADS``, else the cores not busy with other work (at least 1)."""
    explicit = os.environ.get("BLIP_TRACE_THREADS")
    if explicit and explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    cores = os.cpu_count() or 1
    busy = _busy_now()
    return cores if busy is None else max(1, min(cores, int(cores - busy + 0.5)))


def _own_running() -> int:
    """This process's threads that are running now (torch's workers may still be spinning after work)."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat") as handle:
                count += handle.read().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            continue
    return count


def _busy_now(readings: int = 5) -> float | None:
    """Runnable tasks of other processes (the least of a few readings 10 ms apart, Linux's /proc), else the
    1-minute load average."""
    import time

    try:
        seen = []
        for _ in range(readings):
            with open("/proc/loadavg") as handle:
                running = int(handle.read().split()[3].split("/")[0])
            seen.append(max(0, running - max(1, _own_running())))
            time.sleep(0.01)
        return float(min(seen))
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def use_sensible_threads() -> int | None:
    """Set torch's threads by :func:`choose_threads`, once per process, unless ``OMP_NUM_THREADS`` is set.

    Returns the number set, or None when the user's setting was kept.
    """
    global _APPLIED
    if _APPLIED or (os.environ.get("OMP_NUM_THREADS") and not os.environ.get("BLIP_TRACE_THREADS")):
        return None
    import torch

    _APPLIED = True
    threads = choose_threads()
    torch.set_num_threads(threads)
    return threads
