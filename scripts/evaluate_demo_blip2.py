"""Exact-match accuracy of the bundled demo BLIP-2 on easy-VQA's test questions, with plain transformers.

    python scripts/evaluate_demo_blip2.py                      # all 9,673 test questions
    python scripts/evaluate_demo_blip2.py --limit 500          # the first 500

Nothing from blip_trace_widgets runs here: ``Blip2Processor`` builds the inputs ("Question: {q} Answer:" after the
image's query placeholders) and ``Blip2ForConditionalGeneration.generate()`` answers greedily. Questions are batched
by their token length, so that no prompt is padded. Writes ``evaluation.json`` beside the model with ``--write``.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import easy_vqa
import torch
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor

PROMPT = "Question: {} Answer:"
FOLDER = Path(__file__).resolve().parent.parent / "blip_trace_widgets" / "demo_blip2"


def question_type(answer: str) -> str:
    return "yes/no" if answer in ("yes", "no") else "shape" if answer in ("circle", "rectangle", "triangle") else "color"


def evaluate(folder: Path, limit: int | None = None, batch: int = 256, prompt: str = PROMPT,
             model_class: type = Blip2ForConditionalGeneration, processor_class: type = Blip2Processor) -> dict:
    """Exact match of plain ``generate()`` on ``prompt`` around each question (InstructBLIP's demo: the question
    itself, with ``InstructBlipForConditionalGeneration`` and its processor)."""
    model = model_class.from_pretrained(folder, dtype=torch.float32).eval()  # (a float16 demo is stored in half)
    processor = processor_class.from_pretrained(folder)
    texts, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    count = len(texts) if limit is None else min(limit, len(texts))
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(count):
        groups[len(processor.tokenizer(prompt.format(texts[i]))["input_ids"])].append(i)
    said: dict[int, str] = {}
    started = time.time()
    for indices in groups.values():
        for start in range(0, len(indices), batch):
            chunk = indices[start: start + batch]
            images = [Image.open(paths[image_ids[i]]).convert("RGB") for i in chunk]
            inputs = processor(images=images, text=[prompt.format(texts[i]) for i in chunk], return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=5, do_sample=False, num_beams=1)
            new = out[:, inputs["input_ids"].shape[1]:]
            for i, tokens in zip(chunk, new):
                said[i] = processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    right = {i: said[i] == answers[i] for i in range(count)}
    by_type: dict[str, list[bool]] = defaultdict(list)
    for i, ok in right.items():
        by_type[question_type(answers[i])].append(ok)
    return {"questions": count, "accuracy": sum(right.values()) / count,
            "by_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())},
            "seconds": round(time.time() - started, 1)}


def run(description: str, folder: Path, measure: Callable[[Path, int | None], dict],
        also: Callable[[Path], dict] | None = None) -> None:
    """The command line of a demo's evaluation: ``measure`` the first ``--limit`` questions (or all, and then what
    ``also`` adds), print it, and with ``--write`` write ``evaluation.json`` beside the model."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", type=Path, default=folder)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--write", action="store_true", help="write evaluation.json beside the model")
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = measure(args.model, args.limit)
    if also is not None and args.limit is None:
        result.update(also(args.model))
    print(json.dumps(result, indent=2))
    if args.write:
        (args.model / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    run(__doc__.splitlines()[0], FOLDER, evaluate)


if __name__ == "__main__":
    main()
