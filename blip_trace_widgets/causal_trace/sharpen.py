"""Maps that sharpen until they are stable: noise drawn in rounds, each cell's statistics updated after each.

    >>> from blip_trace_widgets import load_model, demo_samples, trace
    >>> from blip_trace_widgets.causal_trace.sharpen import AutoSampling, status_text
    >>> image, question, _ = demo_samples()[0]
    >>> result = trace(load_model("demo"), image, question, kind="hidden", samples=AutoSampling(4, max_samples=12))
    >>> result.config["auto"]["stopped"] in ("budget", "stable"), result.config["samples"] <= 12
    (True, True)
    >>> status_text(result).split(" · ")[0] == f"{result.config['samples']} samples"
    True

``trace(..., samples="auto")`` draws ``round_samples`` noise samples at a time, traces every cell on them, and
updates each cell's paired statistics (:mod:`~.significance`) after each round. It stops when the set of
significant cells and the top cell have not changed for ``stable_rounds`` rounds (``empty_rounds`` while no cell is
significant: an empty set holds still while weak cells are still below the bar), at ``max_samples``, at
``max_seconds``, or when ``should_stop()`` says so (the explorers' stop button). Samples are drawn one at a time
from the seed's generator (:func:`~.corruption._draw`), so N samples drawn in rounds are the N samples of one
batch, and give the same map (to float rounding: the batches are other shapes).

A verified map (``method="verified"``) sharpens too: its estimate, over the seed's first draws (the config's
``samples``, at most ``DEFAULT_SAMPLES``), picks the cells to make exact once, and only those cells are drawn in
rounds; the others keep the estimate's values and are not tested (``config["auto"]["estimate_samples"]`` says over
how many draws it was made). Its exact cells equal those of the exact map of as many samples.

:func:`sharpening` yields each round's map instead of calling back: the explorers draw several maps in step with
it, each round shown as it comes (:mod:`~.widgets.sharpening`). ``progress(done, total)`` sees each round's cells.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..core.errors import BlipTraceError
from ..core.names import DEFAULT_SAMPLES
from ..core.scoring import Scores
from ..models.attention import Progress
from .results import TraceResult

#: The explorers' and ``samples="auto"``'s defaults: rounds of 4 samples, at most 64, stable for 2 rounds.
AUTO_ROUND_SAMPLES = 4
AUTO_MAX_SAMPLES = 64
AUTO_STABLE_ROUNDS = 2
#: Rounds an empty significant set must hold (it holds still while weak cells are still below the bar). Measured on
#: 180 demo maps (``scripts/measure_significance.py``): 4 instead of 2 drew a median 67% of 30 samples instead of 53%
#: and found a 30-sample map's significant set (Jaccard ≥ 0.8) in 78% of maps instead of 74%, but none of the 13 weak
#: MLP maps that only 30 samples flag; so the default waits as long as for any other set.
AUTO_EMPTY_ROUNDS = AUTO_STABLE_ROUNDS


@dataclass(frozen=True)
class AutoSampling:
    """How a map sharpens: samples per round, the budget (samples and, optionally, seconds), and how many rounds
    the significant set and the top cell must hold still before it stops."""

    round_samples: int = AUTO_ROUND_SAMPLES
    max_samples: int = AUTO_MAX_SAMPLES
    max_seconds: float | None = None
    stable_rounds: int = AUTO_STABLE_ROUNDS
    #: Rounds an empty significant set must hold before the map stops as stable (at least ``stable_rounds``).
    empty_rounds: int = AUTO_EMPTY_ROUNDS

    def __post_init__(self) -> None:
        if not (isinstance(self.round_samples, int) and self.round_samples >= 2):
            raise BlipTraceError(f"round_samples must be a whole number >= 2, got {self.round_samples!r}")
        if not (isinstance(self.max_samples, int) and self.max_samples >= self.round_samples):
            raise BlipTraceError(f"max_samples must be a whole number >= round_samples ({self.round_samples}), "
                                 f"got {self.max_samples!r}")
        if not (isinstance(self.stable_rounds, int) and self.stable_rounds >= 1):
            raise BlipTraceError(f"stable_rounds must be a whole number >= 1, got {self.stable_rounds!r}")
        if not (isinstance(self.empty_rounds, int) and self.empty_rounds >= 1):
            raise BlipTraceError(f"empty_rounds must be a whole number >= 1, got {self.empty_rounds!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise BlipTraceError(f"max_seconds must be positive, got {self.max_seconds!r}")


def _state(result: TraceResult) -> tuple[frozenset[int], int]:
    """The significant cells and the top cell (the largest mean effect toward clean) of a map."""
    stats = result.statistics()
    toward = np.nan_to_num(stats.mean * (1.0 if result.total_effect >= 0 else -1.0), nan=-np.inf)
    return frozenset(np.flatnonzero(stats.significant().ravel()).tolist()), int(np.argmax(toward.ravel()))


def status_text(result: TraceResult) -> str:
    """"24 samples · 4 of 32 cells significant · top cell stable" for a sharpening (or sharpened) map."""
    auto = result.config.get("auto") or {}
    stats = result.statistics()
    count, total = int(stats.significant().sum()), int(stats.tested().sum())
    text = f"{stats.samples} samples · {count} of {total} cells significant"
    held = int(auto.get("held", 0))
    text += " · top cell stable" if held >= AUTO_STABLE_ROUNDS else f" · top cell held {held} round{'s' * (held != 1)}"
    stopped = auto.get("stopped")
    return text + (f" · stopped: {stopped}" if stopped else " · sharpening…")


def can_sharpen(config: Any) -> bool:
    """Whether ``config``'s map is drawn in rounds: an exact or verified map whose cells share each noise draw.
    Estimates, fresh noise per cell and deterministic corruptions are traced once."""
    return (config.method in SHARPENED and not config.fresh_noise
            and not getattr(config.corruption, "deterministic", False))


#: The methods whose maps sharpen: every cell exact, or the estimate's top cells made exact (only those sharpen).
SHARPENED = ("exact", "verified")


def sharpen(tracer: Any, config: Any, plan: AutoSampling = AutoSampling(),
            on_round: Callable[[TraceResult], None] | None = None,
            should_stop: Callable[[], bool] | None = None, progress: Progress | None = None) -> TraceResult:
    """The exact map of ``config`` drawn in rounds until it is stable (see the module); ``on_round`` sees each
    round's map, ``progress(done, total)`` each round's cells as they are done. Estimates, fresh noise per cell and
    deterministic corruptions are traced once, as asked."""
    if not can_sharpen(config):
        samples = plan.max_samples if config.method in SHARPENED else config.samples
        return tracer.trace(replace(config, samples=samples), progress=progress)
    rounds = sharpening(tracer, config, plan, should_stop, progress)
    while True:
        result = next(rounds)
        if on_round is not None:
            on_round(result)
        if result.config["auto"]["stopped"]:
            return result


def sharpening(tracer: Any, config: Any, plan: AutoSampling = AutoSampling(),
               should_stop: Callable[[], bool] | None = None,
               progress: Progress | None = None) -> Iterator[TraceResult]:
    """Each round's map of :func:`sharpen` as it is drawn, the last one with ``config["auto"]["stopped"]`` set: the
    explorers draw several maps in step this way. Only for a map that :func:`can_sharpen`."""
    if not can_sharpen(config):
        raise BlipTraceError("only an exact or verified map whose cells share each noise draw sharpens: trace this one once")
    layout = tracer.plan(replace(config, samples=plan.round_samples))
    generator = torch.Generator().manual_seed(int(config.seed))
    exact, cells = tracer.scorers["exact"], layout.layout.cells
    estimate = _picked(tracer, config, plan) if config.method == "verified" else None
    rows = list(range(len(cells))) if estimate is None else estimate[2].tolist()
    draws: list[np.ndarray] = []
    lows: list[np.ndarray] = []
    history: list[tuple[frozenset[int], int]] = []
    start, held = time.perf_counter(), 0
    while True:
        k = min(plan.round_samples, plan.max_samples - sum(len(d) for d in draws))
        round_config = replace(layout.config, samples=k)
        corrupted = tracer.corrupted_runs.draw(round_config, generator)
        _, _, scores = exact.patched(layout.block, [cells[i] for i in rows], round_config, layout.target, corrupted,
                                     _advance(progress, len(rows)))
        low, high = tracer.baseline_draws(round_config, corrupted)
        every = np.full((k, len(cells)), np.nan)  # a verified map's estimated cells are not drawn
        every[:, rows] = scores
        draws.append(every)
        lows.append(low)
        result, held = _round_result(tracer, layout, draws, lows, high, history, plan, held, estimate)
        stopped = _stopped(result, plan, held, time.perf_counter() - start, should_stop)
        result.config["auto"] = {"round_samples": plan.round_samples, "rounds": len(draws), "held": held,
                                 "stopped": stopped, "seconds": round(time.perf_counter() - start, 3)}
        if estimate is not None:
            result.config["auto"]["estimate_samples"] = estimate[3]
        yield result
        if stopped:
            return


def _advance(progress: Progress | None, total: int) -> Callable[[int], None] | None:
    """A round's cell counter for ``progress(done, total)``."""
    if progress is None:
        return None
    done = 0

    def advance(count: int) -> None:
        nonlocal done
        done += count
        progress(done, total)

    return advance


