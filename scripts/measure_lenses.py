"""The logit lens against the tuned lens on the demo models: KL to the final layer's distribution per layer, on
held-out easy-VQA test questions; and the time to train each demo model's tuned lens.

    python scripts/measure_lenses.py --train          # (re)train and save the shipped translators, then measure
    python scripts/measure_lenses.py --items 100      # measure the shipped translators on 100 test questions
    python scripts/measure_lenses.py --base           # CPU time to train on a BLIP-base-sized model (random weights)
    python scripts/measure_lenses.py --confidence 200 # internal confidence: AUROC of the right colour against a wrong one

The translators are trained on the first 256 easy-VQA train questions (a captioner: each train image's caption
less its last word), 300 steps, seed 0, and measured on the first ``--items`` test ones: the mean KL(final ||
lens) over every position of every item, per layer. Prints a table per model.

``--confidence N``: for the first N easy-VQA test images whose questions settle one colour and one shape, each
image's internal confidence (:func:`~blip_trace_widgets.lenses.confidence.image_confidence`: the largest logit-lens
p(word) over queries and layers) of its colour and of a wrong colour drawn at random (seed 0) from the seven others,
on demo-blip2 and demo-instructblip (its instruction: "what is the color of the shape?"); prints the AUROC of the
right colour's confidence against the wrong one's, and how often the right one is higher on the same image.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from blip_trace_widgets import load_model  # noqa: E402
from blip_trace_widgets.lenses.core import lens_log_probs  # noqa: E402
from blip_trace_widgets.lenses.names import TRAIN_ITEMS, TRAIN_STEPS  # noqa: E402
from blip_trace_widgets.lenses.reading import lens_block, read  # noqa: E402
from blip_trace_widgets.lenses.tuned import (  # noqa: E402
    TunedLens,
    default_items,
    shipped_lens,
    train_tuned_lens,
    translator_path,
)

DEMOS = ("demo", "demo-caption", "demo-blip2", "demo-instructblip")


def held_out_kl(bundle, block: str, items, tuned: TunedLens) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean KL(final || lens) per layer over every position of ``items``: (logit, tuned)."""
    from PIL import Image

    sums = {"logit": 0.0, "tuned": 0.0}
    rows = 0
    for path, text in items:
        reading = read(bundle, Image.open(path), text, block)
        for kind in sums:
            logp = lens_log_probs(bundle, reading, kind, tuned)
            final = logp[-1]
            sums[kind] = sums[kind] + (final.exp()[None] * (final[None] - logp)).sum(-1).sum(-1)
        rows += reading.states.shape[1]
    return sums["logit"] / rows, sums["tuned"] / rows


def train(name: str) -> float:
    bundle = load_model(name, device="cpu")
    block = lens_block(bundle, None)
    started = time.perf_counter()
    tuned = train_tuned_lens(bundle, block=block, steps=TRAIN_STEPS, seed=0, limit=TRAIN_ITEMS, progress=False)
    seconds = time.perf_counter() - started
    tuned.save(translator_path(name, block))
    print(f"{name}: trained in {seconds:.1f} s (final summed KL {tuned.config['final_loss']:.4f})")
    return seconds


def measure(name: str, items: int) -> None:
    bundle = load_model(name, device="cpu")
    block = lens_block(bundle, None)
    logit, tuned = held_out_kl(bundle, block, default_items(bundle, "test", items), shipped_lens(bundle, block))
    middle = (len(logit) - 1) // 2
    print(f"\n{name}, {block}, {items} held-out test items (mean KL in nats over every position)")
    print("| layer | logit lens | tuned lens | tuned / logit |")
    print("|---|---|---|---|")
    for layer in range(len(logit)):
        ratio = f"{float(tuned[layer] / logit[layer]):.2f}" if float(logit[layer]) > 0 else "-"
        mark = " (middle)" if layer == middle else ""
        print(f"| {layer}{mark} | {float(logit[layer]):.4f} | {float(tuned[layer]):.4f} | {ratio} |")


def base_training_time(items: int, steps: int) -> None:
    """Train on a BLIP-base-sized VQA model built from its configuration (random weights, 384 px images, the demo's
    tokenizer): wall and CPU time."""
    from transformers import BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    demo = load_model("demo")
    tokens = demo.model.config.text_config
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 384, "width": 384}),
                              tokenizer=demo.processor.tokenizer)
    ids = {name: getattr(tokens, name) for name in ("vocab_size", "bos_token_id", "sep_token_id", "pad_token_id")}
    model = BlipForQuestionAnswering(BlipConfig(text_config=ids)).eval()
    bundle = load_model((model, processor), device="cpu")
    started, cpu = time.perf_counter(), time.process_time()
    train_tuned_lens(bundle, steps=steps, limit=items, progress=False)
    print(f"BLIP-base-sized VQA, {items} items, {steps} steps: {time.perf_counter() - started:.1f} s wall, "
          f"{time.process_time() - cpu:.1f} s CPU")


def confidence_auroc(images: int) -> None:
    import random

    from PIL import Image

    from blip_trace_widgets.datasets.easy_vqa import COLORS, easy_vqa_captions
    from blip_trace_widgets.lenses.confidence import auroc, image_confidence

    chosen = easy_vqa_captions("test")[:images]
    rng = random.Random(0)
    wrong = [rng.choice([c for c in COLORS if c != caption.split()[1]]) for _, caption in chosen]
    print(f"\ninternal confidence, {len(chosen)} easy-VQA test images, right colour against a random wrong one")
    print("| model | AUROC | right > wrong on the same image | mean right | mean wrong |")
    print("|---|---|---|---|---|")
    for name in ("demo-blip2", "demo-instructblip"):
        bundle = load_model(name, device="cpu")
        question = "what is the color of the shape?" if name == "demo-instructblip" else None
        right_scores, wrong_scores = [], []
        for (path, caption), other in zip(chosen, wrong):
            colour = caption.split()[1]
            scores = image_confidence(bundle, Image.open(path), [colour, other], question)
            right_scores.append(float(scores[colour]))
            wrong_scores.append(float(scores[other]))
        paired = sum(r > w for r, w in zip(right_scores, wrong_scores)) / len(chosen)
        print(f"| {name} | {auroc(right_scores, wrong_scores):.3f} | {paired:.3f} | "
              f"{sum(right_scores) / len(chosen):.3f} | {sum(wrong_scores) / len(chosen):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", action="store_true", help="retrain and save the shipped translators first")
    parser.add_argument("--items", type=int, default=100, help="held-out test items per model")
    parser.add_argument("--models", nargs="*", default=list(DEMOS))
    parser.add_argument("--base", action="store_true", help="time training on a BLIP-base-sized model instead")
    parser.add_argument("--confidence", type=int, default=0, help="measure internal confidence on N test images")
    parser.add_argument("--base-items", type=int, default=32)
    parser.add_argument("--base-steps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if args.base:
        base_training_time(args.base_items, args.base_steps)
        return
    if args.confidence:
        confidence_auroc(args.confidence)
        return
    if args.train:
        for name in args.models:
            train(name)
    for name in args.models:
        measure(name, args.items)


if __name__ == "__main__":
    main()
