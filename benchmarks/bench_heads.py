"""Benchmark: captioning and image-text matching traces on BLIP-base-sized models (random weights).

    python benchmarks/bench_heads.py [--samples 10]

Builds a ``BlipForConditionalGeneration`` and a ``BlipForImageTextRetrieval`` from ``BlipConfig()``
defaults (BLIP-base sizes: 12 text layers, width 768, a ViT-B/16 at 384x384; speed does not depend on
the weights) and prints wall times of:

* a whole caption traced word by word (``trace_caption``, the caption decoder's hidden states, window 1)
  after BLIP's prompt "a picture of", for a supplied 7-word caption, exact and estimated;
* the ITM encoder's hidden-state map of a 7-word text, exact and estimated;
* one vision-encoder map with 3x3 regions (and CLS) for each head, at 3 noise samples.

Each figure is the first run in a fresh Tracer (clean pass included). Reports torch's thread count and the
load average.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipImageProcessor,
    BlipProcessor,
)

from blip_trace_widgets import GaussianNoise, Tracer, load_model, trace_caption

PROMPT = "a picture of"
CAPTION = "a man in a blue shirt smiling"


def bundle_of(cls):
    torch.manual_seed(0)
    words = sorted(set((PROMPT + " " + CAPTION).split()))
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *words])}
    tokenizer = BertTokenizer(vocab=vocab)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    config = BlipConfig()
    config.text_config.bos_token_id = vocab["[DEC]"]
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 384, "width": 384}), tokenizer=tokenizer)
    return load_model((cls(config), processor), device="cpu")


def timed(what: str, run) -> None:
    started = time.perf_counter()
    run()
    print(f"{what:70s} {time.perf_counter() - started:7.2f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=np.uint8))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} cores; {args.samples} noise samples, Gaussian 3σ")
    noise = GaussianNoise(3.0)
    captions(image, noise, args.samples)  # one model at a time: the captioner is freed before the matcher is built
    matches(image, noise, args.samples)


def captions(image, noise, samples: int) -> None:
    captioner = bundle_of(BlipForConditionalGeneration)
    for method in ("exact", "estimate"):
        timed(f"caption decoder, {len(CAPTION.split())} words after '{PROMPT}', hidden, {method}",
              lambda method=method: trace_caption(captioner, image, PROMPT, CAPTION, samples=samples,
                                                  corruption=noise, method=method))
    timed("caption: vision encoder, 3x3 regions + CLS, one word, hidden, 3 samples, exact",
          lambda: Tracer(captioner, image, PROMPT).trace(block="vision_encoder", answer=CAPTION, word=4, regions=3,
                                                         samples=3, corruption=noise))


def matches(image, noise, samples: int) -> None:
    matcher = bundle_of(BlipForImageTextRetrieval)
    for method in ("exact", "estimate"):
        timed(f"ITM encoder, '{CAPTION}' (9 tokens), hidden, {method}",
              lambda method=method: Tracer(matcher, image, CAPTION).trace(block="itm_encoder", samples=samples,
                                                                          corruption=noise, method=method))
    for metric in ("prob", "itc"):
        timed(f"ITM: vision encoder, 3x3 regions + CLS, hidden, {metric}, 3 samples, exact",
              lambda metric=metric: Tracer(matcher, image, CAPTION).trace(block="vision_encoder", regions=3,
                                                                          metric=metric, samples=3, corruption=noise))

if __name__ == "__main__":
    main()
