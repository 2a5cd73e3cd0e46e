"""Which cells of a map are real: paired effects per draw, their standard errors, intervals, p- and q-values.

    >>> import numpy as np
    >>> from blip_trace_widgets.core.significance import CellStatistics
    >>> draws = np.array([[[0.30, 0.01]], [[0.32, -0.02]], [[0.29, 0.02]], [[0.31, -0.01]]])  # 4 draws, 1 x 2 cells
    >>> stats = CellStatistics.of_draws(draws)
    >>> stats.mean.round(3).tolist(), stats.significant().tolist()
    ([[0.305, 0.0]], [[True, False]])

A cell's *effect* in one noise draw is paired: the cell's score minus the same draw's corrupted score when
restoring (``direction="denoise"``), the clean score minus the cell's score when noising. Its mean over ``n``
draws, the paired standard error ``std / sqrt(n)``, a two-sided Student-t p-value on ``n - 1`` degrees of
freedom and a 95% interval follow; Benjamini–Hochberg q-values control the false discovery rate over the map's
tested cells. A cell is *significant* when its q-value is under ``q`` (0.05 by default). Cells without draws
(n/a cells, estimated cells of a verified map) are not tested: NaN p- and q-values, never significant.

The same arithmetic serves averages over questions, where each question is a draw. With a deterministic
corruption (a word swap or an image pair on one input) every draw is the same: one draw is the whole map, and
:attr:`CellStatistics.deterministic` says so.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

#: The false discovery rate under which a cell counts as significant, everywhere (figures, tables, explorers).
DEFAULT_Q = 0.05
#: Below this relative size an effect of a deterministic map is float rounding, not an effect.
ROUNDING = 1e-6
#: Bootstrap resamples behind :func:`stability`.
BOOTSTRAP_ROUNDS = 200


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        step = d * c
        h *= step
        if abs(step - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t on ``df`` degrees of freedom; NaN for NaN input."""
    if not math.isfinite(t):
        return float("nan") if math.isnan(t) else 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(level: float, df: float) -> float:
    """The two-sided critical value: |T| <= value with probability ``level`` (2.262 for 0.95 on 9 df)."""
    low, high = 0.0, 1e6
    for _ in range(200):
        middle = (low + high) / 2.0
        if t_two_sided(middle, df) > 1.0 - level:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


