"""Benchmark: attention-head maps against today's position maps on a BLIP-base-sized model.

    python benchmarks/bench_attention_heads.py              # 3 noise samples, 3 repeats
    OMP_NUM_THREADS=1 python benchmarks/bench_attention_heads.py

Builds BLIP-base sizes from ``BlipConfig()`` (random weights: speed does not depend on them),
a 384x384 image and the 9-token question of ``bench_trace.py``. Times, end to end from a fresh
Tracer's corrupted run (the clean pass and the corrupted draw are made first and not timed):

* the question encoder's 9 x 12 ``hidden`` map (window 1), today's reference;
* all 12 x 12 ``cross_attn_head`` and ``self_attn_head`` cells (every position);
* the 12 x 12 ``cross_attn_head`` map at one position;
* the head map's estimate (one forward and one backward pass).

The target is all 144 cross-attention heads in no more than 1.5x the hidden map's time.
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
from bench_trace import QUESTION, build_bundle  # noqa: E402

from blip_trace_widgets import GaussianNoise, TraceConfig, Tracer  # noqa: E402


def timed(tracer: Tracer, config: TraceConfig, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        tracer.clear()  # the result and gradient caches would answer at once
        started = time.perf_counter()
        tracer.trace(config)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {args.samples} noise samples, best of {args.repeats}")
    bundle = build_bundle()
    if device == "cuda":
        from blip_trace_widgets import load_model

        bundle = load_model((bundle.model, bundle.processor), device="cuda")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=np.uint8))
    tracer = Tracer(bundle, image, QUESTION)
    base = TraceConfig(samples=args.samples, corruption=GaussianNoise(3.0))
    tracer.trace(base)  # the clean pass and the corrupted run, shared by everything below
    rows = [("question encoder hidden, 9 positions x 12 layers (reference)", base),
            ("cross_attn_head, 12 heads x 12 layers, every position", TraceConfig(**{**base.__dict__,
                                                                                    "kind": "cross_attn_head"})),
            ("self_attn_head, 12 heads x 12 layers, every position", TraceConfig(**{**base.__dict__,
                                                                                   "kind": "self_attn_head"})),
            ("cross_attn_head at one position (the last word)", TraceConfig(**{**base.__dict__,
                                                                              "kind": "cross_attn_head", "position": 7})),
            ("cross_attn_head, estimate", TraceConfig(**{**base.__dict__, "kind": "cross_attn_head",
                                                         "method": "estimate"}))]
    reference = None
    for label, config in rows:
        seconds = timed(tracer, config, args.repeats)
        reference = reference or seconds
        print(f"{label:62s} {seconds:7.3f} s  ({seconds / reference:.2f}x the hidden map)", flush=True)


if __name__ == "__main__":
    main()
