"""Benchmark: edge scores (EAP, EAP-IG, exact) and a faithfulness curve, on the demo model and a BLIP-base-sized one.

    OMP_NUM_THREADS=1 python benchmarks/bench_circuits.py           # the demo model, 5 noise draws, best of 2
    OMP_NUM_THREADS=1 python benchmarks/bench_circuits.py --base    # and a BLIP-base-sized model (random weights)

On the BLIP-base-sized model exact scores run for one block's edges only (the decoder's edges into ``out``), as
``edge_scores(..., method="exact", edges=("dec", "out"))``; the estimate printed before is ``scores.exact_cost``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from blip_trace_widgets import __version__  # noqa: E402
from blip_trace_widgets.circuits.faithfulness import faithfulness_curve  # noqa: E402
from blip_trace_widgets.circuits.graph import circuit_graph  # noqa: E402
from blip_trace_widgets.circuits.inputs import circuit_inputs  # noqa: E402
from blip_trace_widgets.circuits.network import Network  # noqa: E402
from blip_trace_widgets.circuits.patching import prepare  # noqa: E402
from blip_trace_widgets.circuits.scores import chosen_edges, edge_scores, exact_cost  # noqa: E402
from blip_trace_widgets.datasets.easy_vqa import demo_samples  # noqa: E402
from blip_trace_widgets.models.loading import load_model  # noqa: E402


def best(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def bench(bundle, image, question, args, exact_edges=None) -> None:
    pair = circuit_inputs(bundle, image, question, samples=args.samples)
    graph = circuit_graph(bundle)
    chosen = chosen_edges(graph, exact_edges)
    estimate = exact_cost(prepare(Network(bundle), pair, "noise"), len(chosen))
    runs = {method: (lambda m=method: edge_scores(bundle, image, question, method=m, inputs=pair,
                                                  edges=exact_edges if m == "exact" else None))
            for method in ("eap", "eap-ig", "exact")}
    result = runs["eap-ig"]()
    runs["faithfulness curve (11 sizes)"] = lambda: faithfulness_curve(bundle, image, question, result, inputs=pair)
    print(f"| computation | seconds (best of {args.repeats}) |\n|---|---|")
    for name, run in runs.items():
        label = f"exact, {len(chosen)} edges (estimated {estimate:.1f} s)" if name == "exact" else name
        print(f"| {label} | {best(run, args.repeats):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--base", action="store_true")
    args = parser.parse_args()
    print(f"blip_trace_widgets {__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, load "
          f"average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores, {args.samples} noise draws")
    sample = demo_samples()[0]
    print("\nthe demo model")
    bench(load_model("demo"), sample.image, sample.question, args)
    if args.base:
        from bench_trace import QUESTION, build_bundle

        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=np.uint8))
        print("\na BLIP-base-sized model (random weights)")
        bench(build_bundle(), image, QUESTION, args, exact_edges=("dec", "out"))


if __name__ == "__main__":
    main()
