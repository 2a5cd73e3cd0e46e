"""Edge scores over a dataset: each question's scores, and per edge their mean over questions with a 95% t interval,
a p-value and Benjamini–Hochberg q-values over the edges.

    >>> from blip_trace_widgets import load_model, demo_samples
    >>> from blip_trace_widgets.circuits.sweep import EdgeAverage, edge_sweep
    >>> average = edge_sweep(load_model("demo"), demo_samples(per_type=1), method="eap", samples=2)
    >>> average.questions, len(average.edges), average.scores.shape
    (3, 3417, (3, 3417))
    >>> EdgeAverage.from_json(average.to_json()) == average   # strict JSON, exact round trip
    True
    >>> average.to_dataframe().columns.tolist()[:6]
    ['edge', 'sender', 'receiver', 'mean', 'stderr', 'low']

Each question is scored by :func:`~.scores.edge_scores` (its score per edge: the mean over its noise draws) and is
one draw of the average: the mean over questions, its standard error ``std / sqrt(Q)``, the 95% Student-t interval
on Q − 1 degrees of freedom, a two-sided t-test of "no effect" per edge and Benjamini–Hochberg q-values over the
graph's edges (:mod:`~blip_trace_widgets.core.significance`). Scores are averaged as they are, in the metric's units
(as MIB averages over a dataset), not divided by each question's total effect. The items are easy-VQA samples,
``(image, question[, answer])`` tuples, dicts, or semantic pairs (:func:`~blip_trace_widgets.easy_vqa_pairs`,
:func:`~blip_trace_widgets.hf_pairs`), each corrupted with its own counterfactual image (one deterministic draw).

The run is priced before the rest of it starts: exact scores from one timed batch of path runs (before the first
question), EAP and EAP-IG from the first question's own time; a sweep priced over 30 s is said first with a
:class:`~blip_trace_widgets.causal_trace.cost.LongTraceWarning` naming what makes it cheaper.
"""
from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..causal_trace.cost import WARN_SECONDS, LongTraceWarning, duration
from ..core.errors import BlipTraceError
from ..core.significance import DEFAULT_Q, CellStatistics
from ..datasets.easy_vqa import check_limit
from ..datasets.subsets import as_samples, open_image
from .graph import circuit_graph
from .inputs import CircuitInputs, circuit_inputs
from .names import (
    DEFAULT_SAMPLES,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DEFAULT_TOP,
    FORMAT,
    METHOD_LABELS,
    check_direction,
    check_method,
    split_edge,
)
from .network import network_of
from .patching import prepare
from .result import EdgeResult
from .scores import chosen_edges, edge_scores, exact_cost

#: Which answer a sweep scores: the model's own, or the dataset's (its first token).
SCORED = ("model", "expected")
#: Fields each question keeps of its :class:`~.result.EdgeResult` in an average's JSON (the edges are written once).
QUESTION_FIELDS = ("scores", "stderr", "low", "high", "samples", "corruption", "question", "answer", "clean_score",
                   "corrupted_score", "seconds")


def finite_or_none(values: np.ndarray) -> list[float | None]:
    """Floats for strict JSON: NaN and infinities as None."""
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=np.float64).ravel()]


