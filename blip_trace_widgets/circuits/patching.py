"""Exact path patching on the frozen-node graph: run A recomputes the receivers' inputs from node outputs with the
senders taken from the other run, run B lets only the receivers read them.

    >>> from blip_trace_widgets import load_model, demo_samples
    >>> image, question, _ = demo_samples()[0]
    >>> result = path_patch(load_model("demo"), image, question, sender="img", receivers="qe.L3.X*", samples=2)
    >>> result.effect < 0, result.samples
    (True, 2)

Noising (``direction="noise"``): base = the clean run, source = the corrupted run; the effect is m(run B) − m(clean).
Restoring (``direction="denoise"``): base = the corrupted run, source = the clean run; effect m(run B) − m(corrupted).
With noise each draw is its own pair of runs, and the effect's mean, standard error and 95% interval are over draws
(paired: each draw's run B against that draw's base). An edge u → r is ``sender=u, receivers=r``.

BLIP-2 and InstructBLIP (OPT) run the same two runs (:func:`query_chunk`): run A recomputes a receiver's input from
every node's contribution, the senders' from the source run, through the Q-Former's LayerNorms, the projection and
the language model's residual sum; run B is the base forward with only the receivers reading it (a head's own q, k
or v rows; an MLP's input; ``lm_head``'s input), skipping the Q-Former when every receiver is in the language model.
The corruption changes the image embeddings only; the prompt (and InstructBLIP's instruction) is the same in both.
With a T5 language model the same function runs them (the network's chain reaches the encoder's channels, the
decoder's keys and values through the encoder's output, the decoder's own channels); run B skips the Q-Former when
every receiver is in T5, and starts at the first receiver's decoder layer from the base run's encoder output and
residual when every receiver is in the decoder.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.significance import CellStatistics
from .graph import CircuitGraph, Point, circuit_graph
from .inputs import CircuitInputs, circuit_inputs
from .names import DEC, DEFAULT_SAMPLES, DEFAULT_SEED, IMAGE, NOISING, QE, QF, check_direction
from .network import Network, QueryNetwork, Record, T5Network, network_of

AnyNetwork = Network | QueryNetwork | T5Network

#: Path runs per batch (fewer on a wide model, see :func:`chunk_rows`).
MAX_ROWS = 256


@dataclass
class Runs:
    """The base and source runs of one pair in one direction (records detached), and their inputs."""

    net: Any  # Network or QueryNetwork
    pair: CircuitInputs
    direction: str
    base_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    base: Record
    source: Record
    _contrib: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return self.pair.samples

    def base_score(self) -> torch.Tensor:
        return self.base.score.expand(self.samples)

    def source_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The source run's inputs (the corrupted ones when noising)."""
        inputs = corrupted_inputs if NOISING[self.direction] else clean_inputs
        return inputs(self.net, self.pair)

    def contributions(self, which: str, block: str) -> torch.Tensor:
        key = (which, block)
        if key not in self._contrib:
            record = self.base if which == "base" else self.source
            self._contrib[key] = record.img[:, None] if block == IMAGE else self.net.contributions(record, block)
        return self._contrib[key]


