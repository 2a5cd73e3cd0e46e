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

With ``--reference-samples R`` it also measures what the exact map itself can be trusted for, the ceiling any
estimate is judged against: the same exact map over an independent noise draw ("exact, another draw": its
Spearman correlation with the first), and an exact map of ``R`` samples over a third draw (the reference). A
reference cell is *significant* when its effect is more than two standard errors from zero; the estimate, the
verified map and the exact map of ``--samples`` are each compared with the reference on those cells (Spearman,
over maps with at least 4 of them) and on its top cell.

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


def _effect(result) -> np.ndarray:
    return result.scores - result.low_score


def _against(wanted: np.ndarray, significant: np.ndarray, effect: np.ndarray, prefix: str) -> dict:
    """How a map's effects [T, L] agree with the reference's: Spearman over its significant cells, and its top cell."""
    top = int(np.argmax(wanted))
    return {f"{prefix}_significant_spearman": _spearman(wanted[significant], effect[significant])
            if significant.sum() >= 4 else float("nan"),
            f"{prefix}_reference_top": int(np.argmax(effect)) == top,
            f"{prefix}_reference_top_in_top3": top in set(np.argsort(-effect.ravel(), kind="stable")[:3].tolist())}


#: The reference's noise draws are single-sample traces seeded from here (independent of the maps' seeds 0 and 1).
REFERENCE_SEED = 10_000


def _ceiling(tracer, config, exact, reference_samples: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """The exact map's own agreement: with itself over an independent draw, and with a many-sample reference.

    The reference is ``reference_samples`` single-sample exact traces over independent draws, so that each draw's
    effect (restored minus corrupted, both of that draw) is known: a cell is significant when the mean effect is
    more than two standard errors of those paired effects from zero. Returns the row, the reference's mean effects
    and which cells are significant."""
    from dataclasses import replace

    again = tracer.trace(replace(config, seed=config.seed + 1))
    row = {"exact_again_spearman": _spearman(_effect(exact), _effect(again)),
           "exact_again_top_in_top3": int(np.argmax(_effect(exact))) in set(
               np.argsort(-_effect(again).ravel(), kind="stable")[:3].tolist())}
    draws = np.stack([_effect(tracer.trace(replace(config, seed=REFERENCE_SEED + i, samples=1)))
                      for i in range(reference_samples)])
    wanted = draws.mean(0)
    significant = np.abs(wanted) > 2 * draws.std(0, ddof=1) / np.sqrt(reference_samples)
    return {**row, "significant_cells": int(significant.sum()),
            "reference_top_significant": bool(significant.flat[int(np.argmax(wanted))]),
            **_against(wanted, significant, _effect(exact), "exact")}, wanted, significant


def _question(job: tuple) -> list[dict]:
    (index, kind_of_question, image_path, question, steps_list, samples, vision_kinds, windows, blocks, noise, orders,
     qk, grad_drop, reference_samples) = job
    import torch

    torch.set_num_threads(1)
    from blip_trace_widgets import GaussianNoise, load_model
    from blip_trace_widgets.causal_trace.tracer import Tracer, default_config
    from blip_trace_widgets.core.names import kinds_of

    bundle = load_model("demo")
    # Every kind reuses the same noise draws: keep the corrupted runs of the map's draw, another draw and each
    # reference draw, rather than rebuilding them for every kind.
    tracer = Tracer(bundle, image_path, question, corrupted_cache_size=reference_samples + 3)
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
            ceiling, reference, significant = (_ceiling(tracer, config, exact, reference_samples)
                                               if reference_samples else ({}, None, None))
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
                             "flagged": int(estimate.unreliable_cells.sum()), **_compare(exact, estimate, verified),
                             **ceiling, **({} if reference is None else {
                                 **_against(reference, significant, _effect(estimate), "estimate"),
                                 **_against(reference, significant, _effect(verified), "verified")})})
    return rows


def _jobs(per_type: int, steps: list[int], samples: int, cache: Path, vision_kinds: list[str], windows: list[int],
          blocks: list[str], noise: float | None, orders: list[int], qk: bool, grad_drop: bool,
          reference_samples: int = 0) -> list[tuple]:
    from blip_trace_widgets.datasets.subsets import load_vqa_subset

    cache.mkdir(parents=True, exist_ok=True)
    jobs = []
    for kind_of_question, name in TYPES.items():
        for item in load_vqa_subset(name, limit=per_type):
            path = cache / f"{len(jobs)}.png"
            if not path.exists():
                item.image.open().save(path)
            jobs.append((len(jobs), kind_of_question, str(path), item.question, steps, samples, vision_kinds, windows,
                         blocks, noise, orders, qk, grad_drop, reference_samples))
    return jobs


