"""Circuits (the top-k edges by |score|) and how faithful they are: the circuit run, its faithfulness and the curve.

    >>> from blip_trace_widgets import load_model, demo_samples
    >>> from blip_trace_widgets.circuits.scores import edge_scores
    >>> bundle = load_model("demo")
    >>> image, question, _ = demo_samples()[0]
    >>> scores = edge_scores(bundle, image, question, method="eap-ig", samples=2)
    >>> kept = circuit(scores, k=300)
    >>> f = faithfulness(bundle, image, question, kept, samples=2)
    >>> f.value > 0.5, f.edges
    (True, 300)

The circuit run keeps a set C of edges: every receiver channel r reads its input recomputed from node outputs
(the frozen-node residual chain), where a sender u contributes its output in this circuit run if u → r is kept
and its corrupted-run output otherwise; every node computes its output from its channels' inputs, in topological
order, to ``out`` (``img`` and the embeddings take their clean values). Keeping every edge gives the clean run,
keeping none the corrupted run, so faithfulness = (m(C) − m(empty)) / (m(full) − m(empty)) is 1 for the whole
graph and 0 for none. With noise, each draw is its own corrupted run: the value is the ratio of the means over draws
(as MIB averages over a dataset), its 95% interval that of the numerator over draws, the denominator held at its
mean. The curve (MIB, Mueller et al. 2025) is faithfulness against the circuit's
size as a fraction of the graph's edges; its area (trapezoids) is the CPR, the area of |1 − f| the CMD. BLIP-2
and InstructBLIP (OPT) run the same circuit run (:class:`QueryCircuitRun`), a language-model channel's Q-Former
senders gated through the Q-Former's chain and the projection (with T5, the decoder's keys and values through the
encoder's chain and final norm); each family's run is picked from :data:`CIRCUIT_SCORES`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.errors import BlipTraceError
from ..core.significance import CellStatistics
from .graph import CircuitGraph, Point, circuit_graph
from .inputs import CircuitInputs, circuit_inputs
from .names import CURVE_FRACTIONS, DEFAULT_SAMPLES, DEFAULT_SEED, FORMAT, IMAGE, QE
from .network import Network, QueryNetwork, Record, T5Network, network_of
from .patching import clean_inputs, corrupted_inputs, pick
from .result import EdgeResult


class NoEffectError(BlipTraceError):
    """The clean and corrupted runs score alike, so faithfulness (a ratio over their difference) is undefined: a
    sweep leaves such a question out and counts it."""


@dataclass(frozen=True)
class Circuit:
    """A set of kept edges: the top ``k`` of an edge result by |score| (or any list of edges)."""

    edges: tuple[str, ...]
    k: int
    total: int
    method: str = ""

    @property
    def fraction(self) -> float:
        return self.k / self.total if self.total else 0.0

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "kind": "circuit", **asdict(self), "edges": list(self.edges)},
                          allow_nan=False, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Circuit:
        data = json.loads(text)
        return cls(tuple(data["edges"]), int(data["k"]), int(data["total"]), data.get("method", ""))


def circuit(result: EdgeResult, k: int | None = None, *, fraction: float | None = None) -> Circuit:
    """The top ``k`` edges of ``result`` by |score| (or the top ``fraction`` of its edges)."""
    if (k is None) == (fraction is None):
        raise BlipTraceError("give the circuit's size as k=(edges) or fraction=(of the graph's edges), one of them")
    if fraction is not None:
        if not 0.0 <= fraction <= 1.0:
            raise BlipTraceError(f"fraction must be from 0 to 1, got {fraction!r}")
        k = int(round(fraction * len(result.edges)))
    assert k is not None
    if k > len(result.edges):
        raise BlipTraceError(f"k={k} is more than the result's {len(result.edges)} edges: use at most that")
    return Circuit(tuple(result.top(k)), k, len(result.edges), result.method)


class CircuitRun:
    """A source for the circuit run: each channel's input from its own frozen-node chain, gated by kept edges."""

    def __init__(self, net: Network, graph: CircuitGraph, keep: torch.Tensor, corrupted: Record,
                 samples: torch.Tensor) -> None:
        self.net, self.graph, self.keep, self.samples = net, graph, keep, samples
        self.corrupted = {b: self.pick(corrupted.img[:, None] if b == IMAGE else net.contributions(corrupted, b))
                          for b in (IMAGE, QE, "dec")}
        self.record: Record | None = None
        self.parts: dict[str, list[torch.Tensor]] = {}

    def pick(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.shape[0] == 1 else t[self.samples]

    def bind(self, record: Record) -> None:
        self.record, self.parts = record, {}

    def projected(self, point: Point, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The image's keys and values: each head's projection of the clean image where its edge is kept, of the
        corrupted image where not (a projection is affine, so mixing projections mixes inputs)."""
        if self.graph.shape.source_block(point) != IMAGE:
            return tensors
        keep = self.keep[:, torch.from_numpy(self.graph.index[point][:, 0])]  # [R, 2H]
        image = self.corrupted[IMAGE][:, 0]
        heads = self.graph.shape.heads
        out = []
        for n, (linear, live) in enumerate(zip(self.net.linears(point), tensors)):
            corrupted = self.net.project(linear, image)
            gate = keep[:, n * heads:(n + 1) * heads, None, None].to(live.dtype)
            out.append(corrupted + gate * (live - corrupted))
        return tuple(out)

    def at(self, point: Point, default: torch.Tensor) -> torch.Tensor | None:
        assert self.record is not None
        block = self.graph.shape.source_block(point)
        table = torch.from_numpy(self.graph.index[point])
        slots = self.graph.shape.senders_at(point)
        gates = self.keep[:, table.clamp(min=0)] * (table >= 0)  # [R, C, slots of the source block]
        corrupted = self.corrupted[block][:, :slots]
        if block == IMAGE:
            return None  # the image's keys and values are mixed after their projections (see projected)
        own = self.net.contributions(self.record, block, slots, self.parts.setdefault(block, []))
        upto = point if point.block == block else Point(QE, self.net.shape.qe_layers, "in")
        return self.net.chain(block, corrupted, own - corrupted, gates[:, :, :slots].to(own.dtype), upto)


class QueryCircuitRun:
    """BLIP-2's circuit run: each channel's input from the frozen-node chain over the graph's nodes, a kept edge's
    sender contributing its output in this run and a dropped one's its corrupted-run output."""

    def __init__(self, net: QueryNetwork | T5Network, graph: CircuitGraph, keep: torch.Tensor, corrupted: Record,
                 samples: torch.Tensor) -> None:
        self.net, self.samples, self.shape = net, samples, graph.shape
        self.corrupted = {b: pick(net.contributions(corrupted, b), samples) for b in net.blocks}
        self.image = pick(corrupted.img, samples)
        self.gates: dict[Point, torch.Tensor] = {}
        for point, (width, places, nodes, edges) in graph.point_edges.items():
            gates = torch.zeros(keep.shape[0], width, len(graph.nodes), dtype=self.image.dtype)
            gates[:, torch.from_numpy(places), torch.from_numpy(nodes)] = keep[:, torch.from_numpy(edges)].to(gates)
            self.gates[point] = gates
        self.record: Record | None = None

    def bind(self, record: Record) -> None:
        self.record = record

    def at(self, point: Point, default: torch.Tensor) -> torch.Tensor | None:
        assert self.record is not None
        gates = self.gates[point]
        if self.shape.source_block(point) == IMAGE:
            return self.image[:, None] + gates[:, :, :1, None] * (self.record.img - self.image)[:, None]
        own = {b: self.net.contributions(self.record, b) for b in self.net.chain_blocks(point)}
        corrupted = {b: self.corrupted[b][:, :own[b].shape[1]] for b in own}
        delta = {b: own[b] - corrupted[b] for b in own}
        return self.net.chain(corrupted, delta, gates, point)


@torch.no_grad()
def query_circuit_scores(net: QueryNetwork | T5Network, graph: CircuitGraph, pair: CircuitInputs,
                         kept: list[np.ndarray]) -> np.ndarray:
    """m(C) of each kept-edge mask in ``kept`` in each draw (BLIP-2, InstructBLIP): [samples, circuits]."""
    samples = pair.samples
    corrupted = net.forward(*net.corrupted_inputs(pair), pair)
    keep = torch.from_numpy(np.repeat(np.stack(kept).astype(np.float32), samples, axis=0))
    rows = torch.arange(keep.shape[0]) % samples
    source = QueryCircuitRun(net, graph, keep, corrupted, rows)
    record = net.forward(*net.clean_inputs(pair), pair, source, rows=keep.shape[0])
    return record.score.double().numpy().reshape(len(kept), samples).T


@torch.no_grad()
def circuit_scores(net: Network, graph: CircuitGraph, pair: CircuitInputs, kept: list[np.ndarray]) -> np.ndarray:
    """m(C) of each kept-edge mask in ``kept`` (bool [edges]) in each draw: [samples, circuits]."""
    samples = pair.samples
    corrupted = net.forward(*corrupted_inputs(net, pair), pair)
    keep = torch.from_numpy(np.repeat(np.stack(kept).astype(np.float32), samples, axis=0))
    rows = torch.arange(keep.shape[0]) % samples
    source = CircuitRun(net, graph, keep, corrupted, rows)
    record = net.forward(*clean_inputs(net, pair), pair, source, rows=keep.shape[0])
    return record.score.double().numpy().reshape(len(kept), samples).T


@dataclass
class Faithfulness:
    """A circuit's faithfulness, (m(C) − m(empty)) / (m(full) − m(empty)) of the means over draws, and its 95%
    interval over draws (of m(C) − m(empty), the denominator held at its mean)."""

    value: float
    low: float
    high: float
    edges: int
    total: int
    draws: list[float] = field(default_factory=list)
    circuit_score: float = float("nan")
    clean_score: float = float("nan")
    corrupted_score: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}


def _ratios(circuit_draws: np.ndarray, clean: float, corrupted: np.ndarray) -> np.ndarray:
    """Each draw's m(C) − m(empty) over the mean of m(full) − m(empty): their mean is the ratio of the means (a
    draw whose corruption barely moves the score would blow up a ratio of its own)."""
    span = float(np.mean(clean - corrupted))
    if abs(span) < 1e-9:
        raise NoEffectError("the clean and corrupted runs score alike, so faithfulness is undefined: use a stronger "
                            "corruption")
    return (circuit_draws - corrupted[:, None]) / span


def _summary(ratios: np.ndarray, deterministic: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    stats = CellStatistics.of_draws(ratios[:, :, None], deterministic=True if deterministic else None)
    low, high = stats.interval()
    if ratios.shape[0] < 2 or stats.deterministic:
        low, high = stats.mean, stats.mean
    return stats.mean[:, 0], low[:, 0], high[:, 0]


#: Circuit runs per network family.
CIRCUIT_SCORES: dict[type, Any] = {Network: circuit_scores, QueryNetwork: query_circuit_scores,
                                    T5Network: query_circuit_scores}


def _setup(bundle: Any, image: Any, text: str, inputs: CircuitInputs | None,
           **fields: Any) -> tuple[CircuitGraph, Any, CircuitInputs, float, np.ndarray]:
    graph, net = circuit_graph(bundle), network_of(bundle)
    pair = inputs or circuit_inputs(bundle, image, text, **fields)
    with torch.no_grad():
        clean = float(net.forward(*clean_inputs(net, pair), pair).score[0])
        corrupted = net.forward(*corrupted_inputs(net, pair), pair).score.double().numpy()
    return graph, net, pair, clean, np.broadcast_to(corrupted, (pair.samples,)).copy()


def _mask(graph: CircuitGraph, edges: Any) -> np.ndarray:
    mask = np.zeros(len(graph), dtype=bool)
    mask[[graph.edge_index(e) for e in edges]] = True
    return mask


def faithfulness(bundle: Any, image: Any, text: str, kept: Circuit | list[str], *, corruption: Any = None,
                 samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED, answer: str | None = None,
                 metric: str = "logprob", inputs: CircuitInputs | None = None) -> Faithfulness:
    """The circuit run of ``kept`` (a :class:`Circuit` or edge names) and its faithfulness, over noise draws."""
    graph, net, pair, clean, corrupted = _setup(bundle, image, text, inputs, corruption=corruption, samples=samples,
                                                seed=seed, answer=answer, metric=metric)
    edges = list(kept.edges if isinstance(kept, Circuit) else kept)
    draws = CIRCUIT_SCORES[type(net)](net, graph, pair, [_mask(graph, edges)])
    ratios = _ratios(draws, clean, corrupted)
    mean, low, high = _summary(ratios, bool(pair.corruption.get("deterministic")))
    return Faithfulness(float(mean[0]), float(low[0]), float(high[0]), len(edges), len(graph),
                        ratios[:, 0].tolist(), float(draws.mean()), clean, float(corrupted.mean()))


@dataclass
class Curve:
    """Faithfulness against circuit size (top-k edges of one edge result): per k its mean and 95% interval, the area
    under the curve over the fraction of edges kept (CPR) and the area of |1 − f| (CMD)."""

    ks: list[int]
    fractions: list[float]
    values: list[float]
    low: list[float]
    high: list[float]
    total: int
    method: str = ""

    @property
    def area(self) -> float:
        """CPR: the area under faithfulness over the fraction of edges kept (trapezoids; 1 for a perfect curve)."""
        return float(np.trapezoid(self.values, self.fractions)) if len(self.ks) > 1 else float("nan")

    @property
    def cmd(self) -> float:
        """CMD: the area of |1 − faithfulness| over the fraction of edges kept (0 for a perfect curve)."""
        return float(np.trapezoid(np.abs(1.0 - np.asarray(self.values)), self.fractions)) if len(self.ks) > 1 \
            else float("nan")

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame({"k": self.ks, "fraction": self.fractions, "faithfulness": self.values, "low": self.low,
                             "high": self.high})

    def to_json(self) -> str:
        data = {k: [None if not np.isfinite(v) else v for v in vals] if isinstance(vals, list) else vals
                for k, vals in asdict(self).items()}
        return json.dumps({"format": FORMAT, "kind": "faithfulness_curve", **data}, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Curve:
        data = json.loads(text)
        floats = {k: [float("nan") if v is None else float(v) for v in data[k]] for k in ("fractions", "values", "low",
                                                                                            "high")}
        return cls([int(k) for k in data["ks"]], total=int(data["total"]), method=data.get("method", ""), **floats)


def faithfulness_curve(bundle: Any, image: Any, text: str, result: EdgeResult, *,
                       fractions: tuple[float, ...] = CURVE_FRACTIONS, corruption: Any = None,
                       samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED, answer: str | None = None,
                       metric: str = "logprob", inputs: CircuitInputs | None = None) -> Curve:
    """Faithfulness of the top-k circuits of ``result`` at each fraction of its edges, in one batched circuit run."""
    graph, net, pair, clean, corrupted = _setup(bundle, image, text, inputs, corruption=corruption, samples=samples,
                                                seed=seed, answer=answer, metric=metric)
    if any(not 0.0 <= f <= 1.0 for f in fractions):
        raise BlipTraceError("fractions must be from 0 to 1 (of the graph's edges)")
    ks = sorted({int(round(f * len(result.edges))) for f in fractions})
    order = result.order()
    masks = [_mask(graph, [result.edges[i] for i in order[:k]]) for k in ks]
    draws = CIRCUIT_SCORES[type(net)](net, graph, pair, masks)
    mean, low, high = _summary(_ratios(draws, clean, corrupted), bool(pair.corruption.get("deterministic")))
    return Curve(ks, [k / len(result.edges) for k in ks], mean.tolist(), low.tolist(), high.tolist(),
                 len(result.edges), result.method)
