"""Edge scores of every edge (or a chosen set): EAP, EAP-IG or exact path patching, as an :class:`~.result.EdgeResult`.

    >>> from blip_trace_widgets import load_model, demo_samples
    >>> image, question, _ = demo_samples()[0]
    >>> result = edge_scores(load_model("demo"), image, question, method="eap", samples=2)
    >>> len(result.edges), result.top(1)
    (3417, ['img → qe.L3.X1.k'])

EAP costs one base forward, one source forward and one backward pass (plus the residual chains, elementwise work);
EAP-IG ``steps`` forward and backward passes more; exact runs one path-patching run per edge and draw, batched (the
demo model's 3,417 edges take seconds; on a BLIP-base-sized model choose one block's edges with ``edges=``: its
cost is estimated first and a run over 30 s is warned about). BLIP-2 and InstructBLIP (OPT or T5) are scored the
same way, their EAP and EAP-IG picked from :data:`ATTRIBUTIONS` by network family.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..core.errors import BlipTraceError
from .attribution import attribution_draws, query_attribution_draws
from .graph import CircuitGraph, circuit_graph
from .inputs import CircuitInputs, circuit_inputs
from .names import DEFAULT_SAMPLES, DEFAULT_SEED, DEFAULT_STEPS, NOISING, WARN_SECONDS, check_direction, check_method
from .network import Network, QueryNetwork, T5Network, network_of
from .patching import Path, Runs, chunk_rows, prepare, run_paths
from .result import EdgeResult


def chosen_edges(graph: CircuitGraph, edges: Any) -> np.ndarray:
    """Edge indices: every edge (None), a list of edge names, or (senders, receivers) selections."""
    if edges is None:
        return np.arange(len(graph))
    if isinstance(edges, tuple) and len(edges) == 2:
        return graph.edge_indices_between(*edges)
    return np.array([graph.edge_index(e) for e in edges], dtype=np.int64)


def exact_cost(runs: Runs, paths: int) -> float:
    """Seconds the exact scores of ``paths`` edges should take: one timed batch of path runs, scaled."""
    rows = min(chunk_rows(runs), 32)
    start = time.perf_counter()
    with torch.no_grad():
        runs.net.forward(*runs.base_inputs, runs.pair, rows=rows)
    per_row = (time.perf_counter() - start) / rows
    return 1.3 * per_row * paths * runs.samples


def exact_draws(runs: Runs, graph: CircuitGraph, chosen: np.ndarray, warn: bool = True) -> np.ndarray:
    """Exact edge scores per draw [samples, len(chosen)]; warns before a run estimated over 30 s."""
    seconds = exact_cost(runs, len(chosen))
    if warn and seconds > WARN_SECONDS:
        warnings.warn(f"exact scores of {len(chosen)} edges × {runs.samples} draws should take about {seconds:.0f} s: "
                      "choose fewer with edges=(senders, receivers), fewer samples, or method='eap-ig'",
                      stacklevel=3)
    paths = [Path(frozenset([int(graph.senders[i])]), (int(graph.receivers[i]),)) for i in chosen]
    return run_paths(runs, graph, paths)


def edge_scores(bundle: Any, image: Any, text: str, *, method: str = "eap-ig", steps: int = DEFAULT_STEPS,
                corruption: Any = None, direction: str = "noise", samples: int = DEFAULT_SAMPLES,
                seed: int = DEFAULT_SEED, answer: str | None = None, metric: str = "logprob", edges: Any = None,
                inputs: CircuitInputs | None = None) -> EdgeResult:
    """Every edge's score (``edges``: a subset, see :func:`chosen_edges`) by ``method``: "eap", "eap-ig" (``steps``
    interpolation points) or "exact" (path patching per edge). ``corruption``: see :mod:`~.inputs`."""
    check_method(method)
    direction = check_direction(direction)
    if not isinstance(steps, int) or not 1 <= steps <= 100:
        raise BlipTraceError(f"steps must be a whole number from 1 to 100, got {steps!r}")
    graph, net = circuit_graph(bundle), network_of(bundle)
    pair = inputs or circuit_inputs(bundle, image, text, corruption=corruption, samples=samples, seed=seed,
                                    answer=answer, metric=metric)
    start = time.perf_counter()
    runs = prepare(net, pair, direction)
    chosen = chosen_edges(graph, edges)
    if method == "exact":
        draws = exact_draws(runs, graph, chosen)
    else:
        draws = ATTRIBUTIONS[type(net)](runs, graph, steps if method == "eap-ig" else None)[:, chosen]
    return _result(runs, graph, chosen, draws, method, steps, text, time.perf_counter() - start)


#: EAP and EAP-IG per network family.
ATTRIBUTIONS: dict[type, Any] = {Network: attribution_draws, QueryNetwork: query_attribution_draws,
                                  T5Network: query_attribution_draws}


def _result(runs: Runs, graph: CircuitGraph, chosen: Sequence[int] | np.ndarray, draws: np.ndarray, method: str, steps: int,
            text: str, seconds: float) -> EdgeResult:
    pair = runs.pair
    clean = runs.base if NOISING[runs.direction] else runs.source
    corrupted = runs.source if NOISING[runs.direction] else runs.base
    return EdgeResult.of_draws(
        [graph.edges[i] for i in chosen], draws, deterministic=bool(pair.corruption.get("deterministic")),
        method=method, direction=runs.direction, steps=steps if method == "eap-ig" else None,
        corruption=dict(pair.corruption), question=text, answer=pair.answer_text,
        clean_score=float(clean.score.mean()), corrupted_score=float(corrupted.score.mean()), seconds=seconds,
        shape=dict(vars(graph.shape)))


