"""How well attribution-patching estimates agree with exact traces, on the demo model and easy-VQA's test questions.

    python scripts/measure_estimates.py --per-type 100 --workers 2 --out artifacts/estimates

For the first ``--per-type`` test questions of each type (colour, shape, yes/no; in the
dataset's order, none left out), traces every kind of the question encoder and the answer
decoder (each of ``--windows``, default 1) and the vision encoder's hidden states with regions of 2x2 patches (its
other kinds with ``--vision-kinds``), exactly and as an
estimate with each of ``--steps`` (and with ``--qk-fix``, the QK-fixed one-step estimate of hidden states of the
text blocks; with ``--grad-drop``, the one-step estimate with GradDrop's flags), and reports per block, steps,
order, QK fix and GradDrop:

* the Spearman correlation between the estimated and the exact map, per question (a map
  whose exact or estimated cells are all equal has none, and is counted apart), then its
  median and 10th percentile;
* how often the exact map's top cell (largest effect) is among the estimate's top 3;
* the mean absolute error of the normalised effect (score - corrupted) / (clean - corrupted),
  over questions whose total effect is at least 0.1 of the clean score (ROME's rule).

The noise is the demo model's own level on the image embeddings (``trace_defaults.json``:
10σ) for the text blocks, and ROME's 3σ on the patch embeddings for the vision encoder, as
in the explorers. Writes ``rows.csv`` (one row per question, block, kind and steps) and
``summary.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

BLOCK_REGIONS = {"question_encoder": None, "answer_decoder": None, "vision_encoder": 4}  # 4 per side = 2x2 patches
TYPES = {"color": "easy-vqa-color", "shape": "easy-vqa-shape", "yes/no": "easy-vqa-yes-no"}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties share their average rank)."""
    import pandas as pd

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    ranks_a, ranks_b = (pd.Series(np.ravel(x)).rank(method="average").to_numpy() for x in (a, b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def _compare(exact, estimate, verified) -> dict:
    effect_exact = (exact.scores - exact.low_score).ravel()
    effect_estimate = (estimate.scores - estimate.low_score).ravel()
    top = int(np.argmax(effect_exact))
    top3 = set(np.argsort(-effect_estimate, kind="stable")[:3].tolist())
    total = exact.total_effect
    tiny = exact.is_tiny()
    mae = float(np.mean(np.abs(effect_estimate - effect_exact)) / abs(total)) if not tiny else float("nan")
    relative = float(np.abs(effect_estimate - effect_exact).sum() / max(np.abs(effect_exact).sum(), 1e-300))
    # method="verified" (verify=5): the estimate's 5 cells furthest from the corrupted score made exact, and every
    # flagged cell; is the reported top cell the exact top cell?
    reported = int(np.argmax((verified.scores - verified.low_score).ravel()))
    return {"spearman": _spearman(effect_exact, effect_estimate), "top_in_top3": top in top3, "mae_normalised": mae,
            "relative_error": relative, "verified_top": reported == top,
            "verified_exact_cells": int(verified.exact_cells.sum()),
            "ratio": float(np.median(effect_estimate[np.abs(effect_exact) > 0]
                                                                  / effect_exact[np.abs(effect_exact) > 0])),
            "tiny": tiny, "total_effect": float(total), "cells": int(effect_exact.size)}


def _question(job: tuple) -> list[dict]:
    (index, kind_of_question, image_path, question, steps_list, samples, vision_kinds, windows, blocks, noise, orders,
     qk, grad_drop) = job
    import torch

    torch.set_num_threads(1)
    from blip_trace_widgets import GaussianNoise, load_model
    from blip_trace_widgets.names import kinds_of
    from blip_trace_widgets.tracing import Tracer, default_config

    bundle = load_model("demo")
    tracer = Tracer(bundle, image_path, question)
    rows = []
    for block in blocks:
        regions = BLOCK_REGIONS[block]
        for kind, window in ((k, w) for k in (vision_kinds if block == "vision_encoder" else kinds_of(block))
                             for w in windows):
            extra = {"corruption": GaussianNoise(3.0)} if regions else {}
            if regions and kind != "attn_head":  # a head map's rows are heads, not regions
                extra["regions"] = regions
            if noise is not None:
                extra["corruption"] = GaussianNoise(noise)
            config = default_config(bundle, block=block, kind=kind, window=window, samples=samples, **extra)
            started = time.perf_counter()
            exact = tracer.trace(config)
            exact_s = time.perf_counter() - started
            fixable = qk and kind == "hidden" and block != "vision_encoder"
            variants = ([(k, 1, False, False) for k in steps_list] + [(1, 2, False, False)] * (2 in orders)
                        + [(1, 1, True, False)] * fixable + [(1, 1, False, True)] * (grad_drop and window == 1))
            for steps, order, qk_fix, dropping in variants:
                fields = {"steps": steps, "order": order, "qk_fix": qk_fix, "grad_drop": dropping}
                started = time.perf_counter()
                estimate = tracer.trace(config, method="estimate", **fields)
                estimate_s = time.perf_counter() - started
                started = time.perf_counter()  # the verified map reuses the estimate's gradients: add its time
                verified = tracer.trace(config, method="verified", **fields)
                rows.append({"question": index, "type": kind_of_question, "block": block, "kind": kind,
                             "window": window, **fields, "exact_s": exact_s,
                             "estimate_s": estimate_s, "verified_s": estimate_s + time.perf_counter() - started,
                             "flagged": int(estimate.unreliable_cells.sum()), **_compare(exact, estimate, verified)})
    return rows


def _jobs(per_type: int, steps: list[int], samples: int, cache: Path, vision_kinds: list[str], windows: list[int],
          blocks: list[str], noise: float | None, orders: list[int], qk: bool, grad_drop: bool) -> list[tuple]:
    from blip_trace_widgets.subsets import load_vqa_subset

    cache.mkdir(parents=True, exist_ok=True)
    jobs = []
    for kind_of_question, name in TYPES.items():
        for item in load_vqa_subset(name, limit=per_type):
            path = cache / f"{len(jobs)}.png"
            if not path.exists():
                item.image.open().save(path)
            jobs.append((len(jobs), kind_of_question, str(path), item.question, steps, samples, vision_kinds, windows,
                         blocks, noise, orders, qk, grad_drop))
    return jobs


def summarise(frame) -> str:
    lines = ["| block | window | steps | order | QK fix | GradDrop | maps | Spearman median | Spearman 10th pct | "
             "no Spearman | exact top cell in "
             "estimate's top 3 | MAE of normalised effect | Σ|est − exact| / Σ|exact| (effects) | estimate / exact time "
             "| verified (5): reported top cell is exact top | verified / exact time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (block, window, steps, order, qk_fix, dropping), group in frame.groupby(
            ["block", "window", "steps", "order", "qk_fix", "grad_drop"], sort=False):
        rho = group["spearman"].dropna()
        lines.append(
            f"| {block.replace('_', ' ')} | {window} | {steps} | {order} | {'yes' if qk_fix else 'no'} | "
            f"{'yes' if dropping else 'no'} | {len(group)} | {rho.median():.2f} | "
            f"{rho.quantile(0.1):.2f} | {group['spearman'].isna().sum()} | {group['top_in_top3'].mean():.0%} | "
            f"{group['mae_normalised'].mean():.3f} | {group['relative_error'].median():.3f} (median) | "
            f"{group['estimate_s'].sum() / group['exact_s'].sum():.2f} | {group['verified_top'].mean():.0%} | "
            f"{group['verified_s'].sum() / group['exact_s'].sum():.2f} |")
    return "\n".join(lines)


def main() -> None:
    import pandas as pd

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-type", type=int, default=100)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--samples", type=int, default=3, help="noise samples per trace (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vision-kinds", nargs="+", default=["hidden"], choices=["hidden", "self_attn", "mlp", "attn_head"])
    parser.add_argument("--windows", type=int, nargs="+", default=[1], help="windows of layers (default: %(default)s)")
    parser.add_argument("--orders", type=int, nargs="+", default=[1], choices=[1, 2],
                        help="2: also the second-order estimate at steps=1 (default: %(default)s)")
    parser.add_argument("--qk-fix", action="store_true",
                        help="also the QK-fixed one-step estimate of hidden states of the text blocks")
    parser.add_argument("--grad-drop", action="store_true",
                        help="also the one-step estimate with GradDrop's flags (window 1), verified with them")
    parser.add_argument("--blocks", nargs="+", default=list(BLOCK_REGIONS), choices=list(BLOCK_REGIONS))
    parser.add_argument("--noise", type=float, default=None,
                        help="Gaussian noise in σ for every block (default: the model's own level; 3σ on patches)")
    parser.add_argument("--out", type=Path, default=Path("artifacts/estimates"))
    args = parser.parse_args()
    started = time.perf_counter()
    jobs = _jobs(args.per_type, args.steps, args.samples, args.out / "images", args.vision_kinds, args.windows,
                 args.blocks, args.noise, args.orders, args.qk_fix, args.grad_drop)
    rows: list[dict] = []
    with ProcessPoolExecutor(args.workers) as pool:
        for done, part in enumerate(pool.map(_question, jobs, chunksize=4), 1):
            rows.extend(part)
            if done % 25 == 0:
                print(f"{done}/{len(jobs)} questions, {time.perf_counter() - started:.0f} s", flush=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(args.out / "rows.csv", index=False)
    table = summarise(frame)
    by_kind = frame[frame["steps"] == 1].groupby(["block", "kind", "window", "order", "qk_fix", "grad_drop"],
                                                 sort=False).agg(
        spearman=("spearman", "median"), spearman_p10=("spearman", lambda x: x.quantile(0.1)),
        top_in_top3=("top_in_top3", "mean"), relative_error=("relative_error", "median"), ratio=("ratio", "median"),
        verified_top=("verified_top", "mean"), flagged=("flagged", "mean"),
        verified_exact=("verified_exact_cells", "mean")).round(3)
    head = (f"demo model, {len(jobs)} easy-VQA test questions ({args.per_type} per type), {args.samples} noise "
            f"samples, windows {args.windows}, noise {args.noise or 'the model default'}; "
            f"{time.perf_counter() - started:.0f} s with {args.workers} workers, load average "
            f"{os.getloadavg()[0]:.2f}; tiny-effect maps (left out of the MAE): "
            f"{int(frame.drop_duplicates(['question', 'block', 'kind'])['tiny'].sum())}")
    text = (f"{head}\n\n{table}\n\nAt steps=1, per kind (Spearman median and 10th percentile, top-in-top-3 and verified-top "
            "rates, median relative error and est/exact effect ratio):\n\n"
            f"{by_kind.to_string()}\n")
    (args.out / "summary.md").write_text(text)
    print(text)
    print(json.dumps({"rows": len(frame)}))


if __name__ == "__main__":
    main()