@dataclass(eq=False)
class EdgeAverage:
    """Edge scores averaged over questions: ``results`` holds each question's :class:`~.result.EdgeResult` (its own
    scores, intervals over draws, question and answer); per edge ``mean``, ``stderr``, ``low``/``high`` (95% t
    interval over questions), ``pvalues`` and ``qvalues`` (Benjamini–Hochberg over the edges) follow from them."""

    results: list[EdgeResult]
    mean: np.ndarray = field(init=False)
    stderr: np.ndarray = field(init=False)
    low: np.ndarray = field(init=False)
    high: np.ndarray = field(init=False)
    pvalues: np.ndarray = field(init=False)
    qvalues: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if not self.results:
            raise BlipTraceError("an edge average needs at least one question's edge scores: pass edge_sweep's results")
        first = self.results[0]
        for index, other in enumerate(self.results[1:], 1):
            if other.edges != first.edges or other.method != first.method or other.direction != first.direction:
                raise BlipTraceError(f"question {index}'s edge scores are not of the same edges, method and direction "
                                     "as question 0's: average results of one graph, method and direction")
        stats = CellStatistics.of_draws(self.scores[:, :, None], deterministic=False)  # the questions are the draws
        low, high = stats.interval()
        self.mean, self.stderr = stats.mean[:, 0], stats.stderr[:, 0]
        self.low, self.high = low[:, 0], high[:, 0]
        self.pvalues, self.qvalues = stats.pvalues[:, 0], stats.qvalues[:, 0]

    @property
    def edges(self) -> list[str]:
        return self.results[0].edges

    @property
    def scores(self) -> np.ndarray:
        """Each question's score per edge (its mean over draws): [questions, edges]."""
        return np.stack([r.scores for r in self.results])

    @property
    def questions(self) -> int:
        return len(self.results)

    @property
    def method(self) -> str:
        return self.results[0].method

    def significant(self, q: float = DEFAULT_Q) -> np.ndarray:
        """Edges whose q-value is under ``q`` (none with one question: nothing is tested)."""
        return np.nan_to_num(self.qvalues, nan=1.0) < q

    def as_result(self) -> EdgeResult:
        """The average as one :class:`~.result.EdgeResult` (score: the mean over questions, its t interval), for
        :func:`~.faithfulness.circuit` and the figures."""
        first = self.results[0]
        return EdgeResult(self.edges, self.mean, self.stderr, self.low, self.high, first.method, first.direction,
                          self.questions, first.steps, dict(first.corruption), f"{self.questions} questions", "",
                          float(np.mean([r.clean_score for r in self.results])),
                          float(np.mean([r.corrupted_score for r in self.results])),
                          float(np.sum([r.seconds for r in self.results])), dict(first.shape))

    def order(self) -> np.ndarray:
        """Edge indices by |mean|, largest first (ties in graph order)."""
        return self.as_result().order()

    def top(self, k: int) -> list[str]:
        """The ``k`` edges of largest |mean|."""
        return self.as_result().top(k)

    def significance_text(self, q: float = DEFAULT_Q) -> str:
        """"k of N edges significant (q < 0.05, Q questions)"."""
        return (f"{int(self.significant(q).sum())} of {len(self.edges)} edges significant (q < {q:g}, "
                f"{self.questions} question{'s' if self.questions != 1 else ''})")

    def title(self) -> str:
        first = self.results[0]
        level = first.corruption.get("level")
        what = first.corruption.get("name", "corruption") + (f" {level:g}σ" if isinstance(level, (int, float)) else "")
        return (f"{METHOD_LABELS.get(first.method, first.method)}, {first.direction}: {what}, mean over "
                f"{self.questions} questions; {self.significance_text()}")

    def to_dataframe(self) -> pd.DataFrame:
        """One row per edge: the mean over questions, its standard error and 95% interval, p- and q-value, whether it
        is significant (q < 0.05), its rank by |mean| and the number of questions."""
        pairs = [split_edge(e) for e in self.edges]
        return pd.DataFrame({"edge": self.edges, "sender": [p[0] for p in pairs], "receiver": [p[1] for p in pairs],
                             "mean": self.mean, "stderr": self.stderr, "low": self.low, "high": self.high,
                             "p_value": self.pvalues, "q_value": self.qvalues, "significant": self.significant(),
                             "rank": np.argsort(self.order(), kind="stable") + 1, "questions": self.questions})

    def question_table(self) -> pd.DataFrame:
        """Each question's scores, long: one row per (question, edge) with the question's text and answer."""
        edges = self.edges
        return pd.DataFrame({"question": np.repeat(np.arange(self.questions), len(edges)),
                             "text": np.repeat([r.question for r in self.results], len(edges)),
                             "answer": np.repeat([r.answer for r in self.results], len(edges)),
                             "edge": edges * self.questions, "score": self.scores.ravel()})

    def to_dict(self) -> dict[str, Any]:
        first = self.results[0].to_dict()
        shared = {k: first[k] for k in ("method", "direction", "steps", "shape")}
        per_question = [{k: r.to_dict()[k] for k in QUESTION_FIELDS} for r in self.results]
        summary = {name: finite_or_none(getattr(self, attribute)) for name, attribute in (
            ("mean", "mean"), ("stderr", "stderr"), ("low", "low"), ("high", "high"), ("p_value", "pvalues"),
            ("q_value", "qvalues"))}
        return {"format": FORMAT, "kind": "edge_average", "edges": self.edges, **shared, **summary,
                "questions": per_question}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> EdgeAverage:
        """The average :meth:`to_json` wrote (its statistics recomputed from the questions' scores)."""
        data = json.loads(text)
        if data.get("kind") != "edge_average":
            raise BlipTraceError("this JSON is not an edge average: write one with EdgeAverage.to_json()")
        shared = {"kind": "edge_scores", "edges": data["edges"],
                  **{k: data[k] for k in ("method", "direction", "steps", "shape")}}
        return cls([EdgeResult.from_json(json.dumps({**shared, **q})) for q in data["questions"]])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EdgeAverage) and self.to_json() == other.to_json()


@dataclass(frozen=True)
class Question:
    """One item of a sweep, ready to score: its image, text and circuit inputs."""

    image: Any
    text: str
    inputs: CircuitInputs


def question_inputs(bundle: Any, item: Any, index: int, *, corruption: Any = None, samples: int = DEFAULT_SAMPLES,
                    seed: int = DEFAULT_SEED, scored: str = "model", metric: str = "logprob") -> Question:
    """The circuit inputs of one sweep item: a pair's counterfactual image as its corruption, else ``corruption``."""
    pair = hasattr(item, "counterfactual_image")
    if pair and corruption is not None:
        raise BlipTraceError("pairs bring their own corruption (each one's counterfactual image): drop corruption=")
    answer = item.answer if scored == "expected" else None
    if scored == "expected" and not answer:
        raise BlipTraceError(f"item {index} has no answer: use scored='model', or give each item its answer")
    image = open_image(item.image)
    chosen = open_image(item.counterfactual_image) if pair else corruption
    inputs = circuit_inputs(bundle, image, item.question, corruption=chosen, samples=samples, seed=seed,
                            answer=answer, metric=metric)
    return Question(image, item.question, inputs)


