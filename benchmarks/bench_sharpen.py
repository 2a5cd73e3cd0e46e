"""Benchmark: maps that sharpen (``samples="auto"``): time to the first map, time until the significant cells and
the top cell hold still, and the cost of drawing in rounds against one batch of the same samples.

    OMP_NUM_THREADS=1 python benchmarks/bench_sharpen.py                      # the demo model, 20 easy-VQA questions
    OMP_NUM_THREADS=1 python benchmarks/bench_sharpen.py --base --questions 5  # a BLIP-base-sized model

The demo model (trained on easy-VQA) shows when a map becomes stable; a BLIP-base-sized model (random weights from
``BlipConfig()``, as ``bench_trace.py`` builds it) shows how long each round takes at real sizes, though with random
weights its cells are mostly noise and it tends to run to its budget. For each question it traces the question
encoder's hidden states (window 1) with ``AutoSampling(round_samples=4, max_samples=32)`` and records when each
round's map was ready; then, on the same warm tracer, one batch of as many samples as the rounds drew. It prints
medians over the questions, the machine's load and the release.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from blip_trace_widgets import Tracer, __version__, load_model
from blip_trace_widgets.causal_trace.procedures import resolve_config
from blip_trace_widgets.causal_trace.sharpen import AutoSampling, sharpen


def questions(base: bool, count: int) -> tuple[object, list[tuple[object, str]]]:
    if base:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_trace import QUESTION, build_bundle

        rng = np.random.default_rng(0)
        from PIL import Image

        images = [Image.fromarray(rng.integers(0, 255, (384, 384, 3), dtype=np.uint8)) for _ in range(count)]
        return build_bundle(), [(image, QUESTION) for image in images]
    from blip_trace_widgets.datasets.subsets import load_vqa_subset

    per_type = -(-count // 2)
    items = [*load_vqa_subset("easy-vqa-color", limit=per_type), *load_vqa_subset("easy-vqa-shape", limit=per_type)]
    return load_model("demo"), [(item[0].open(), item[1]) for item in items[:count]]


def one(bundle: object, image: object, question: str, plan: AutoSampling) -> dict[str, float]:
    tracer = Tracer(bundle, image, question)
    config = resolve_config(bundle, kind="hidden", window=1)
    tracer.trace(config, samples=2)  # the clean pass and caches, as an explorer has them before a change
    stamps: list[float] = []
    started = time.perf_counter()
    result = sharpen(tracer, config, plan, on_round=lambda r: stamps.append(time.perf_counter() - started))
    drawn = int(result.config["samples"])
    started = time.perf_counter()
    tracer.trace(config, samples=drawn, seed=int(config.seed) + 1)  # one batch of as many (another seed: not cached)
    batch = time.perf_counter() - started
    return {"first_map_s": stamps[0], "stopped_s": stamps[-1], "samples": drawn, "batch_s": batch,
            "overhead": stamps[-1] / batch - 1.0, "stable": float(result.config["auto"]["stopped"] == "stable"),
            "significant": int(result.significant().sum()), "cells": int(result.scores.size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", action="store_true", help="a BLIP-base-sized model (random weights)")
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--round", type=int, default=4)
    parser.add_argument("--max-samples", type=int, default=32)
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    bundle, items = questions(args.base, args.questions)
    plan = AutoSampling(round_samples=args.round, max_samples=args.max_samples)
    rows = [one(bundle, image, question, plan) for image, question in items]
    summary = {key: float(np.median([r[key] for r in rows])) for key in rows[0]}
    summary["stable_share"] = float(np.mean([r["stable"] for r in rows]))
    load = os.getloadavg()
    print(f"blip-trace-widgets {__version__}; {'BLIP-base-sized' if args.base else 'demo'} model; "
          f"{len(rows)} questions; torch threads {torch.get_num_threads()}; load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print("| first map (s) | stopped (s) | samples drawn | one batch of as many (s) | rounds' overhead | stable | "
          "significant cells |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {summary['first_map_s']:.2f} | {summary['stopped_s']:.2f} | {summary['samples']:.0f} | "
          f"{summary['batch_s']:.2f} | {summary['overhead']:+.0%} | {summary['stable_share']:.0%} | "
          f"{summary['significant']:.0f} of {summary['cells']:.0f} |")
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
