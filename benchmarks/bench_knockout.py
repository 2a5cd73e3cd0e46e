"""Benchmark: attention knockout on a BLIP-base-sized model, against one clean forward pass of the model.

    python benchmarks/bench_knockout.py              # best of 3
    OMP_NUM_THREADS=1 python benchmarks/bench_knockout.py

Builds BLIP-base sizes from ``BlipConfig()`` (random weights: speed does not depend on them), a 384x384 image
and the 9-token question of ``bench_trace.py``. Times, best of ``--repeats``:

* one clean forward pass of the model (``BlipForQuestionAnswering``'s vision encoder, question encoder and
  answer decoder, teacher-forced on a one-token answer), the reference;
* 4 edge groups x 12 layers of the question encoder (image → question, image [CLS] → question, the top-left
  quarter → question, [CLS] of the question → question by self-attention), window 3, exact, from a fresh
  Knockout whose clean pass is made first and not timed;
* the same from a fresh Knockout, clean pass included;
* the estimate of the same 48 rows (one forward and one backward pass).

The target is the 48 exact rows in under 3x one clean forward pass.
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

from blip_trace_widgets.attention_knockout.edges import Edges  # noqa: E402
from blip_trace_widgets.attention_knockout.knockout import Knockout, KnockoutConfig  # noqa: E402
from blip_trace_widgets.core.regions import Box  # noqa: E402

GROUPS = (Edges(), Edges(keys="cls"), Edges(keys=Box(0.0, 0.0, 0.5, 0.5)), Edges(attention="self", keys=0))


def best(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; best of {args.repeats}")
    bundle = build_bundle()
    if device == "cuda":
        from blip_trace_widgets import load_model

        bundle = load_model((bundle.model, bundle.processor), device="cuda")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=np.uint8))
    model = bundle.model
    pixels = bundle.processor.image_processor(image, return_tensors="pt")["pixel_values"].to(bundle.device)
    ids = torch.tensor([bundle.tokenizer(QUESTION)["input_ids"]], device=bundle.device)
    answer = torch.tensor([[model.config.text_config.bos_token_id, 1000]], device=bundle.device)

    @torch.no_grad()
    def forward() -> None:
        embeds = model.vision_model(pixel_values=pixels)[0]
        states = model.text_encoder(input_ids=ids, encoder_hidden_states=embeds)[0]
        model.text_decoder(input_ids=answer, encoder_hidden_states=states)

    forward()
    clean = best(args.repeats, forward)
    config = KnockoutConfig(edges=GROUPS, window=3)
    estimate = KnockoutConfig(edges=GROUPS, window=3, method="estimate")

    def prepared(cfg: KnockoutConfig) -> float:
        """Best time of ``cfg`` on fresh Knockouts whose clean pass was made first."""
        times = []
        for _ in range(args.repeats):
            knock = Knockout.of(bundle, image, QUESTION)
            knock.tracer.clean  # noqa: B018  (the clean pass, not timed)
            started = time.perf_counter()
            knock.run(cfg)
            times.append(time.perf_counter() - started)
        return min(times)

    warm = prepared(config)
    cold = best(args.repeats, lambda: Knockout.of(bundle, image, QUESTION).run(config))
    est = prepared(estimate)
    rows = len(GROUPS) * 12
    print(f"one clean forward pass of the model:        {clean * 1000:8.1f} ms")
    print(f"{rows} knockout rows, exact (clean pass ready): {warm * 1000:8.1f} ms = {warm / clean:.2f}x the forward "
          "pass (target < 3x)")
    print(f"{rows} knockout rows, exact, fresh Knockout:    {cold * 1000:8.1f} ms = {cold / clean:.2f}x")
    print(f"{rows} knockout rows, estimate (clean ready):  {est * 1000:8.1f} ms = "
          f"{est / clean:.2f}x")


if __name__ == "__main__":
    main()
