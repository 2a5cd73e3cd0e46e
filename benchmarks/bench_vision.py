"""Benchmark: image-side traces and sweeps.

    python benchmarks/bench_vision.py                 # about 10 minutes on 2 CPU cores
    python benchmarks/bench_vision.py --samples 3 10  # the BLIP-base-sized trace at 3 and 10 noise samples

Times, with peak resident memory:

* an image-side trace (``block="vision_encoder"``, hidden states, 6x6 regions + CLS = 37
  positions x 12 layers) on a BLIP-base-sized model from ``BlipConfig()`` defaults
  (random weights, 384x384 image, 577 image tokens), at 3 noise samples by default;
* the same on the demo model with every patch its own region (65 positions x 4 layers);
* a sweep on the demo model: 40 easy-VQA colour questions x 4 kinds, 10 noise samples.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trace import QUESTION, build_bundle, peak_gib, reset_peak  # noqa: E402

from blip_trace_widgets import GaussianNoise, TraceConfig, Tracer, load_model  # noqa: E402
from blip_trace_widgets.datasets.subsets import load_vqa_subset  # noqa: E402
from blip_trace_widgets.sweeps.sweep import sweep  # noqa: E402


def timed(label: str, work) -> None:
    reset_peak()
    start = time.perf_counter()
    detail = work()
    print(f"{label}: {time.perf_counter() - start:.2f} s, peak RSS {peak_gib():.2f} GiB {detail or ''}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="*", default=[3],
                        help="noise samples of the BLIP-base-sized trace (none: skip it)")
    args = parser.parse_args()
    bundle = build_bundle() if args.samples else None
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=np.uint8))
    for samples in args.samples:
        def base(samples=samples):
            result = Tracer(bundle, image, QUESTION).trace(block="vision_encoder", regions=6, samples=samples,
                                                           corruption=GaussianNoise(3.0))
            return f"({result.scores.size} cells)"

        timed(f"BLIP-base-sized, vision_encoder hidden, regions 6, S={samples}", base)
    demo = load_model("demo")
    sample = load_vqa_subset("easy-vqa-color", limit=1)[0]
    demo_image = sample.image.open()

    def demo_trace():
        result = Tracer(demo, demo_image, sample.question).trace(block="vision_encoder", samples=10,
                                                                 corruption=GaussianNoise(3.0))
        return f"({result.scores.size} cells)"

    timed("demo, vision_encoder hidden, every patch, S=10", demo_trace)
    questions = load_vqa_subset("easy-vqa-color", limit=40)
    configs = [TraceConfig(kind="hidden", corruption=GaussianNoise(10.0))] + [
        TraceConfig(kind=k, window=3, corruption=GaussianNoise(10.0)) for k in ("mlp", "self_attn", "cross_attn")]

    def demo_sweep():
        with tempfile.TemporaryDirectory() as out:
            table = sweep(demo, questions, configs=configs, out=out, progress=False)
        return f"({len(table)} rows, {len(questions)} questions)"

    timed("demo sweep, 40 questions x 4 kinds, S=10", demo_sweep)


if __name__ == "__main__":
    main()
