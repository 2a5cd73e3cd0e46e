"""Benchmark: the batched engine against a plain per-cell loop and the paper's procedure.

    python benchmarks/bench_trace.py            # BLIP-base-sized model, random weights
    python benchmarks/bench_trace.py --full     # time every loop cell instead of a sample

Builds a model from ``BlipConfig()`` defaults (BLIP-base sizes; speed does not depend on
the weights), a 384x384 image and a question of 9 tokens ([CLS], 7 words, [SEP], the
length the paper kept). For ``hidden`` (window 1) and ``mlp`` (window 3), at 3 and 10
noise samples, it times:

(a) the plain per-cell loop: one forward pass of the text encoder and decoder per cell,
    the noise samples as the batch, the vision encoder run once;
(b) the paper's procedure: the same, but the vision encoder re-run for every cell;
(c) the engine (``trace()``, end to end from the image).

The loops cost the same for every cell, so by default they are timed on a spread of
cells and scaled to the grid (``--full`` times them all). It prints wall times, the
ratios a/c and b/c, the peak resident memory of each run, the engine's GFLOP/s against
a plain matmul, and the engine's time against the analytic FLOP floor.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BertTokenizer, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

from blip_trace_widgets import GaussianNoise, Tracer, load_model
from blip_trace_widgets.models.anatomy import module_name
from blip_trace_widgets.models.hooks import edit_output
from blip_trace_widgets.models.runs import grid_cells, start_layer

QUESTION = "what color is the shirt of the man"  # 7 words -> 9 tokens with [CLS] and [SEP]


def reset_peak() -> None:
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back memory freed by the previous run
    with open("/proc/self/clear_refs", "w") as handle:  # Linux: reset VmHWM to the current RSS
        handle.write("5")


def peak_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def build_bundle():
    torch.manual_seed(0)
    config = BlipConfig()
    model = BlipForQuestionAnswering(config)
    words = QUESTION.split()
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "blue"])}
    tokenizer = BertTokenizer(vocab=vocab)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 384, "width": 384}), tokenizer=tokenizer)
    return load_model((model, processor), device="cpu")


def analytic_floor(bundle, tokens: int, cells, kind: str, samples: int) -> float:
    """FLOPs of the minimal work: vision once, clean and corrupted runs, the prefix reused, image K/V shared."""
    t, v = bundle.model.config.text_config, bundle.model.config.vision_config
    d, inter, layers, vocab = t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.vocab_size
    n = (v.image_size // v.patch_size) ** 2 + 1
    vision = v.num_hidden_layers * n * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size + 2 * n * v.hidden_size)

    def text_layer(rows_tokens: int, cross_tokens: int) -> float:
        return rows_tokens * (6 * d * d + 2 * d * inter + 2 * tokens * d + 2 * cross_tokens * d)

    decoder_row = layers * (text_layer(1, tokens) + 2 * tokens * d * d) + d * d + d * vocab
    image_kv = layers * 2 * n * v.hidden_size * d
    runs = (1 + samples) * (layers * text_layer(tokens, n) + image_kv + decoder_row)
    steps = sum(layers - start_layer(cell, kind, layers) for cell in cells)
    engine = samples * (steps * text_layer(tokens, n) + len(cells) * decoder_row)
    return 2 * (vision + runs + engine)  # multiply-adds -> FLOPs


class Loop:
    """(a) and (b): one patched forward pass of the text encoder and decoder per cell."""

    def __init__(self, bundle, image, samples: int, rerun_vision: bool):
        self.bundle, self.model = bundle, bundle.model
        self.rerun_vision = rerun_vision
        proc = bundle.processor
        self.pixels = proc.image_processor(image, return_tensors="pt")["pixel_values"]
        self.ids = torch.tensor([proc.tokenizer(QUESTION)["input_ids"]]).expand(samples, -1)
        self.samples = samples
        self.corruption = GaussianNoise(3.0)
        with torch.no_grad():
            self.clean_embeds = self._vision()
            self.noisy = self._corrupt(self.clean_embeds)
            self.clean = {}
            names = [module_name("question_encoder", k, j) for k in ("hidden", "mlp") for j in range(12)]
            from blip_trace_widgets.models.hooks import record_outputs

            with record_outputs(self.model, names) as seen:
                self._text(self.clean_embeds)
            self.clean = dict(seen)

    def _vision(self):
        return self.model.vision_model(pixel_values=self.pixels)[0]

    def _corrupt(self, embeds):
        return self.corruption(embeds, self.samples, torch.Generator().manual_seed(0))

    def _text(self, embeds):
        m = self.model
        q = m.text_encoder(input_ids=self.ids[: embeds.shape[0]], encoder_hidden_states=embeds)[0]
        bos = torch.full((embeds.shape[0], 1), m.config.text_config.bos_token_id)
        return m.text_decoder(input_ids=bos, encoder_hidden_states=q).logits

    @torch.no_grad()
    def cell(self, kind: str, cell) -> float:
        embeds = self._corrupt(self._vision()) if self.rerun_vision else self.noisy
        with ExitStack() as stack:
            for layer, pos in cell:
                name = module_name("question_encoder", kind, layer)
                clean = self.clean[name]

                def restore(out, clean=clean, pos=pos):
                    out = out.clone()
                    out[:, pos] = clean[0, pos]
                    return out

                stack.enter_context(edit_output(self.model, name, restore))
            logits = self._text(embeds)
        return float(torch.softmax(logits[:, 0].float(), -1)[:, 0].mean())


def run(bundle, image, kind: str, window: int, samples: int, loop_cells: int | None, rate: float) -> dict:
    tracer_probe = Tracer(bundle, image, QUESTION)
    tokens = len(tracer_probe.question_ids)
    cells = grid_cells(tokens, 12, window)
    timed = cells if loop_cells is None else [cells[i] for i in np.linspace(0, len(cells) - 1, loop_cells).astype(int)]
    row: dict = {"kind": kind, "window": window, "samples": samples, "cells": len(cells), "loop_cells_timed": len(timed)}

    reset_peak()
    start = time.perf_counter()
    tracer = Tracer(bundle, image, QUESTION)
    tracer.trace(kind=kind, window=window, samples=samples)
    row["engine_s"] = time.perf_counter() - start
    row["engine_peak_gib"] = peak_gib()

    for label, rerun in (("loop", False), ("paper", True)):
        reset_peak()
        loop = Loop(bundle, image, samples, rerun_vision=rerun)
        start = time.perf_counter()
        for cell in timed:
            loop.cell(kind, cell)
        row[f"{label}_s"] = (time.perf_counter() - start) * len(cells) / len(timed)
        row[f"{label}_peak_gib"] = peak_gib()
    floor = analytic_floor(bundle, tokens, cells, kind, samples)
    row["floor_gflop"] = floor / 1e9
    row["engine_gflops"] = floor / 1e9 / row["engine_s"]
    row["floor_s_at_matmul_rate"] = floor / 1e9 / rate
    row["a_over_c"] = row["loop_s"] / row["engine_s"]
    row["b_over_c"] = row["paper_s"] / row["engine_s"]
    row["c_over_floor"] = row["engine_s"] / row["floor_s_at_matmul_rate"]
    return row


def widget_path() -> dict:
    from blip_trace_widgets import demo_samples

    bundle = load_model("demo", device="cpu")
    image, question, _ = demo_samples()[0]
    start = time.perf_counter()
    tracer = Tracer(bundle, image, question)
    tracer.trace(samples=10)
    cold = time.perf_counter() - start
    times = []
    for seed in range(1, 6):  # a new noise setting: new corrupted run, clean pass reused
        start = time.perf_counter()
        tracer.trace(samples=10, seed=seed)
        times.append(time.perf_counter() - start)
    return {"demo_heatmap_cold_s": cold, "demo_heatmap_new_noise_s": float(np.median(times))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="time every cell of the loops")
    parser.add_argument("--loop-cells", type=int, default=12, help="cells timed per loop when not --full")
    parser.add_argument("--samples", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus")
    rate = matmul_gflops()
    print(f"plain float32 matmul (2048^3): {rate:.1f} GFLOP/s")
    bundle = build_bundle()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=np.uint8))
    rows = []
    for kind, window in (("hidden", 1), ("mlp", 3)):
        for samples in args.samples:
            row = run(bundle, image, kind, window, samples, None if args.full else args.loop_cells, rate)
            rows.append(row)
            print(
                f"{kind:6s} w{window} S={samples:2d} | (a) loop {row['loop_s']:7.1f}s  (b) paper {row['paper_s']:7.1f}s  "
                f"(c) engine {row['engine_s']:6.2f}s | a/c {row['a_over_c']:5.1f}x  b/c {row['b_over_c']:5.1f}x | "
                f"peak GiB a {row['loop_peak_gib']:.2f} b {row['paper_peak_gib']:.2f} c {row['engine_peak_gib']:.2f} | "
                f"engine {row['engine_gflops']:.1f} GFLOP/s, floor {row['floor_gflop']:.0f} GFLOP = "
                f"{row['floor_s_at_matmul_rate']:.2f}s, c/floor {row['c_over_floor']:.2f}x",
                flush=True,
            )
    widget = widget_path()
    print(f"demo model, full question-encoder heatmap (10 samples): cold {widget['demo_heatmap_cold_s']:.3f}s, "
          f"new noise {widget['demo_heatmap_new_noise_s']:.3f}s")
    if args.json:
        args.json.write_text(json.dumps({"matmul_gflops": rate, "rows": rows, **widget}, indent=2) + "\n")


if __name__ == "__main__":
    main()