def sweep_items(items: Iterable[Any], limit: int | None = None) -> list[Any]:
    """The items as samples (see :func:`~blip_trace_widgets.datasets.subsets.as_samples`), at most ``limit``."""
    if items is None or isinstance(items, (str, bytes)):
        raise BlipTraceError("a sweep needs its items: easy-VQA samples, (image, question[, answer]) tuples or pairs")
    limit = check_limit(limit)
    out: list[Any] = []
    for item in as_samples(items):
        if limit is not None and len(out) >= limit:
            break
        out.append(item)
    if not out:
        raise BlipTraceError("the sweep has no questions: pass at least one item (and a limit of at least 1)")
    return out


def warn_long(seconds: float, questions: int, method: str, stacklevel: int = 3) -> None:
    """A :class:`LongTraceWarning` before a sweep priced over :data:`WARN_SECONDS`, naming what makes it cheaper."""
    if seconds > WARN_SECONDS:
        cheaper = "fewer questions or edges=, or method='eap-ig'" if method == "exact" else \
            "fewer questions or samples, or method='eap'"
        warnings.warn(f"this edge sweep should take about {duration(seconds)} on this machine ({questions} questions, "
                      f"{METHOD_LABELS.get(method, method)}; a rough estimate): {cheaper} make it faster",
                      LongTraceWarning, stacklevel=stacklevel)


def _score(bundle: Any, question: Question, method: str, steps: int, direction: str, edges: Any) -> EdgeResult:
    with warnings.catch_warnings():  # the sweep priced the exact scores as a whole
        warnings.filterwarnings("ignore", message="exact scores of")
        return edge_scores(bundle, question.image, question.text, method=method, steps=steps, direction=direction,
                           edges=edges, inputs=question.inputs)


def edge_sweep(bundle: Any, items: Iterable[Any], *, method: str = "eap-ig", corruption: Any = None,
               samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED, steps: int = DEFAULT_STEPS,
               direction: str = "noise", scored: str = "model", metric: str = "logprob", edges: Any = None,
               limit: int | None = None, progress: Callable[[int], None] | None = None) -> EdgeAverage:
    """Every edge's score on each question of ``items`` (see the module's docstring) by ``method``, and their average.
    ``corruption`` is each question's (see :mod:`~.inputs`; pairs bring their own), seeded alike; ``scored``: the
    model's own answer or the dataset's; ``edges``: a subset (see :func:`~.scores.chosen_edges`); ``progress(done)``
    after each question."""
    check_method(method)
    direction = check_direction(direction)
    if scored not in SCORED:
        raise BlipTraceError(f"scored must be one of {', '.join(SCORED)}, got {scored!r}")
    chosen = sweep_items(items, limit)
    fields = {"corruption": corruption, "samples": samples, "seed": seed, "scored": scored, "metric": metric}
    first = question_inputs(bundle, chosen[0], 0, **fields)
    if method == "exact":
        runs = prepare(network_of(bundle), first.inputs, direction)
        paths = len(chosen_edges(circuit_graph(bundle), edges))
        warn_long(exact_cost(runs, paths) * len(chosen), len(chosen), method)
    results: list[EdgeResult] = []
    for index, item in enumerate(chosen):
        start = time.perf_counter()
        question = first if index == 0 else question_inputs(bundle, item, index, **fields)
        results.append(_score(bundle, question, method, steps, direction, edges))
        if index == 0 and method != "exact":
            warn_long((time.perf_counter() - start) * len(chosen), len(chosen), method)
        if progress is not None:
            progress(index + 1)
    return EdgeAverage(results)


def plot_edge_average(average: EdgeAverage, k: int = DEFAULT_TOP, q: float = DEFAULT_Q) -> Any:
    """The top ``k`` edges by |mean| as a layered graph (:func:`~.plots.draw_graph`): width by |mean|, significant
    edges (q < ``q``) in colour, the others grey and dashed; the title counts the significant edges."""
    from ..causal_trace.plots import new_figure
    from .plots import draw_graph

    figure = new_figure((10, 4.8))
    result = average.as_result()
    chosen = min(k, len(average.edges))
    draw_graph(figure.add_subplot(1, 1, 1), result, chosen, muted=~average.significant(q),
               title=f"{average.significance_text(q)}\n{METHOD_LABELS.get(average.method, average.method)}, mean "
                     f"over questions: top {chosen} edges by |mean| (blue: patching raises the score, red: lowers it; "
                     "grey, dashed: not significant)")
    return figure


def edge_average_png(average: EdgeAverage, k: int = DEFAULT_TOP) -> bytes:
    from ..causal_trace.plots import figure_png

    return figure_png(plot_edge_average(average, k))