def bh_qvalues(pvalues: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg q-values of the finite p-values (NaN stays NaN and is not counted)."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    tested = np.flatnonzero(np.isfinite(p.ravel()))
    if tested.size == 0:
        return out
    values = p.ravel()[tested]
    order = np.argsort(values, kind="stable")
    ranked = values[order] * tested.size / np.arange(1, tested.size + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    flat = out.ravel()
    flat[tested[order]] = np.minimum(ranked, 1.0)
    return flat.reshape(p.shape)


@dataclass(frozen=True, eq=False)
class CellStatistics:
    """Per cell: the mean effect, its standard error over ``samples`` independent draws, and the tests on them."""

    mean: np.ndarray
    stderr: np.ndarray
    samples: int
    deterministic: bool = False  # every draw the same: no sampling error, nothing to test
    counts: np.ndarray | None = None  # draws per cell, where cells have different numbers (averages)

    @classmethod
    def of_draws(cls, draws: np.ndarray, deterministic: bool | None = None) -> CellStatistics:
        """From per-draw effects [draws, rows, layers] (NaN where a cell was not run). ``deterministic``: whether the
        corruption gives the same input every draw (None: every draw equal counts as deterministic)."""
        draws = np.asarray(draws, dtype=np.float64)
        n = int(draws.shape[0])
        counts = np.isfinite(draws).sum(0)
        ragged = bool(((counts != n) & (counts > 0)).any())  # averages: a question may lack a row
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(draws, 0) if n else np.full(draws.shape[1:], np.nan)
            stderr = np.nanstd(draws, 0, ddof=1) / np.sqrt(counts) if n > 1 else np.full(mean.shape, np.nan)
        if ragged:
            return cls(mean, np.where(counts > 1, stderr, np.nan), n, counts=counts)
        if deterministic is None:
            spread = np.abs(draws - draws[:1])
            deterministic = bool(n > 1 and np.all(np.nan_to_num(spread) <= ROUNDING * np.maximum(1.0, np.abs(
                np.nan_to_num(mean)))))
        return cls(mean, np.zeros(mean.shape) if deterministic else stderr, n, deterministic=deterministic)

    @property
    def pvalues(self) -> np.ndarray:
        """Two-sided paired t-test of "no effect" per cell; NaN where untested (no draws, one draw, no spread)."""
        if self.deterministic:  # no sampling error: a cell's effect is exact, real unless it is rounding
            exact = np.where(np.abs(self.mean) > ROUNDING * np.maximum(1.0, np.abs(self.mean)), 0.0, 1.0)
            return np.where(np.isfinite(self.mean), exact, np.nan)
        if self.samples < 2:
            return np.full(self.mean.shape, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            t = self.mean / self.stderr
        df = (self.counts if self.counts is not None else np.full(t.shape, self.samples)).ravel() - 1
        p = np.array([t_two_sided(float(v), float(d)) if np.isfinite(v) and d > 0 else np.nan
                      for v, d in zip(t.ravel(), df)])
        zero_spread = (self.stderr == 0) & np.isfinite(self.mean)  # every draw identical in this cell
        p = p.reshape(self.mean.shape)
        p[zero_spread] = np.where(self.mean[zero_spread] == 0, 1.0, 0.0)
        return p

    @property
    def qvalues(self) -> np.ndarray:
        return bh_qvalues(self.pvalues)

    def significant(self, q: float = DEFAULT_Q) -> np.ndarray:
        """Cells whose q-value is under ``q``; none when untested."""
        with np.errstate(invalid="ignore"):
            return np.nan_to_num(self.qvalues, nan=1.0) < q

    def tested(self) -> np.ndarray:
        return np.isfinite(self.pvalues)

    def interval(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """The ``level`` confidence interval of each cell's mean effect (NaN where the standard error is)."""
        if self.samples < 2:
            return np.full(self.mean.shape, np.nan), np.full(self.mean.shape, np.nan)
        if self.counts is not None:
            quantiles = {int(c): t_quantile(level, int(c) - 1) for c in np.unique(self.counts) if c > 1}
            half = np.vectorize(lambda c: quantiles.get(int(c), np.nan), otypes=[float])(self.counts) * self.stderr
        else:
            half = t_quantile(level, self.samples - 1) * self.stderr
        return self.mean - half, self.mean + half


def stability(draws: np.ndarray, sign: float = 1.0, rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> dict[str, float]:
    """How often the top cell (largest mean effect times ``sign``: -1 when the total effect is negative) stays the
    top, and the top 3 stay the top 3 as a set, when the draws are resampled with replacement (a bootstrap):
    1.0 is a map whose ranking no single draw decides."""
    draws = np.asarray(draws, dtype=np.float64) * (1.0 if sign >= 0 else -1.0)
    n = draws.shape[0]
    flat = draws.reshape(n, -1)
    finite = np.isfinite(flat).all(0)
    if n < 2 or not finite.any():
        return {"top": float("nan"), "top3": float("nan"), "rounds": 0}
    values = np.where(finite, flat, -np.inf)
    k = min(3, int(finite.sum()))
    top, top3 = _top(values.mean(0), k)
    rng = np.random.default_rng(seed)
    again = values[rng.integers(0, n, (rounds, n))].mean(1)  # [rounds, cells]
    order = np.argsort(-again, axis=1, kind="stable")
    same_top = float(np.mean(order[:, 0] == top))
    same_three = float(np.mean([frozenset(int(i) for i in row[:k]) == top3 for row in order]))
    return {"top": same_top, "top3": same_three, "rounds": rounds}


def _top(means: np.ndarray, k: int) -> tuple[int, frozenset[int]]:
    order = np.argsort(-means, kind="stable")
    return int(order[0]), frozenset(int(i) for i in order[:k])


class Traced(Protocol):
    """What the statistics read from a result (a :class:`~.results.TraceResult`)."""

    draws: np.ndarray | None
    stderr: np.ndarray | None
    config: dict[str, Any]

    @property
    def absent_cells(self) -> np.ndarray: ...
    @property
    def exact_cells(self) -> np.ndarray: ...
    @property
    def is_estimate(self) -> bool: ...
    def indirect_effect(self) -> np.ndarray: ...


def cell_statistics(result: Traced) -> CellStatistics:
    """The statistics of a result's cells: paired, from its per-draw effects, when the cells shared their draws;
    else from each cell's own standard error and the corrupted score's (``low_stderr``), unpaired. Estimated cells
    are not tested."""
    deterministic = bool(result.config.get("deterministic"))
    untested = result.absent_cells | ~result.exact_cells
    if result.draws is not None:
        draws = np.where(untested[None], np.nan, result.draws)
        return CellStatistics.of_draws(draws, deterministic=True if deterministic else None)
    samples = int(result.config.get("samples") or 1)
    mean = np.where(untested, np.nan, result.indirect_effect())
    if result.stderr is None or samples < 2:
        return CellStatistics(mean, np.full(mean.shape, np.nan), samples, deterministic=deterministic)
    low = float(result.config.get("low_stderr") or 0.0)
    return CellStatistics(mean, np.sqrt(result.stderr ** 2 + low ** 2), samples)


def significance_text(result: Traced, q: float = DEFAULT_Q) -> str:
    """One line on what a map's cells can be trusted for: "k of N cells significant (q < 0.05, S samples)", or
    why none is, naming the fix."""
    stats = cell_statistics(result)
    tested = stats.tested()
    count, total = int(stats.significant(q).sum()), int(tested.sum())
    if stats.deterministic:
        return (f"deterministic corruption, one run: {count} of {total} cells change the score "
                "(no sampling error)")
    if result.is_estimate and not result.exact_cells.any():
        return "an estimate: its cells are not tested; the exact map (method='exact') is"
    if total == 0 and "questions" in result.config:
        return "no per-question effects kept: the cells cannot be tested"
    if total == 0:
        return (f"{stats.samples} sample{'s' if stats.samples != 1 else ''}: no cell can be tested; "
                "use samples >= 3")
    which = "exact cells" if result.is_estimate else "cells"
    unit = "questions" if "questions" in result.config else "samples"
    if count == 0:
        fix = ("average more questions" if unit == "questions" else
               "draw more samples, try another noise level, or a counterfactual that changes the answer")
        return f"no cell significant (q < {q:g}, {stats.samples} {unit}): {fix}"
    return f"{count} of {total} {which} significant (q < {q:g}, {stats.samples} {unit})"


class Uncertainty:
    """Each cell's uncertainty, for a result with per-draw effects (``draws``) or standard errors: mixed into
    :class:`~.results.TraceResult`."""

    def statistics(self) -> CellStatistics:
        """Each cell's mean effect, paired standard error and tests (:class:`~.significance.CellStatistics`): from
        the per-draw effects when the cells shared their draws; else (fresh noise per cell, older files) from the
        cells' own standard errors, unpaired."""
        return cell_statistics(self)  # type: ignore[arg-type]

    @property
    def effect_stderr(self) -> np.ndarray:
        """Each cell's standard error of its effect: paired with each draw's corrupted (or clean) score."""
        return self.statistics().stderr

    @property
    def pvalues(self) -> np.ndarray:
        return self.statistics().pvalues

    @property
    def qvalues(self) -> np.ndarray:
        """Benjamini–Hochberg q-values over the map's tested cells (NaN where untested)."""
        return self.statistics().qvalues

    def significant(self, q: float = DEFAULT_Q) -> np.ndarray:
        """Cells whose effect is real at false discovery rate ``q``."""
        return self.statistics().significant(q)

    def stability(self, rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> dict[str, float]:
        """How often the top cell and the top 3 stay on top when the draws are resampled (a bootstrap)."""
        result: Any = self
        if result.draws is None:
            return {"top": float("nan"), "top3": float("nan"), "rounds": 0}
        draws = np.where(result.absent_cells[None], np.nan, result.draws)
        return stability(draws, sign=1.0 if result.total_effect >= 0 else -1.0, rounds=rounds, seed=seed)

    def significance_text(self, q: float = DEFAULT_Q) -> str:
        """"k of N cells significant (q < 0.05, S samples)", or why none is, naming the fix."""
        return significance_text(self, q)  # type: ignore[arg-type]

