"""Does the image-side effect concentrate on the shape? A measurement on the demo model over easy-VQA test images.

    python scripts/measure_shape_effect.py --images 60

For each test image whose question the demo model answers correctly, the shape's bounding
box is found from its pixels (easy-VQA draws one shape on a plain background). Then:

1. Region corruptions: p(answer) / clean when Gaussian noise (3σ) corrupts the patch
   embeddings of only the shape's box, of a same-size box elsewhere, or of everything
   outside the box.
2. Image-side trace: noise on every patch, each patch restored alone at each vision
   layer (hidden states). The share of the total positive effect that lies inside the box,
   against the box's share of the patches.

Prints mean figures with 95% bootstrap intervals over images, per question type.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from blip_trace_widgets import GaussianNoise, TraceConfig, Tracer, load_model
from blip_trace_widgets.causal_trace.averages import bootstrap_interval
from blip_trace_widgets.core.regions import Outside, same_size_elsewhere
from blip_trace_widgets.datasets.easy_vqa import shape_box
from blip_trace_widgets.datasets.subsets import load_vqa_subset, open_image


def measure(bundle, subset: str, images: int, scale: float, samples: int) -> dict:
    seen: set = set()
    rows = []
    for sample in load_vqa_subset(subset, limit=20 * images):
        if sample.image.path in seen:
            continue
        seen.add(sample.image.path)
        if len(rows) >= images:
            break
        image = open_image(sample.image)
        tracer = Tracer(bundle, image, sample.question)
        if tracer.model_answer != sample.answer:
            continue
        box = shape_box(image)
        tokens = tracer.clean.image_embeds.shape[1]
        inside = box.token_mask(tokens)[1:].numpy()
        elsewhere = same_size_elsewhere(box, tokens)

        def kept(region, tracer: Tracer = tracer) -> float:
            low, high = tracer.baselines(TraceConfig(block="vision_encoder", samples=samples,
                                                     corruption=GaussianNoise(scale, region=region)))
            return low / high

        result = tracer.trace(TraceConfig(block="vision_encoder", samples=samples, corruption=GaussianNoise(scale)))
        effect = np.clip(result.indirect_effect()[1:], 0, None)
        share = effect[inside].sum(0) / np.maximum(effect.sum(0), 1e-12)
        rows.append({
            "box": kept(box), "elsewhere": kept(elsewhere) if elsewhere is not None else np.nan,
            "outside": kept(Outside(box)), "share": share, "area": inside.mean(),
        })
    return {"n": len(rows), "rows": rows}


def _fmt(values) -> str:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    low, high = bootstrap_interval(values)
    return f"{values.mean():.3f} [{low:.3f}, {high:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60, help="images per question type")
    parser.add_argument("--scale", type=float, default=3.0, help="noise scale (multiples of the patch embeddings' std)")
    parser.add_argument("--samples", type=int, default=10, help="noise samples")
    args = parser.parse_args()
    bundle = load_model("demo")
    started = time.perf_counter()
    for subset in ("easy-vqa-color", "easy-vqa-shape"):
        found = measure(bundle, subset, args.images, args.scale, args.samples)
        rows = found["rows"]
        print(f"\n{subset}: {found['n']} images answered correctly, Gaussian noise {args.scale:g}σ on patch embeddings")
        print(f"  p(answer)/clean, noise on the shape's box:        {_fmt([r['box'] for r in rows])}")
        print(f"  p(answer)/clean, noise on a same-size box elsewhere: {_fmt([r['elsewhere'] for r in rows])}")
        print(f"  p(answer)/clean, noise everywhere outside the box:  {_fmt([r['outside'] for r in rows])}")
        print(f"  box share of the patches: {_fmt([r['area'] for r in rows])}")
        shares = np.array([r["share"] for r in rows])
        for layer in range(shares.shape[1]):
            print(f"  layer {layer}: share of the restoring effect inside the box {_fmt(shares[:, layer])}")
    print(f"\n{time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
