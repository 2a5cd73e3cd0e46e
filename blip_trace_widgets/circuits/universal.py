"""What two question sets share: the edges and heads in the top k of both averages (with the overlap chance would give
and a hypergeometric p-value), every node's rank in each, and a dataset circuit's faithfulness over questions.

    >>> import numpy as np
    >>> from blip_trace_widgets.circuits.result import EdgeResult
    >>> from blip_trace_widgets.circuits.sweep import EdgeAverage
    >>> edges = ["img → qe.L0.X0.k", "img → qe.L0.X1.k", "qe.L0.X0 → qe.L0.mlp", "qe.L0.X1 → qe.L0.mlp"]
    >>> def average(*rows):
    ...     return EdgeAverage([EdgeResult(edges, np.array(r), np.zeros(4)) for r in rows])
    >>> colour, shape = average([4, 0, 3, 1], [5, 0, 2, 1]), average([3, 1, 4, 0], [4, 0, 5, 1])
    >>> shared = universal_heads(colour, shape, k=2, heads=1)
    >>> shared.edges.shared, shared.heads.shared, shared.edges.expected
    (['img → qe.L0.X0.k', 'qe.L0.X0 → qe.L0.mlp'], ['qe.L0.X0'], 1.0)

A node's score in an average is the sum of |mean score| over the edges it sends and the edges it receives (an edge
into one of its q, k or v channels, or into its input): each edge counts once for its sender and once for its
receiver. Heads are the self- and cross-attention heads of both text blocks (``qe.L{l}.H{h}``, ``qe.L{l}.X{h}``,
``dec.…``). The overlap of two top-k sets drawn at random from the same N edges (or heads) is hypergeometric: its
mean is k₁·k₂ / N, and the p-value is P(overlap ≥ the one seen) (exact, from binomial coefficients).
"""
from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..core.errors import BlipTraceError
from ..core.significance import t_quantile
from .faithfulness import Circuit, NoEffectError, circuit, faithfulness
from .names import CHANNELS, DEFAULT_SAMPLES, DEFAULT_SEED, FORMAT, split_edge
from .sweep import EdgeAverage, question_inputs, sweep_items

#: A head's node name: a self- (H) or cross-attention (X) head of either text block.
HEAD = re.compile(r"^(qe|dec)\.L\d+\.[HX]\d+$")
#: Heads kept per average when comparing two.
DEFAULT_HEADS = 10
#: A dataset circuit's size when neither k nor fraction is given: 15% of the graph's edges.
DEFAULT_FRACTION = 0.15


def receiver_node(receiver: str) -> str:
    """The node a receiver channel belongs to: ``qe.L1.X0.k`` → ``qe.L1.X0``; an MLP's or ``out``'s is itself."""
    node, _, part = receiver.rpartition(".")
    return node if part in CHANNELS and node else receiver


def node_scores(average: EdgeAverage) -> pd.Series:
    """Every node's score: the sum of |mean| over the edges it sends or receives (see the module's docstring)."""
    totals: dict[str, float] = {}
    for edge, value in zip(average.edges, np.abs(np.nan_to_num(average.mean))):
        sender, receiver = split_edge(edge)
        for node in (sender, receiver_node(receiver)):
            totals[node] = totals.get(node, 0.0) + float(value)
    return pd.Series(totals, dtype=float).sort_values(ascending=False, kind="stable")


def hypergeometric_tail(seen: int, total: int, first: int, second: int) -> float:
    """P(X ≥ ``seen``) for the overlap X of a random ``first``-set and ``second``-set out of ``total`` items."""
    denominator = math.comb(total, second)
    tail = sum(math.comb(first, x) * math.comb(total - first, second - x) for x in range(seen, min(first, second) + 1))
    return min(1.0, tail / denominator)


@dataclass
class Overlap:
    """The top ``k`` of two rankings over the same ``total`` items, what they share, what chance gives, and P."""

    k: int
    total: int
    first: list[str]
    second: list[str]
    shared: list[str]
    expected: float
    p_value: float

    @classmethod
    def of(cls, first: list[str], second: list[str], total: int) -> Overlap:
        shared = [name for name in first if name in set(second)]
        return cls(len(first), total, first, second, shared, len(first) * len(second) / total if total else 0.0,
                   hypergeometric_tail(len(shared), total, len(first), len(second)))

    def describe(self, what: str) -> str:
        return (f"{len(self.shared)} of the top {self.k} {what} shared (chance: {self.expected:.2f} of {self.total}; "
                f"hypergeometric p = {self.p_value:.2g})")


@dataclass
class Universal:
    """The edges and the heads in the top k of two averages (``labels`` name them), and every node's rank in each."""

    edges: Overlap
    heads: Overlap
    table: pd.DataFrame
    labels: tuple[str, str] = ("first", "second")

    def describe(self) -> str:
        return (f"{self.labels[0]} and {self.labels[1]}: {self.edges.describe('edges')}; "
                f"{self.heads.describe('heads')}")

    def to_json(self) -> str:
        table = json.loads(self.table.to_json(orient="records"))
        return json.dumps({"format": FORMAT, "kind": "universal", "labels": list(self.labels),
                           "edges": asdict(self.edges), "heads": asdict(self.heads), "nodes": table}, allow_nan=False,
                          ensure_ascii=False)


