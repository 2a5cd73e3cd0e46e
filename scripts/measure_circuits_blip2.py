"""Measure circuit discovery on the BLIP-2 demo model (OPT): graph size, EAP's and EAP-IG's agreement with exact
edge scores, and the faithfulness of each method's top-15% circuit.

    OMP_NUM_THREADS=1 python scripts/measure_circuits_blip2.py [--model demo-blip2] [--samples 5]

Prints, per question (two colour and two shape questions of the demo set, the demo's noise on the image
embeddings): the seconds each method took, the Spearman rank correlation of EAP's and EAP-IG's scores with the exact
scores over the top 200 edges by |exact score|, and the faithfulness of each method's top 15% of edges.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip_trace_widgets import __version__  # noqa: E402
from blip_trace_widgets.circuits.faithfulness import circuit, faithfulness  # noqa: E402
from blip_trace_widgets.circuits.graph import circuit_graph  # noqa: E402
from blip_trace_widgets.circuits.inputs import circuit_inputs  # noqa: E402
from blip_trace_widgets.circuits.scores import edge_scores  # noqa: E402
from blip_trace_widgets.datasets.easy_vqa import demo_samples  # noqa: E402
from blip_trace_widgets.models.loading import load_model  # noqa: E402

QUESTIONS = (0, 3, 1, 4)  # colour, colour, shape, shape


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(x, kind="stable"), kind="stable") for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo-blip2")
    parser.add_argument("--samples", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"blip_trace_widgets {__version__}, {args.model}, {args.samples} draws, load {os.getloadavg()}")
    bundle = load_model(args.model)
    graph = circuit_graph(bundle)
    print(f"graph: {len(graph.nodes)} nodes, {len(graph.channels)} receiver inputs, {len(graph.edges)} edges; "
          f"{graph.counts()}")
    samples = demo_samples()
    for index in QUESTIONS:
        image, question = samples[index].image, samples[index].question
        pair = circuit_inputs(bundle, image, question, samples=args.samples)
        results, seconds = {}, {}
        for method in ("eap", "eap-ig", "exact"):
            start = time.perf_counter()
            results[method] = edge_scores(bundle, image, question, method=method, inputs=pair)
            seconds[method] = time.perf_counter() - start
        exact = results["exact"].scores
        top = np.argsort(-np.abs(exact), kind="stable")[:200]
        rho = {m: spearman(exact[top], results[m].scores[top]) for m in ("eap", "eap-ig")}
        faithful = {m: faithfulness(bundle, image, question, circuit(results[m], fraction=0.15), inputs=pair).value
                    for m in results}
        print(f"{question!r} -> {pair.answer_text!r}: clean {results['exact'].clean_score:.3f}, corrupted "
              f"{results['exact'].corrupted_score:.3f}; seconds " + ", ".join(f"{m} {s:.1f}" for m, s in seconds.items())
              + "; Spearman (top 200 by exact) " + ", ".join(f"{m} {r:.2f}" for m, r in rho.items())
              + "; faithfulness at 15% " + ", ".join(f"{m} {f:.2f}" for m, f in faithful.items()))
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
