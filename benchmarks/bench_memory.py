"""Peak memory of real-BLIP-sized work in half precision: can it run within Binder's 2 GB?

    python benchmarks/bench_memory.py [--folder /tmp/blip-base-sized]

Builds a BLIP-base-sized model from ``BlipConfig()`` defaults (random weights; memory does not
depend on them), saves it in float32 as the hub checkpoint is stored (once), then, in a fresh
process per dtype, measures the peak resident memory (ru_maxrss) after loading it with
``load_model(folder, dtype=...)``, after a full question-encoder heatmap (10 noise samples),
and after opening a TraceExplorer on it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

STEP = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from blip_trace_widgets import load_model, Tracer, default_config
from PIL import Image
import numpy as np
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
folder, dtype = sys.argv[1], sys.argv[2]
out = {}
started = time.perf_counter()
bundle = load_model(folder, dtype=dtype, device="cpu")
out["load_s"], out["load_gib"] = time.perf_counter() - started, peak()
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=np.uint8))
question = "what is the color of the big dog?"
started = time.perf_counter()
Tracer(bundle, image, question).trace(default_config(bundle, samples=10))
out["trace_s"], out["trace_gib"] = time.perf_counter() - started, peak()
from blip_trace_widgets.widgets import TraceExplorer
TraceExplorer(bundle, image, question, background=False)
out["explorer_gib"] = peak()
print(json.dumps(out))
"""


def build(folder: Path) -> None:
    if (folder / "model.safetensors").is_file():
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    from tiny_blip import make_tokenizer  # a BERT word-piece tokenizer over a small vocabulary
    from transformers import BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    torch.manual_seed(0)
    model = BlipForQuestionAnswering(BlipConfig()).to(torch.float32)
    words = "what is the color of big dog red blue green yes no".split()
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *words])}
    tokenizer = make_tokenizer(vocab)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    processor = BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", default="/tmp/blip-base-sized")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    args = parser.parse_args()
    folder = Path(args.folder)
    build(folder)
    size = (folder / "model.safetensors").stat().st_size / 2**30
    print(f"BLIP-base-sized model from BlipConfig(), float32 checkpoint {size:.2f} GiB, 1 CPU thread")
    for dtype in args.dtypes.split(","):
        run = subprocess.run([sys.executable, "-c", STEP, str(folder), dtype], capture_output=True, text=True)
        if run.returncode != 0:
            print(f"{dtype}: failed\n{run.stderr[-2000:]}")
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{dtype:9s} peak RSS after loading {r['load_gib']:.2f} GiB ({r['load_s']:.1f} s), after a full "
              f"question-encoder heatmap (10 samples) {r['trace_gib']:.2f} GiB ({r['trace_s']:.1f} s), with the "
              f"explorer open {r['explorer_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