def _check_k(name: str, value: Any, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= most:
        raise BlipTraceError(f"{name} must be a whole number from 1 to {most}, got {value!r}")
    return int(value)


def universal_heads(first: EdgeAverage, second: EdgeAverage, *, k: int = 50, heads: int = DEFAULT_HEADS,
                    labels: tuple[str, str] = ("colour", "shape")) -> Universal:
    """The edges in the top ``k`` by |mean| of both averages, the heads in the top ``heads`` by node score of both
    (see :func:`node_scores`), each with the overlap expected by chance and its hypergeometric p-value, and a table of
    every node: its score, its rank among all nodes and among heads, and whether it is in the top ``heads`` in each
    average, whether it is a head, and whether it is a head in the top of both (``shared``)."""
    if not isinstance(first, EdgeAverage) or not isinstance(second, EdgeAverage):
        raise BlipTraceError("universal_heads compares two edge averages: pass edge_sweep's results")
    if first.edges != second.edges:
        raise BlipTraceError("the two averages score different edges: sweep both on the same model")
    k = _check_k("k", k, len(first.edges))
    scores = [node_scores(first), node_scores(second)]
    names = [n for n in scores[0].index if HEAD.match(n)]
    heads = _check_k("heads", heads, len(names))
    top = [[n for n in s.index if HEAD.match(n)][:heads] for s in scores]
    edges = Overlap.of(first.top(k), second.top(k), len(first.edges))
    head_overlap = Overlap.of(top[0], top[1], len(names))
    table = pd.DataFrame({"node": scores[0].index})
    for label, series, chosen in zip(labels, scores, top):
        table[f"{label}_score"] = series.reindex(table["node"]).to_numpy()
        table[f"{label}_rank"] = table[f"{label}_score"].rank(ascending=False, method="first").astype(int)
        table[f"{label}_top"] = table["node"].isin(chosen)
    table["head"] = table["node"].map(lambda n: bool(HEAD.match(n)))
    for label in labels:  # the rank among heads alone (the top ``heads`` are those of rank ``heads`` or better)
        table[f"{label}_head_rank"] = table[f"{label}_score"].where(table["head"]).rank(ascending=False,
                                                                                         method="first")
    table["shared"] = table["node"].isin(head_overlap.shared)
    return Universal(edges, head_overlap, table, (labels[0], labels[1]))


@dataclass
class QuestionFaithfulness:
    """A dataset circuit's faithfulness on each question, their mean over questions and its 95% t interval.
    Questions whose clean and corrupted runs score alike (faithfulness undefined) are left out and counted."""

    values: list[float]
    texts: list[str]
    edges: int
    total: int
    left_out: int = 0
    mean: float = field(init=False)
    low: float = field(init=False)
    high: float = field(init=False)

    def __post_init__(self) -> None:
        values = np.asarray(self.values, dtype=np.float64)
        self.mean = float(values.mean()) if len(values) else float("nan")
        self.low = self.high = float("nan")
        if len(values) > 1:
            half = t_quantile(0.95, len(values) - 1) * float(values.std(ddof=1)) / math.sqrt(len(values))
            self.low, self.high = self.mean - half, self.mean + half

    @property
    def questions(self) -> int:
        return len(self.values)

    def describe(self) -> str:
        interval = f" [{self.low:.2f}, {self.high:.2f}]" if np.isfinite(self.low) else ""
        skipped = f", {self.left_out} left out" if self.left_out else ""
        return (f"faithfulness {self.mean:.2f}{interval} over {self.questions} questions (top {self.edges} of "
                f"{self.total} edges{skipped})")


def dataset_faithfulness(bundle: Any, items: Iterable[Any], average: EdgeAverage | Circuit, *, k: int | None = None,
                         fraction: float | None = None, corruption: Any = None, samples: int = DEFAULT_SAMPLES,
                         seed: int = DEFAULT_SEED, scored: str = "model", metric: str = "logprob",
                         limit: int | None = None) -> QuestionFaithfulness:
    """The dataset circuit (the top ``k`` edges, or ``fraction`` of them, 15% by default, of ``average``'s mean; or a given
    :class:`~.faithfulness.Circuit`) run on each question of ``items`` with its own corruption (as
    :func:`~.sweep.edge_sweep` builds it): each question's faithfulness (the ratio of its means over draws), and
    their mean and t interval over questions."""
    if not isinstance(average, Circuit) and k is None and fraction is None:
        fraction = DEFAULT_FRACTION
    kept = average if isinstance(average, Circuit) else circuit(average.as_result(), k, fraction=fraction)
    values, texts, left_out = [], [], 0
    for index, item in enumerate(sweep_items(items, limit)):
        question = question_inputs(bundle, item, index, corruption=corruption, samples=samples, seed=seed,
                                   scored=scored, metric=metric)
        try:
            found = faithfulness(bundle, question.image, question.text, kept, inputs=question.inputs)
        except NoEffectError:
            left_out += 1
            continue
        values.append(found.value)
        texts.append(question.text)
    if not values:
        warnings.warn(f"all {left_out} questions were left out: their corruption does not move the score",
                      stacklevel=2)
    return QuestionFaithfulness(values, texts, kept.k, kept.total, left_out)
