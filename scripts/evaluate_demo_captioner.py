"""Accuracy of the demo captioner and image-text matcher on every captioned easy-VQA test image.

    python scripts/evaluate_demo_captioner.py [--json-dir blip_trace_widgets]

Uses plain transformers only (``BlipForConditionalGeneration.generate`` and
``BlipForImageTextRetrieval``), not this package's engine, so the figures are the models' own.

* Captioning: exact match of the greedy caption (no prompt) with the caption built from the
  image's own questions (:func:`blip_trace_widgets.datasets.easy_vqa.easy_vqa_captions`).
* Image-text matching: each image with its own caption (should match) and with one caption that
  differs in colour, shape or both (seeded; should not). A pair counts as right when p(match) is on
  the right side of 0.5. Also the accuracy against each kind of mismatch, and ITC retrieval: the
  caption of highest cosine similarity among the 24 possible captions is the image's own.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor

from blip_trace_widgets.datasets.easy_vqa import COLORS, SHAPES, easy_vqa_captions
from blip_trace_widgets.models.loading import dtype_argument

PACKAGE = Path(__file__).resolve().parents[1] / "blip_trace_widgets"


def mismatched(caption: str, index: int) -> tuple[str, str]:
    """A wrong caption for test image ``index``: a different colour, a different shape, or both (in turn)."""
    _, color, shape = caption.split()
    change = ("color", "shape", "both")[index % 3]
    generator = torch.Generator().manual_seed(index)
    if change in ("color", "both"):
        color = [c for c in COLORS if c != color][int(torch.randint(len(COLORS) - 1, (1,), generator=generator))]
    if change in ("shape", "both"):
        shape = [s for s in SHAPES if s != shape][int(torch.randint(len(SHAPES) - 1, (1,), generator=generator))]
    return f"a {color} {shape}", change


def caption_accuracy(folder: Path, pairs: list[tuple[str, str]], images: list[Image.Image], batch: int) -> dict:
    model = BlipForConditionalGeneration.from_pretrained(folder, **dtype_argument(torch.float32)).eval()
    processor = BlipProcessor.from_pretrained(folder)
    right, wrong_examples = 0, []
    with torch.no_grad():
        for start in range(0, len(pairs), batch):
            inputs = processor(images=images[start : start + batch], return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=20)
            for (path, caption), ids in zip(pairs[start : start + batch], out):
                said = processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
                right += said == caption
                if said != caption and len(wrong_examples) < 5:
                    wrong_examples.append({"image": Path(path).name, "expected": caption, "generated": said})
    return {"images": len(pairs), "exact_match": right / len(pairs), "wrong_examples": wrong_examples}


def itm_accuracy(folder: Path, pairs: list[tuple[str, str]], images: list[Image.Image], batch: int) -> dict:
    model = BlipForImageTextRetrieval.from_pretrained(folder, **dtype_argument(torch.float32)).eval()
    processor = BlipProcessor.from_pretrained(folder)
    matched, by_change = [], {"color": [], "shape": [], "both": []}
    every = sorted({f"a {c} {s}" for c in COLORS for s in SHAPES})
    retrieved = []
    with torch.no_grad():
        text_inputs = processor(text=every, return_tensors="pt", padding=True)
        for start in range(0, len(pairs), batch):
            chunk = pairs[start : start + batch]
            pics = images[start : start + batch]
            wrong = [mismatched(caption, start + i) for i, (_, caption) in enumerate(chunk)]
            for texts, sink in (([c for _, c in chunk], matched), ([w for w, _ in wrong], None)):
                inputs = processor(images=pics, text=texts, return_tensors="pt", padding=True)
                p_match = torch.softmax(model(**inputs).itm_score, -1)[:, 1]
                if sink is not None:
                    sink.extend((p_match >= 0.5).tolist())
                else:
                    for (_, change), p in zip(wrong, p_match.tolist()):
                        by_change[change].append(p < 0.5)
            pixel = processor(images=pics, return_tensors="pt")["pixel_values"]
            # without the ITM head, itm_score is the [images, texts] matrix of ITC cosine similarities
            sims = model(pixel_values=pixel, use_itm_head=False, **text_inputs).itm_score
            retrieved.extend(every[int(row.argmax())] == caption for row, (_, caption) in zip(sims, chunk))
    mismatches = [x for v in by_change.values() for x in v]
    return {"images": len(pairs), "pairs": 2 * len(pairs),
            "accuracy": (sum(matched) + sum(mismatches)) / (len(matched) + len(mismatches)),
            "matched_accuracy": sum(matched) / len(matched),
            "mismatched_accuracy": {k: sum(v) / len(v) for k, v in by_change.items()},
            "itc_retrieval_top1": sum(retrieved) / len(retrieved)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caption-model", type=Path, default=PACKAGE / "demo_caption")
    parser.add_argument("--itm-model", type=Path, default=PACKAGE / "demo_itm")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="only the first N captioned images")
    parser.add_argument("--write", action="store_true", help="write evaluation.json into each model folder")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pairs = easy_vqa_captions(args.split)[: args.limit]
    images = [Image.open(path).convert("RGB") for path, _ in pairs]
    for name, folder, measure in (("caption", args.caption_model, caption_accuracy),
                                  ("itm", args.itm_model, itm_accuracy)):
        started = time.time()
        figures = {"split": args.split, **measure(folder, pairs, images, args.batch),
                   "seconds": round(time.time() - started, 1)}
        print(name, json.dumps(figures, indent=2))
        if args.write:
            (folder / "evaluation.json").write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