def clean_inputs(net: AnyNetwork, pair: CircuitInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return net.clean_inputs(pair)


def corrupted_inputs(net: AnyNetwork, pair: CircuitInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return net.corrupted_inputs(pair)


@torch.no_grad()
def prepare(net: AnyNetwork, pair: CircuitInputs, direction: str) -> Runs:
    """The clean and corrupted runs, as base and source of ``direction``."""
    clean, corrupted = clean_inputs(net, pair), corrupted_inputs(net, pair)
    base_in, source_in = (clean, corrupted) if NOISING[check_direction(direction)] else (corrupted, clean)
    return Runs(net, pair, direction, base_in, net.forward(*base_in, pair).detached(),
                net.forward(*source_in, pair).detached())


def pick(t: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    return t if t.shape[0] == 1 else t[samples]


def receiver_inputs(runs: Runs, graph: CircuitGraph, senders: Sequence[frozenset[int]], points: Sequence[Point],
                    samples: torch.Tensor) -> list[torch.Tensor]:
    """Run A: for each row, the input its point's channels see when ``senders`` (node indices) take the source
    run's outputs and every other node the base run's (each [T, D], T the point's positions)."""
    out: list[torch.Tensor | None] = [None] * len(points)
    for point in dict.fromkeys(points):
        rows = [i for i, p in enumerate(points) if p == point]
        block = graph.shape.source_block(point)
        base = runs.contributions("base", block)
        slots = base.shape[1]
        gates = torch.zeros(len(rows), 1, slots, dtype=base.dtype)
        for n, i in enumerate(rows):
            for node in senders[i]:
                slot = graph.slot_of(node, block)
                if slot is not None:
                    gates[n, 0, slot] = 1.0
        picked = samples[rows]
        base_rows = pick(base, picked)
        delta = pick(runs.contributions("source", block), picked) - base_rows
        if block == IMAGE:
            values = base_rows[:, 0] + gates[:, 0, :1, None] * delta[:, 0]
        else:
            upto = point if point.block == block else Point(QE, runs.net.shape.qe_layers, "in")
            values = runs.net.chain(block, base_rows, delta, gates, upto)[:, 0]
        for n, i in enumerate(rows):
            out[i] = values[n]
    return [v for v in out if v is not None]


class Overrides:
    """A source for run B: some rows' channels read given inputs, every other channel the live residual."""

    def __init__(self, entries: dict[Point, tuple[list[int], list[int], torch.Tensor]], heads: int,
                 widths: dict[Point, int] | None = None) -> None:
        self.entries, self.heads, self.widths = entries, heads, widths

    def at(self, point: Point, default: torch.Tensor) -> torch.Tensor | None:
        if point not in self.entries:
            return None
        rows, chans, values = self.entries[point]
        b, t, d = default.shape
        width = self.widths[point] if self.widths is not None else \
            {"in": 3 * self.heads, "mid": self.heads, "kv": 2 * self.heads}.get(point.where, 1)
        x = default[:, None].expand(b, width, t, d).clone()
        x[torch.tensor(rows), torch.tensor(chans)] = values.to(x.dtype)
        return x


@dataclass(frozen=True)
class Path:
    """One path run: sender nodes and receiver channels (indices in the graph)."""

    senders: frozenset[int]
    receivers: tuple[int, ...]


@torch.no_grad()
def run_paths(runs: Runs, graph: CircuitGraph, paths: Sequence[Path], rows: int | None = None) -> np.ndarray:
    """Each path's effect in each draw: m(run B) − m(base), [samples, paths]."""
    samples = runs.samples
    order = sorted(range(len(paths)), key=lambda i: runs.net.path_key(graph, paths[i]))
    jobs = [(s, i) for i in order for s in range(samples)]
    draws = np.full((samples, len(paths)), np.nan)
    size = rows or chunk_rows(runs)
    for start in range(0, len(jobs), size):
        chunk = jobs[start:start + size]
        scores = PATH_CHUNKS[type(runs.net)](runs, graph, [paths[i] for _, i in chunk],
                                             torch.tensor([s for s, _ in chunk]))
        for (s, i), value in zip(chunk, scores.tolist()):
            draws[s, i] = value
    return draws


def _run_chunk(runs: Runs, graph: CircuitGraph, paths: list[Path], samples: torch.Tensor) -> torch.Tensor:
    entries_rows, entries_points, senders = [], [], []
    chans: list[int] = []
    for row, path in enumerate(paths):
        for r in path.receivers:
            point, c = graph.places[r]
            entries_rows.append(row)
            entries_points.append(point)
            chans.append(c)
            senders.append(path.senders)
    values = receiver_inputs(runs, graph, senders, entries_points, samples[torch.tensor(entries_rows)])
    by_point: dict[Point, tuple[list[int], list[int], list[torch.Tensor]]] = {}
    for n, (row, point, c) in enumerate(zip(entries_rows, entries_points, chans)):
        entry = by_point.setdefault(point, ([], [], []))
        entry[0].append(row)
        entry[1].append(c)
        entry[2].append(values[n])
    source = Overrides({p: (r, c, torch.stack(v)) for p, (r, c, v) in by_point.items()}, graph.shape.heads)
    img, qemb, demb = (pick(t, samples) for t in runs.base_inputs)
    states = pick(runs.base.final[QE], samples) if all(p.block == DEC for p in by_point) else None
    run_b = runs.net.forward(img, qemb, demb, runs.pair, source, question_states=states, rows=len(paths))
    return run_b.score - pick(runs.base_score(), samples)


def query_chunk(runs: Runs, graph: CircuitGraph, paths: list[Path], samples: torch.Tensor) -> torch.Tensor:
    """BLIP-2's path runs (one per row): run A recomputes each receiver's input with its path's senders from the
    source run (every node's gate over the graph's nodes), run B lets only the receivers read it."""
    net = runs.net
    by_point: dict[Point, list[tuple[int, int, frozenset[int]]]] = {}
    for row, path in enumerate(paths):
        for r in path.receivers:
            point, c = graph.places[r]
            by_point.setdefault(point, []).append((row, c, path.senders))
    base = {b: runs.contributions("base", b) for b in net.blocks}
    source = {b: runs.contributions("source", b) for b in net.blocks}
    entries = {}
    for point, items in by_point.items():
        picked = samples[torch.tensor([row for row, _, _ in items])]
        gates = torch.zeros(len(items), 1, len(graph.nodes), dtype=base[QF].dtype)
        for n, (_, _, senders) in enumerate(items):
            gates[n, 0, sorted(senders)] = 1.0
        if graph.shape.source_block(point) == IMAGE:
            image = pick(runs.base.img, picked)
            values = image + gates[:, 0, :1, None] * (pick(runs.source.img, picked) - image)
        else:
            rows = {b: pick(base[b], picked) for b in base}
            values = net.chain(rows, {b: pick(source[b], picked) - rows[b] for b in base}, gates, point)[:, 0]
        entries[point] = ([row for row, _, _ in items], [c for _, c, _ in items], values)
    widths = {p: len(graph.shape.channels_at(p)) for p in entries}
    overrides = Overrides(entries, 0, widths)
    img, qf_emb, lm_emb = (pick(t, samples) for t in runs.base_inputs)
    late = net.resume(list(entries), runs.base, lambda t: pick(t, samples))  # from the base run's states
    run_b = net.forward(img, qf_emb, lm_emb, runs.pair, overrides, rows=len(paths), **late)
    return run_b.score - pick(runs.base_score(), samples)


#: The path runs of one batch, per network family.
PATH_CHUNKS: dict[type, Any] = {Network: _run_chunk, QueryNetwork: query_chunk, T5Network: query_chunk}


def chunk_rows(runs: Runs) -> int:
    """Rows per batch of path runs: at most :data:`MAX_ROWS`, fewer where a row's activations are large."""
    n, d = runs.pair.img.shape[1], runs.pair.img.shape[2]
    per_row = 4 * (n + runs.pair.question_ids.shape[1]) * d * 64
    return int(max(8, min(MAX_ROWS, 2**30 // max(per_row, 1))))


@dataclass(frozen=True)
class PathResult:
    """The effect of one path-patching run: its mean over draws, standard error and 95% interval."""

    senders: list[str]
    receivers: list[str]
    direction: str
    effect: float
    stderr: float
    low: float
    high: float
    draws: list[float]
    base_score: float
    samples: int
    corruption: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}


def path_patch(bundle: Any, image: Any, text: str, *, sender: str | list[str], receivers: str | list[str],
               corruption: Any = None, direction: str = "noise", samples: int = DEFAULT_SAMPLES,
               seed: int = DEFAULT_SEED, answer: str | None = None, metric: str = "logprob",
               inputs: CircuitInputs | None = None) -> PathResult:
    """Path patching from the nodes ``sender`` selects to the channels ``receivers`` selects (see
    :meth:`~.graph.CircuitGraph.select_nodes`), exactly as the module defines it."""
    graph, net = circuit_graph(bundle), network_of(bundle)
    pair = inputs or circuit_inputs(bundle, image, text, corruption=corruption, samples=samples, seed=seed,
                                    answer=answer, metric=metric)
    nodes, channels = graph.select_nodes(sender), graph.select_channels(receivers)
    path = Path(frozenset(graph.nodes.index(n) for n in nodes), tuple(graph.channels.index(c) for c in channels))
    runs = prepare(net, pair, direction)
    draws = run_paths(runs, graph, [path])[:, 0]
    stats = CellStatistics.of_draws(draws[:, None, None], deterministic=True if pair.samples == 1 else None)
    low, high = (float(v[0, 0]) for v in stats.interval())
    return PathResult(nodes, channels, direction, float(stats.mean[0, 0]), float(stats.stderr[0, 0]), low, high,
                      draws.tolist(), float(runs.base_score().mean()), pair.samples, pair.corruption)
