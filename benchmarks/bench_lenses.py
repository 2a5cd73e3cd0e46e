"""Benchmark: a lens of every position and layer against one forward pass of the model.

    python benchmarks/bench_lenses.py              # best of 3
    OMP_NUM_THREADS=1 python benchmarks/bench_lenses.py

Times, best of ``--repeats``:

* on a BLIP-base-sized VQA model (``bench_trace.build_bundle``: random weights from ``BlipConfig()``, a 384x384
  image, a 9-token question): one forward pass (vision encoder, question encoder, the answer decoder's first
  step), then the logit lens of the answer decoder's 12 layers, which runs that same pass with hooks and reads
  each layer through the head;
* on each demo model: its logit lens and its tuned lens (the shipped translators).

The target: the lens within 1.5x one forward pass (it is one forward pass plus the head per layer).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from bench_trace import QUESTION, build_bundle  # noqa: E402

from blip_trace_widgets import demo_samples, load_model  # noqa: E402
from blip_trace_widgets.lenses import lens  # noqa: E402


def best(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def forward(bundle, image) -> None:
    model = bundle.model
    pixels = bundle.processor.image_processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embeds = model.vision_model(pixel_values=pixels)[0]
        ids = torch.tensor([bundle.tokenizer(QUESTION)["input_ids"]])
        question = model.text_encoder(input_ids=ids, encoder_hidden_states=embeds)[0]
        model.text_decoder(input_ids=torch.tensor([[model.config.text_config.bos_token_id]]),
                           encoder_hidden_states=question)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    bundle = build_bundle()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=np.uint8))
    one = best(args.repeats, lambda: forward(bundle, image))
    lensed = best(args.repeats, lambda: lens(bundle, image, QUESTION))
    print(f"BLIP-base-sized: one forward pass {one:.3f} s; logit lens of 12 layers {lensed:.3f} s "
          f"({lensed / one:.2f}x)")
    sample_image, question, _ = demo_samples()[0]
    for name in ("demo", "demo-caption", "demo-blip2", "demo-instructblip"):
        demo = load_model(name, device="cpu")
        text = "a" if name == "demo-caption" else question
        times = {kind: best(args.repeats, lambda kind=kind, demo=demo, text=text: lens(demo, sample_image, text, kind=kind))
                 for kind in ("logit", "tuned")}
        print(f"{name}: logit lens {times['logit'] * 1000:.1f} ms, tuned lens {times['tuned'] * 1000:.1f} ms")


if __name__ == "__main__":
    main()
