"""Exact-match accuracy of the demo model's greedy answer on all easy-VQA test questions.

    python scripts/evaluate_demo_model.py [--model blip_trace_widgets/demo_model]

Uses plain transformers (BlipForQuestionAnswering.generate), not this package's engine,
so the figure is the model's own. Prints overall accuracy and accuracy per question type.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch
from PIL import Image
from transformers import BlipForQuestionAnswering, BlipProcessor

from blip_trace_widgets.datasets.easy_vqa import easy_vqa_questions, question_type
from blip_trace_widgets.models.loading import DEMO_MODEL_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    model = BlipForQuestionAnswering.from_pretrained(args.model).eval()
    processor = BlipProcessor.from_pretrained(args.model)
    questions = easy_vqa_questions(args.split)
    images: dict[str, Image.Image] = {}
    right, total = Counter(), Counter()
    with torch.no_grad():
        for start in range(0, len(questions), args.batch):
            batch = questions[start : start + args.batch]
            pics = [images.setdefault(p, Image.open(p).convert("RGB")) for p, _, _ in batch]
            inputs = processor(images=pics, text=[q for _, q, _ in batch], return_tensors="pt", padding=True)
            out = model.generate(**inputs, max_new_tokens=4)
            for (_, _, answer), ids in zip(batch, out):
                kind = question_type(answer)
                total[kind] += 1
                right[kind] += processor.tokenizer.decode(ids, skip_special_tokens=True).strip() == answer
    figures = {
        "questions": sum(total.values()),
        "accuracy": sum(right.values()) / sum(total.values()),
        "by_type": {k: right[k] / total[k] for k in sorted(total)},
        "seconds": round(time.time() - started, 1),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
