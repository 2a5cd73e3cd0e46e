"""Measure circuit discovery on the demo model: edge scores against exact path patching, faithfulness, cost.

    OMP_NUM_THREADS=1 python scripts/measure_circuits.py                    # noise at the demo's level
    OMP_NUM_THREADS=1 python scripts/measure_circuits.py --corruption pairs # easy-VQA counterfactual image pairs
    OMP_NUM_THREADS=1 python scripts/measure_circuits.py --base             # cost on a BLIP-base-sized model too
    OMP_NUM_THREADS=1 python scripts/measure_circuits.py --sweep            # dataset averages (table 4 only)

Prints three tables:

1. Spearman rank correlation of EAP's and EAP-IG's edge scores with the exact edge scores (path patching, one run
   per edge and draw), over the top k edges by |exact score|, k = 25 ... every edge; mean over questions.
2. Faithfulness of the top-k circuits of each method at fractions of the graph's edges up to 15%, colour and shape
   questions apart: mean over questions and its 95% t-interval (each question's value is its own mean over draws).
3. Cost in forward-pass equivalents: seconds of each computation over the seconds of one plain forward pass of the
   batch (the corrupted inputs, one row per draw), medians of 3; EAP and EAP-IG include their base and source runs,
   faithfulness at one k includes its corrupted run.
4. With ``--sweep`` (alone): edge scores averaged over 30 colour and 30 shape questions (``--sweep-questions``) by
   EAP and EAP-IG: how many edges are significant (q < 0.05), the faithfulness of each average's top-15% circuit on
   the questions it was averaged over, on 30 held-out questions of the same kind, and on the other kind's questions
   (mean over questions, 95% t interval), and the edges (top 50) and heads (top 10) that colour and shape share, with
   the overlap chance gives and its hypergeometric p-value.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip_trace_widgets import __version__  # noqa: E402
from blip_trace_widgets.circuits.attribution import attribution_draws  # noqa: E402
from blip_trace_widgets.circuits.faithfulness import circuit_scores, faithfulness_curve  # noqa: E402
from blip_trace_widgets.circuits.graph import circuit_graph  # noqa: E402
from blip_trace_widgets.circuits.inputs import circuit_inputs  # noqa: E402
from blip_trace_widgets.circuits.network import Network  # noqa: E402
from blip_trace_widgets.circuits.patching import corrupted_inputs, prepare  # noqa: E402
from blip_trace_widgets.circuits.scores import edge_scores  # noqa: E402
from blip_trace_widgets.circuits.sweep import edge_sweep  # noqa: E402
from blip_trace_widgets.circuits.universal import dataset_faithfulness, universal_heads  # noqa: E402
from blip_trace_widgets.core.significance import t_quantile  # noqa: E402
from blip_trace_widgets.datasets.easy_vqa import easy_vqa_pairs, easy_vqa_questions, question_type  # noqa: E402
from blip_trace_widgets.models.loading import load_model  # noqa: E402

SIZES = (25, 50, 100, 200, 500, 1000, None)
FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.15)
METHODS = ("eap", "eap-ig", "exact")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(pd.Series(a).rank(), pd.Series(b).rank())[0, 1])


def questions(kind: str, count: int, corruption: str) -> list[tuple]:
    """(image, question, corruption) of ``count`` easy-VQA test questions of ``kind``, distinct images."""
    from PIL import Image

    if corruption == "pairs":
        return [(p.image, p.question, p.counterfactual_image) for p in easy_vqa_pairs(kind, limit=count)]
    out, seen = [], set()
    for path, question, answer in easy_vqa_questions("test"):
        if question_type(answer) == kind and path not in seen and len(out) < count:
            seen.add(path)
            out.append((Image.open(path).convert("RGB"), question, None))
    return out


def one_question(bundle, image, question, corruption, args) -> dict:
    pair = circuit_inputs(bundle, image, question, corruption=corruption, samples=args.samples, seed=args.seed,
                          metric=args.metric)
    results = {m: edge_scores(bundle, image, question, method=m, steps=args.steps, direction=args.direction, inputs=pair)
               for m in METHODS}
    exact = results["exact"].scores
    order = np.argsort(-np.abs(exact), kind="stable")
    row: dict = {"question": question, "effect": results["exact"].total_effect}
    for method in ("eap", "eap-ig"):
        for k in SIZES:
            chosen = order[:k]
            row[(method, k or len(exact))] = spearman(exact[chosen], results[method].scores[chosen])
        row[(method, "seconds")] = results[method].seconds
    row[("exact", "seconds")] = results["exact"].seconds
    for method in METHODS:
        curve = faithfulness_curve(bundle, image, question, results[method], fractions=FRACTIONS, inputs=pair)
        for fraction, value in zip(FRACTIONS, curve.values):
            row[("faith", method, fraction)] = value
    return row


def interval(values: list[float]) -> str:
    values = [v for v in values if np.isfinite(v)]
    if len(values) < 2:
        return f"{values[0]:.2f}" if values else "n/a"
    mean, half = float(np.mean(values)), t_quantile(0.95, len(values) - 1) * float(np.std(values, ddof=1)) / np.sqrt(len(values))
    return f"{mean:.2f} [{mean - half:.2f}, {mean + half:.2f}]"


def print_tables(rows: list[dict], kinds: list[str]) -> None:
    edges = max(k for r in rows for k in [key[1] for key in r if isinstance(key, tuple) and key[0] == "eap"
                                           and isinstance(key[1], int)])
    print("\n1. Spearman with exact edge scores over the top k edges by |exact| (mean over questions, min..max)")
    print("| k | EAP | EAP-IG |\n|---|---|---|")
    for k in SIZES:
        k = k or edges
        values = {m: [r[(m, k)] for r in rows] for m in ("eap", "eap-ig")}
        cells = [f"{np.mean(v):.2f} ({min(v):.2f}..{max(v):.2f})" for v in values.values()]
        print(f"| {k} | {cells[0]} | {cells[1]} |")
    print("\n2. Faithfulness of top-k circuits (mean over questions, 95% t-interval)")
    print("| questions | fraction of edges | " + " | ".join(METHODS) + " |\n|---|---|" + "---|" * len(METHODS))
    for kind in kinds:
        group = [r for r in rows if r["kind"] == kind]
        for fraction in FRACTIONS:
            cells = [interval([r[("faith", m, fraction)] for r in group]) for m in METHODS]
            print(f"| {kind} ({len(group)}) | {fraction:.3f} | " + " | ".join(cells) + " |")
    print("\nseconds per question (mean): " + ", ".join(f"{m} {np.mean([r[(m, 'seconds')] for r in rows]):.2f}"
                                                    for m in METHODS))


def median_seconds(function, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cost(bundle, image, question, args, label: str) -> None:
    """Forward-pass equivalents of EAP, EAP-IG and one faithfulness run on ``bundle``."""
    graph, net = circuit_graph(bundle), Network(bundle)
    pair = circuit_inputs(bundle, image, question, samples=args.samples, seed=args.seed)
    with torch.no_grad():
        unit = median_seconds(lambda: net.forward(*corrupted_inputs(net, pair), pair))

    def eap(steps):
        return lambda: attribution_draws(prepare(net, pair, "noise"), graph, steps)

    mask = np.zeros(len(graph), bool)
    mask[: len(graph) // 10] = True
    rows = {"EAP": median_seconds(eap(None)), f"EAP-IG ({args.steps} steps)": median_seconds(eap(args.steps)),
            "faithfulness at one k": median_seconds(lambda: circuit_scores(net, graph, pair, [mask]))}
    print(f"\n3. Cost on {label} ({len(graph)} edges, {args.samples} draws): one forward of the batch {unit:.3f} s")
    print("| computation | seconds | forward-pass equivalents |\n|---|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.3f} | {seconds / unit:.1f} |")


def sweep_items(kind: str, count: int, offset: int, corruption: str) -> list:
    """``count`` easy-VQA test questions of ``kind`` after the first ``offset`` (distinct images), or pairs."""
    if corruption == "pairs":
        return easy_vqa_pairs(kind, limit=offset + count)[offset:]
    return [(image, question) for image, question, _ in questions(kind, offset + count, "noise")[offset:]]


def sweep_tables(bundle, args) -> None:
    """Table 4: dataset averages, their circuits' faithfulness over questions, what colour and shape share."""
    count = args.sweep_questions
    items = {kind: sweep_items(kind, count, 0, args.corruption) for kind in ("color", "shape")}
    held_out = {kind: sweep_items(kind, count, count, args.corruption) for kind in ("color", "shape")}
    options = {"samples": args.samples, "seed": args.seed, "metric": args.metric}
    print(f"\n4. Edge scores averaged over {count} colour and {count} shape questions ({args.corruption}); faithfulness "
          "of the average's top-15% circuit over questions (mean, 95% t interval)")
    print("| method | questions | significant edges (q < 0.05) | seconds | faithfulness: same questions | held out | "
          "other kind |\n|---|---|---|---|---|---|---|")
    shared = {}
    for method in ("eap", "eap-ig"):
        averages = {}
        for kind in ("color", "shape"):
            start = time.perf_counter()
            average = edge_sweep(bundle, items[kind], method=method, steps=args.steps, direction=args.direction,
                                 **options)
            seconds = time.perf_counter() - start
            averages[kind] = average
            other = "shape" if kind == "color" else "color"
            cells = [dataset_faithfulness(bundle, chosen, average, fraction=0.15, **options)
                     for chosen in (items[kind], held_out[kind], items[other])]
            text = [f"{c.mean:.2f} [{c.low:.2f}, {c.high:.2f}] ({c.questions}{f', {c.left_out} left out' if c.left_out else ''})"
                    for c in cells]
            print(f"| {method} | {kind} ({average.questions}) | {int(average.significant().sum())} of "
                  f"{len(average.edges)} | {seconds:.1f} | " + " | ".join(text) + " |")
        shared[method] = universal_heads(averages["color"], averages["shape"], k=50, heads=10)
    print("\n| method | edges shared (top 50 of each) | chance | p | heads shared (top 10 of each) | chance | p | "
          "shared heads |\n|---|---|---|---|---|---|---|---|")
    for method, found in shared.items():
        e, h = found.edges, found.heads
        print(f"| {method} | {len(e.shared)} of {e.k} ({e.total} edges) | {e.expected:.2f} | {e.p_value:.2g} | "
              f"{len(h.shared)} of {h.k} ({h.total} heads) | {h.expected:.2f} | {h.p_value:.2g} | "
              f"{', '.join(h.shared) or 'none'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=6, help="questions per kind (colour, shape)")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corruption", choices=("noise", "pairs"), default="noise")
    parser.add_argument("--base", action="store_true", help="also the cost on a BLIP-base-sized model")
    parser.add_argument("--direction", choices=("noise", "denoise"), default="noise")
    parser.add_argument("--metric", choices=("logprob", "prob"), default="logprob")
    parser.add_argument("--cost-only", action="store_true", help="only table 3")
    parser.add_argument("--sweep", action="store_true", help="only table 4: averages over a dataset")
    parser.add_argument("--sweep-questions", type=int, default=30, help="questions per kind in table 4")
    args = parser.parse_args()
    if args.corruption == "pairs":
        args.samples = 1
    print(f"blip_trace_widgets {__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, load "
          f"average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; corruption {args.corruption}, "
          f"{args.samples} draws, EAP-IG {args.steps} steps, direction {args.direction}, metric {args.metric}")
    bundle = load_model("demo")
    if args.sweep:
        sweep_tables(bundle, args)
        return
    rows = []
    for kind in ("color", "shape") if not args.cost_only else ():
        for image, question, corruption in questions(kind, args.questions, args.corruption):
            rows.append({**one_question(bundle, image, question, corruption, args), "kind": kind})
    if rows:
        print_tables(rows, ["color", "shape"])
    image, question, _ = questions("color", 1, "noise")[0]
    cost(bundle, image, question, args, "the demo model")
    if args.base:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
        from bench_trace import QUESTION, build_bundle
        from PIL import Image
        big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=np.uint8))
        cost(build_bundle(), big, QUESTION, args, "a BLIP-base-sized model (random weights)")


if __name__ == "__main__":
    main()