def _groups(frame):
    """Per block, window, steps, order, QK fix and GradDrop: a table row's first seven cells, and its rows."""
    for (block, window, steps, order, qk_fix, dropping), group in frame.groupby(
            ["block", "window", "steps", "order", "qk_fix", "grad_drop"], sort=False):
        yield (f"| {block.replace('_', ' ')} | {window} | {steps} | {order} | {'yes' if qk_fix else 'no'} | "
               f"{'yes' if dropping else 'no'} | {len(group)} | "), group


def summarise(frame) -> str:
    lines = ["| block | window | steps | order | QK fix | GradDrop | maps | Spearman median | Spearman 10th pct | "
             "no Spearman | exact top cell in "
             "estimate's top 3 | MAE of normalised effect | Σ|est − exact| / Σ|exact| (effects) | estimate / exact time "
             "| verified (5): reported top cell is exact top | verified / exact time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for first, group in _groups(frame):
        rho = group["spearman"].dropna()
        lines.append(
            f"{first}{rho.median():.2f} | "
            f"{rho.quantile(0.1):.2f} | {group['spearman'].isna().sum()} | {group['top_in_top3'].mean():.0%} | "
            f"{group['mae_normalised'].mean():.3f} | {group['relative_error'].median():.3f} (median) | "
            f"{group['estimate_s'].sum() / group['exact_s'].sum():.2f} | {group['verified_top'].mean():.0%} | "
            f"{group['verified_s'].sum() / group['exact_s'].sum():.2f} |")
    return "\n".join(lines)


def summarise_ceiling(frame) -> str:
    """The exact map's own reproducibility and every map's agreement with the many-sample reference."""
    lines = ["| block | window | steps | order | QK fix | GradDrop | maps | significant cells per map (median) | "
             "exact vs exact, another draw: Spearman median | its top cell in the other's top 3 | "
             "on significant cells, Spearman median: exact / estimate / verified | "
             "reference top cell is the reported top: exact / estimate / verified | "
             "reference top cell in the top 3: exact / estimate | maps whose reference top cell is significant | "
             "on those, it is the reported top: exact / estimate / verified |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for first, group in _groups(frame):
        rho = {name: group[f"{name}_significant_spearman"].median() for name in ("exact", "estimate", "verified")}
        top = {name: group[f"{name}_reference_top"].mean() for name in ("exact", "estimate", "verified")}
        clear = group[group["reference_top_significant"].astype(bool)]
        clear_top = {name: clear[f"{name}_reference_top"].mean() for name in ("exact", "estimate", "verified")}
        lines.append(
            f"{first}{group['significant_cells'].median():.0f} of "
            f"{group['cells'].median():.0f} | {group['exact_again_spearman'].median():.2f} | "
            f"{group['exact_again_top_in_top3'].mean():.0%} | "
            f"{rho['exact']:.2f} / {rho['estimate']:.2f} / {rho['verified']:.2f} | "
            f"{top['exact']:.0%} / {top['estimate']:.0%} / {top['verified']:.0%} | "
            f"{group['exact_reference_top_in_top3'].mean():.0%} / {group['estimate_reference_top_in_top3'].mean():.0%} | "
            f"{len(clear)} | {clear_top['exact']:.0%} / {clear_top['estimate']:.0%} / {clear_top['verified']:.0%} |")
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
    parser.add_argument("--reference-samples", type=int, default=0,
                        help="also the exact map over another draw and an exact reference of this many samples "
                             "(default: %(default)s, none)")
    parser.add_argument("--out", type=Path, default=Path("artifacts/estimates"))
    args = parser.parse_args()
    started = time.perf_counter()
    jobs = _jobs(args.per_type, args.steps, args.samples, args.out / "images", args.vision_kinds, args.windows,
                 args.blocks, args.noise, args.orders, args.qk_fix, args.grad_drop, args.reference_samples)
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
    if args.reference_samples:
        table += (f"\n\nThe exact map's own agreement, and every map's with an exact reference of "
                  f"{args.reference_samples} samples over an independent draw:\n\n{summarise_ceiling(frame)}")
    text = (f"{head}\n\n{table}\n\nAt steps=1, per kind (Spearman median and 10th percentile, top-in-top-3 and verified-top "
            "rates, median relative error and est/exact effect ratio):\n\n"
            f"{by_kind.to_string()}\n")
    (args.out / "summary.md").write_text(text)
    print(text)
    print(json.dumps({"rows": len(frame)}))


if __name__ == "__main__":
    main()
