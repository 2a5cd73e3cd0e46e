"""Benchmark: attribution-patching estimates against exact traces and against the forward-pass floor.

    python benchmarks/bench_estimates.py              # 2 threads, float32
    python benchmarks/bench_estimates.py --threads 1

On a BLIP-base-sized model from ``BlipConfig()`` defaults (random weights, 384x384 image,
a 9-token question), with 3 noise samples, in float32:

* the forward-pass floor: a fresh Tracer's clean pass and corrupted runs alone (what any
  trace needs before it restores anything);
* a question-encoder estimate of every kind (one forward and one backward pass, then each
  kind's map from the same gradients), against the exact hidden-state map;
* a vision-encoder estimate of every patch at every layer (577 x 12), against the exact
  map's time, scaled from a spread of cells (the whole exact map takes hours on a CPU);
* the demo model's explorer: the time from a control moving to the estimate on screen.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trace import QUESTION, build_bundle  # noqa: E402

from blip_trace_widgets import GaussianNoise, TraceConfig, Tracer, load_model  # noqa: E402
from blip_trace_widgets.core.names import DEFAULT_VERIFY, TEXT_KINDS  # noqa: E402

SAMPLES = 3


def clock(work) -> tuple[float, object]:
    start = time.perf_counter()
    out = work()
    return time.perf_counter() - start, out


def floor(bundle, image, config: TraceConfig) -> float:
    """A fresh tracer's clean pass and corrupted runs (vision, question encoder, decoder), nothing restored."""
    seconds, _ = clock(lambda: Tracer(bundle, image, QUESTION).baselines(config))
    return seconds


def question_encoder(bundle, image) -> None:
    config = TraceConfig(samples=SAMPLES, corruption=GaussianNoise(3.0))
    base = min(floor(bundle, image, config) for _ in range(2))
    tracer = Tracer(bundle, image, QUESTION)
    every, _ = clock(lambda: [tracer.trace(config, kind=k, method="estimate") for k in TEXT_KINDS])
    one, _ = clock(lambda: Tracer(bundle, image, QUESTION).trace(config, method="estimate"))
    exact, _ = clock(lambda: Tracer(bundle, image, QUESTION).trace(config))
    verified, _ = clock(lambda: Tracer(bundle, image, QUESTION).trace(config, method="verified"))
    print(f"question encoder, 9 tokens x 12 layers, S={SAMPLES}: forward floor {base:.2f} s; estimate of every kind "
          f"({len(TEXT_KINDS)}) {every:.2f} s = {every / base:.2f}x the floor (target < 1.5 s and <= 2x); hidden "
          f"alone: estimate {one:.2f} s, exact {exact:.2f} s ({exact / one:.1f}x), verified (top "
          f"{DEFAULT_VERIFY} exact) {verified:.2f} s ({verified / exact:.2f}x exact; target <= 0.5x)", flush=True)


def vision_encoder(bundle, image, cells_timed: int = 24) -> None:
    config = TraceConfig(block="vision_encoder", samples=SAMPLES, corruption=GaussianNoise(3.0))
    base = floor(bundle, image, config)
    estimate_s, result = clock(lambda: Tracer(bundle, image, QUESTION).trace(config, method="estimate"))
    tracer = Tracer(bundle, image, QUESTION)
    tracer.baselines(config)  # the corrupted runs, outside the timing
    positions, layers = result.scores.shape
    spread = [((layer, pos),) for pos, layer in zip(np.linspace(0, positions - 1, cells_timed).astype(int),
                                                    np.resize(np.arange(layers), cells_timed))]
    partial, _ = clock(lambda: tracer.restore(spread, config))
    exact = partial / cells_timed * positions * layers
    print(f"vision encoder, every patch ({positions} positions x {layers} layers), S={SAMPLES}: forward floor "
          f"{base:.2f} s; estimate {estimate_s:.2f} s (target < 10 s) = {estimate_s / base:.2f}x the floor; exact "
          f"about {exact / 60:.0f} min (scaled from {cells_timed} cells, {partial:.1f} s)", flush=True)


def demo_explorer() -> None:
    from blip_trace_widgets import demo_samples
    from blip_trace_widgets.widgets import TraceExplorer

    demo = load_model("demo")
    image, question, _ = demo_samples()[0]
    explorer = TraceExplorer(demo, image, question, background=False, mode="estimate")  # the estimate alone
    times: list[float] = []
    for kind in ("mlp", "cross_attn", "self_attn", "hidden"):
        for level in (4.0, 6.0):
            shown: list[float] = []
            start = time.perf_counter()
            handler = lambda _change, shown=shown, start=start: shown.append(time.perf_counter() - start)  # noqa: E731
            explorer.heatmap.observe(handler, names="value")
            if explorer.kind.value != kind:
                explorer.kind.value = kind
            else:
                explorer.noise.value = level
            explorer.heatmap.unobserve(handler, names="value")
            if shown:
                times.append(shown[0])
    print(f"demo explorer: the estimate is shown {np.median(times) * 1000:.0f} ms (median; max "
          f"{max(times) * 1000:.0f} ms, {len(times)} control moves) after a control moves (target < 100 ms)",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-vision", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f}", flush=True)
    bundle = build_bundle()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=np.uint8))
    question_encoder(bundle, image)
    if not args.skip_vision:
        vision_encoder(bundle, image)
    demo_explorer()


if __name__ == "__main__":
    main()