def _picked(tracer: Any, config: Any, plan: AutoSampling) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """A verified map's estimate (mean and standard error of every cell) over the seed's first draws (the
    config's samples, at most ``DEFAULT_SAMPLES`` and the budget), the cells it makes exact, and its samples."""
    samples = min(int(config.samples), DEFAULT_SAMPLES, plan.max_samples)
    picking = tracer.plan(replace(config, samples=samples))
    mean, stderr, picked = tracer.scorers["verified"].pick(picking.block, picking.layout.cells, picking.config,
                                                           picking.target)
    return mean, stderr, np.asarray(picked, dtype=int), samples


def _round_result(tracer: Any, layout: Any, draws: list[np.ndarray], lows: list[np.ndarray], high: np.ndarray,
                  history: list[tuple[frozenset[int], int]], plan: AutoSampling, held: int,
                  estimate: tuple[np.ndarray, np.ndarray, np.ndarray, int] | None = None) -> tuple[TraceResult, int]:
    every = np.concatenate(draws)
    n = every.shape[0]
    if estimate is None:
        stderr = every.std(0, ddof=1) / np.sqrt(n) if n > 1 else np.full(every.shape[1], np.nan)
        scores = Scores(every.mean(0), stderr, np.ones(every.shape[1], bool), every)
    else:  # the estimate's cells as it gave them, its picked cells' exact statistics over the rounds' draws
        mean, stderr, picked, _ = estimate
        mean, stderr = mean.copy(), stderr.copy()
        exact = every[:, picked]
        mean[picked] = exact.mean(0)
        stderr[picked] = exact.std(0, ddof=1) / np.sqrt(n) if n > 1 else np.nan
        marked = np.zeros(every.shape[1], bool)
        marked[picked] = True
        scores = Scores(mean, stderr, marked, every)
    plan_n = type(layout)(replace(layout.config, samples=n), *layout[1:])  # the plan, with the samples drawn
    result = tracer.assemble(plan_n, scores, np.concatenate(lows), high)
    state = _state(result)
    held = held + 1 if history and state == history[-1] else 0
    history.append(state)
    return result, held


def _stopped(result: TraceResult, plan: AutoSampling, held: int, seconds: float,
             should_stop: Callable[[], bool] | None) -> str | None:
    """Why sharpening stops after this round, or None to draw another."""
    empty = not result.statistics().significant().any()
    if held >= (max(plan.stable_rounds, plan.empty_rounds) if empty else plan.stable_rounds):
        return "stable"
    if result.statistics().samples >= plan.max_samples:
        return "budget"
    if plan.max_seconds is not None and seconds >= plan.max_seconds:
        return "seconds"
    if should_stop is not None and should_stop():
        return "by the user"
    return None
