"""Whether a map's significant cells can be trusted, on the demo model and easy-VQA's test questions.

    python scripts/measure_significance.py --per-type 100 --workers 2 --out artifacts/significance

For the first ``--per-type`` test questions of each type (colour, shape, yes/no; in the dataset's order, none left
out), traces each of ``--kinds`` (default: hidden, mlp, self_attn, cross_attn) of the question encoder (``--blocks``)
at each of ``--windows`` (default 1), with ``--samples`` noise samples (default 10) at the model's own noise level
(``trace_defaults.json``: 10σ on the image embeddings), and measures:

1. **Null check.** A placebo map restores each cell's state from the same noise sample of another independent
   corrupted draw of the same image (another seed) instead of from the clean run
   (``ExactScorer.patched(..., donor=...)``: the engine's own patching arithmetic), so no cell carries anything
   of the clean run. Its per-draw effects (the cell's score minus the same sample's corrupted score) go through
   :meth:`~blip_trace_widgets.core.significance.CellStatistics.of_draws`: the share of cells flagged significant
   (q < 0.05) over all maps, the share of maps with at most 5% of their cells flagged (target: 95%), and the
   share of placebo cells whose p-value, before the false-discovery correction, is under 0.05 (5% where the test
   is calibrated; less where it is conservative, and then short of power on real maps too).
2. **Replication.** Each map traced again over an independent draw (seed + 1): of the cells flagged in the first,
   the share whose effect has the same sign in the second (target: 90%). And an exact reference of
   ``--reference-samples`` samples (default 30) over a third draw: the share of maps whose flagged top cell (the
   significant cell with the largest effect toward the clean score) is the reference's top significant cell
   (target: 85%), over maps whose reference has a significant cell (a map with none flagged counts as a miss),
   and over the maps where both flag one.
3. **Estimates judged anew.** On the reference's significant cells (maps with at least 4), the Spearman
   correlation with the reference of the exact map of ``--samples``, ``method="estimate"`` and
   ``method="verified"``; how often each reports the reference's top significant cell as its top cell (largest
   effect toward clean); and the wall time of the verified map (its gradient pass included) against the exact map
   of the same samples, both over the same, already drawn corrupted runs (target: the verified map reaches 90% of
   the exact map's rate at half its time or less).
4. **Auto sampling.** ``samples="auto"`` (:func:`~blip_trace_widgets.causal_trace.sharpen.sharpen`, rounds of 4
   samples, at most ``--reference-samples``) against the exact map of ``--reference-samples`` samples over the same
   seed, whose first draws are the rounds' draws: the Jaccard index of their significant sets (two empty sets
   agree) and the share of the samples auto sampling drew before it stopped (target: median Jaccard at least 0.8 at
   half the samples or fewer).

Prints a markdown table with the command, the load average and the release, and writes to ``--out``:
``figures.json`` (every figure of the table, overall and per kind), ``rows.csv`` (one row per question, block,
kind and window) and ``summary.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

TYPES = {"color": "easy-vqa-color", "shape": "easy-vqa-shape", "yes/no": "easy-vqa-yes-no"}
TEXT_BLOCKS = ("question_encoder", "answer_decoder")
KINDS = ("hidden", "mlp", "self_attn", "cross_attn")
#: Seeds of the independent draws, apart from the maps' own (the default seed, 0) and their replication (seed + 1).
REFERENCE_SEED = 10_000
PLACEBO_SEED = 20_000
#: The targets each figure is judged against.
TARGETS = {"placebo_maps_clean": 0.95, "replication_same_sign": 0.90, "replication_reference_top": 0.85,
           "verified_rate_of_exact": 0.90, "verified_time_of_exact": 0.50, "auto_jaccard": 0.80,
           "auto_samples_share": 0.50}
#: A placebo map passes when at most this share of its cells is flagged.
PLACEBO_SHARE = 0.05


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties share their average rank)."""
    import pandas as pd

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    ranks_a, ranks_b = (pd.Series(np.ravel(x)).rank(method="average").to_numpy() for x in (a, b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def _toward_clean(result) -> np.ndarray:
    """Each cell's mean effect, signed so that larger is toward the clean score (NaN where n/a)."""
    effect = np.where(result.absent_cells, np.nan, result.scores - result.low_score)
    return effect * (1.0 if result.total_effect >= 0 else -1.0)


def _top(toward: np.ndarray, among: np.ndarray | None = None) -> int:
    """The flat index of the largest effect toward clean (among ``among`` cells), or -1 when there is none."""
    values = np.where(np.isfinite(toward) & (True if among is None else among), toward, -np.inf).ravel()
    return int(np.argmax(values)) if np.isfinite(values).any() else -1


def placebo_draws(tracer, config, donor_seed: int = PLACEBO_SEED) -> np.ndarray:
    """Per-draw effects [samples, rows, layers] of a placebo map: each cell restored from the same sample of the
    corrupted draw of ``donor_seed`` instead of the clean run, minus the same sample's corrupted score (the
    first draw of ``config.seed``, as the real map's). Null by construction; NaN where a cell is n/a."""
    from blip_trace_widgets.causal_trace.results import _absent_mask

    block, target = tracer.blocks[config.block], tracer.target(config)
    layout = block.layout(tracer.clean_pass.context, config, target)
    donor = tracer.corrupted_runs.corrupted(replace(config, seed=donor_seed))
    _, _, scores = tracer.scorers["exact"].patched(block, layout.cells, config, target, None, donor=donor)
    low, _ = tracer.baseline_draws(config)
    shape = (len(layout.labels), len(block.stack))
    effects = (scores - low[:, None]).reshape(scores.shape[0], *shape)
    return np.where(_absent_mask(dict(layout.extra), shape)[None], np.nan, effects)


def measure_map(tracer, config, reference_samples: int) -> dict:
    """Every figure of one (question, block, kind, window): the placebo, the replication, the reference and the
    estimates against it."""
    from blip_trace_widgets.core.significance import DEFAULT_Q, CellStatistics

    tracer.corrupted_runs.corrupted(config)  # drawn before the clocks start: the exact and verified maps share it
    started = time.perf_counter()
    exact = tracer.trace(config)
    exact_s = time.perf_counter() - started
    started = time.perf_counter()
    verified = tracer.trace(config, method="verified")  # its gradient pass is not cached yet: it counts
    verified_s = time.perf_counter() - started
    estimate = tracer.trace(config, method="estimate")
    again = tracer.trace(config, seed=config.seed + 1)
    reference = tracer.trace(config, seed=REFERENCE_SEED, samples=reference_samples)

    placebo = CellStatistics.of_draws(placebo_draws(tracer, config))
    placebo_flagged, placebo_tested = int(placebo.significant(DEFAULT_Q).sum()), int(placebo.tested().sum())
    with np.errstate(invalid="ignore"):
        placebo_p05 = int(np.sum(np.nan_to_num(placebo.pvalues, nan=1.0) < 0.05))  # uncorrected: 5% if calibrated

    flagged = exact.significant(DEFAULT_Q)
    first, second = exact.statistics().mean[flagged], again.statistics().mean[flagged]
    same_sign = int(np.sum(np.sign(first) == np.sign(second)))

    wanted, significant = _toward_clean(reference), reference.significant(DEFAULT_Q)
    reference_top = _top(wanted, significant)  # -1: no significant cell
    flagged_top = _top(_toward_clean(exact), flagged)
    row = {"cells": int(np.isfinite(wanted).sum()), "total_effect": float(exact.total_effect),
           "placebo_flagged": placebo_flagged, "placebo_tested": placebo_tested,
           "placebo_share": placebo_flagged / placebo_tested if placebo_tested else float("nan"),
           "placebo_p05": placebo_p05,
           "flagged": int(flagged.sum()), "same_sign": same_sign,
           "reference_significant": int(significant.sum()), "reference_has_top": reference_top >= 0,
           "flagged_top_is_reference_top": reference_top >= 0 and flagged_top == reference_top,
           "map_has_flagged_top": flagged_top >= 0,
           "reference_top_toward_clean": float(wanted.flat[reference_top]) if reference_top >= 0 else float("nan"),
           "exact_s": exact_s, "verified_s": verified_s}
    row.update(measure_auto(tracer, config, reference_samples))
    for name, result in (("exact", exact), ("estimate", estimate), ("verified", verified)):
        toward = _toward_clean(result)
        row[f"{name}_spearman"] = (_spearman(wanted[significant], toward[significant])
                                   if significant.sum() >= 4 else float("nan"))
        row[f"{name}_reports_reference_top"] = reference_top >= 0 and _top(toward) == reference_top
    return row


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / |a ∪ b| of two boolean maps; 1 when both are empty (they agree that nothing is significant)."""
    union = int(np.sum(a | b))
    return 1.0 if union == 0 else float(np.sum(a & b)) / union


def measure_auto(tracer, config, samples: int) -> dict:
    """``samples="auto"`` against the exact map of ``samples`` samples of the same seed."""
    from blip_trace_widgets.causal_trace.sharpen import AutoSampling, sharpen
    from blip_trace_widgets.core.significance import DEFAULT_Q

    full = tracer.trace(config, samples=samples)
    auto = sharpen(tracer, config, AutoSampling(max_samples=samples))
    used = int(auto.statistics().samples)
    return {"auto_jaccard": jaccard(auto.significant(DEFAULT_Q), full.significant(DEFAULT_Q)),
            "auto_full_significant": int(full.significant(DEFAULT_Q).sum()),
            "auto_samples": used, "auto_samples_share": used / samples,
            "auto_stopped": str(auto.config["auto"]["stopped"])}


def _question(job: tuple) -> list[dict]:
    index, kind_of_question, image_path, question, blocks, kinds, windows, samples, reference_samples, noise = job
    import torch

    torch.set_num_threads(1)
    from blip_trace_widgets import GaussianNoise, load_model
    from blip_trace_widgets.causal_trace.tracer import Tracer, default_config

    bundle = load_model("demo")
    # The map's draw, its replication, the reference and the placebo's donor: every kind reuses them.
    tracer = Tracer(bundle, image_path, question, corrupted_cache_size=6)
    rows = []
    for block in blocks:
        for kind in kinds:
            for window in windows:
                extra = {"corruption": GaussianNoise(noise)} if noise is not None else {}
                config = default_config(bundle, block=block, kind=kind, window=window, samples=samples, **extra)
                rows.append({"question": index, "type": kind_of_question, "block": block, "kind": kind,
                             "window": window, **measure_map(tracer, config, reference_samples)})
    return rows


def _jobs(per_type: int, cache: Path, blocks: list[str], kinds: list[str], windows: list[int], samples: int,
          reference_samples: int, noise: float | None) -> list[tuple]:
    from blip_trace_widgets.datasets.subsets import load_vqa_subset

    cache.mkdir(parents=True, exist_ok=True)
    jobs = []
    for kind_of_question, name in TYPES.items():
        for item in load_vqa_subset(name, limit=per_type):
            path = cache / f"{len(jobs)}.png"
            if not path.exists():
                item.image.open().save(path)
            jobs.append((len(jobs), kind_of_question, str(path), item.question, blocks, kinds, windows, samples,
                         reference_samples, noise))
    return jobs


def _rate(hits, count) -> float:
    return float(hits) / float(count) if count else float("nan")


def figures(group) -> dict:
    """The figures of a group of rows (one per map)."""
    placebo_tested = int(group["placebo_tested"].sum())
    with_top = group[group["reference_has_top"].astype(bool)]
    both = with_top[with_top["map_has_flagged_top"].astype(bool)]
    rates = {name: _rate(with_top[f"{name}_reports_reference_top"].sum(), len(with_top))
             for name in ("exact", "estimate", "verified")}
    return {
        "maps": len(group),
        "cells_per_map": float(group["cells"].median()),
        "placebo_cells_flagged": _rate(group["placebo_flagged"].sum(), placebo_tested),
        "placebo_maps_clean": _rate((group["placebo_share"] <= PLACEBO_SHARE).sum(), len(group)),
        "placebo_maps_with_any_flagged": _rate((group["placebo_flagged"] > 0).sum(), len(group)),
        "placebo_p_under_005": _rate(group["placebo_p05"].sum(), placebo_tested),
        "maps_with_a_flagged_cell": int((group["flagged"] > 0).sum()),
        "flagged_per_map": float(group["flagged"].median()),
        "flagged_cells": int(group["flagged"].sum()),
        "replication_same_sign": _rate(group["same_sign"].sum(), group["flagged"].sum()),
        "maps_whose_reference_has_a_significant_cell": len(with_top),
        "reference_significant_per_map": float(group["reference_significant"].median()),
        "replication_reference_top": _rate(with_top["flagged_top_is_reference_top"].sum(), len(with_top)),
        "replication_reference_top_when_both_flag": _rate(both["flagged_top_is_reference_top"].sum(), len(both)),
        "maps_where_both_flag": len(both),
        "reference_top_is_toward_clean": _rate((with_top["reference_top_toward_clean"] > 0).sum(), len(with_top)),
        "maps_with_4_reference_significant_cells": int((group["reference_significant"] >= 4).sum()),
        **{f"{name}_spearman_median": float(group[f"{name}_spearman"].median())
           for name in ("exact", "estimate", "verified")},
        **{f"{name}_reports_reference_top": rates[name] for name in rates},
        "verified_rate_of_exact": rates["verified"] / rates["exact"] if rates["exact"] else float("nan"),
        "verified_time_of_exact": float(group["verified_s"].sum() / group["exact_s"].sum()),
        "verified_time_of_exact_median": float((group["verified_s"] / group["exact_s"]).median()),
        "auto_jaccard_median": float(group["auto_jaccard"].median()),
        "auto_maps_at_jaccard_08": _rate((group["auto_jaccard"] >= TARGETS["auto_jaccard"]).sum(), len(group)),
        "auto_jaccard_median_where_full_flags": float(
            group.loc[group["auto_full_significant"] > 0, "auto_jaccard"].median()),
        "auto_maps_where_full_flags": int((group["auto_full_significant"] > 0).sum()),
        "auto_samples_share_median": float(group["auto_samples_share"].median()),
        "exact_s_median": float(group["exact_s"].median()),
        "verified_s_median": float(group["verified_s"].median()),
    }


def _met(value: float, target: float, at_most: bool = False) -> str:
    if not np.isfinite(value):
        return "n/a"
    return "met" if (value <= target if at_most else value >= target) else "missed"


def _pct(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.0%}"


def _num(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.2f}"


def summarise(groups: dict[str, dict]) -> str:
    """Two markdown tables, a row per (block, kind, window) and one for all: the null check and replication, and
    the estimates against the reference."""
    lines = ["| maps | kind | cells per map | placebo: cells flagged (q < 0.05) | placebo: maps with ≤5% "
             "flagged | placebo: p < 0.05, uncorrected (5% if calibrated) | maps with a significant cell: map / "
             "reference | replication: same sign (flagged cells) | reference's top significant cell = map's "
             "flagged top (maps whose reference has one) | same, where both flag (maps) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, f in groups.items():
        lines.append(f"| {f['maps']} | {name} | {f['cells_per_map']:.0f} | {_pct(f['placebo_cells_flagged'])} | "
                     f"{_pct(f['placebo_maps_clean'])} | {f['placebo_p_under_005']:.1%} | "
                     f"{f['maps_with_a_flagged_cell']} / {f['maps_whose_reference_has_a_significant_cell']} | "
                     f"{_pct(f['replication_same_sign'])} ({f['flagged_cells']}) | "
                     f"{_pct(f['replication_reference_top'])} ({f['maps_whose_reference_has_a_significant_cell']})"
                     f" | {_pct(f['replication_reference_top_when_both_flag'])} ({f['maps_where_both_flag']}) |")
    lines += ["", "| maps | kind | reference significant cells (median) | Spearman on them: exact / estimate / "
              "verified (maps with ≥4) | reference top reported as top: exact / estimate / verified | "
              "verified / exact rate | verified / exact time (total; median per map) |",
              "|---|---|---|---|---|---|---|"]
    for name, f in groups.items():
        lines.append(f"| {f['maps']} | {name} | {f['reference_significant_per_map']:.0f} | "
                     f"{_num(f['exact_spearman_median'])} / {_num(f['estimate_spearman_median'])} / "
                     f"{_num(f['verified_spearman_median'])} ({f['maps_with_4_reference_significant_cells']}) | "
                     f"{_pct(f['exact_reports_reference_top'])} / {_pct(f['estimate_reports_reference_top'])} / "
                     f"{_pct(f['verified_reports_reference_top'])} | {_pct(f['verified_rate_of_exact'])} | "
                     f"{_num(f['verified_time_of_exact'])}; {_num(f['verified_time_of_exact_median'])} |")
    lines += ["", "| maps | kind | auto sampling: Jaccard with the full map's significant set (median; maps ≥ 0.8) | "
              "same, maps whose full map flags a cell (median; maps) | samples drawn, share of the full map's "
              "(median) |", "|---|---|---|---|---|"]
    for name, f in groups.items():
        lines.append(f"| {f['maps']} | {name} | {_num(f['auto_jaccard_median'])}; {_pct(f['auto_maps_at_jaccard_08'])} | "
                     f"{_num(f['auto_jaccard_median_where_full_flags'])}; {f['auto_maps_where_full_flags']} | "
                     f"{_pct(f['auto_samples_share_median'])} |")
    return "\n".join(lines)


def verdicts(f: dict) -> dict[str, str]:
    """Each target, met or missed, over every map."""
    return {"placebo_maps_clean": _met(f["placebo_maps_clean"], TARGETS["placebo_maps_clean"]),
            "replication_same_sign": _met(f["replication_same_sign"], TARGETS["replication_same_sign"]),
            "replication_reference_top": _met(f["replication_reference_top"], TARGETS["replication_reference_top"]),
            "verified": ("met" if _met(f["verified_rate_of_exact"], TARGETS["verified_rate_of_exact"]) == "met"
                         and _met(f["verified_time_of_exact"], TARGETS["verified_time_of_exact"], True) == "met"
                         else "missed"),
            "auto": ("met" if _met(f["auto_jaccard_median"], TARGETS["auto_jaccard"]) == "met"
                     and _met(f["auto_samples_share_median"], TARGETS["auto_samples_share"], True) == "met"
                     else "missed")}


def _machine() -> str:
    cores = os.cpu_count() or 0
    return f"{cores}-core {platform.machine()}"


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> dict:
    import pandas as pd

    import blip_trace_widgets

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-type", type=int, default=100)
    parser.add_argument("--samples", type=int, default=10, help="noise samples per map (default: %(default)s)")
    parser.add_argument("--reference-samples", type=int, default=30,
                        help="noise samples of the reference, over another draw (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--blocks", nargs="+", default=["question_encoder"], choices=list(TEXT_BLOCKS))
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--windows", type=int, nargs="+", default=[1], help="windows of layers (default: %(default)s)")
    parser.add_argument("--noise", type=float, default=None,
                        help="Gaussian noise in σ (default: the model's own level)")
    parser.add_argument("--out", type=Path, default=Path("artifacts/significance"))
    args = parser.parse_args(argv)
    command = "python scripts/measure_significance.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    load_before = _uptime()
    jobs = _jobs(args.per_type, args.out / "images", args.blocks, args.kinds, args.windows, args.samples,
                 args.reference_samples, args.noise)
    rows: list[dict] = []
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            for done, part in enumerate(pool.map(_question, jobs), 1):
                rows.extend(part)
                if done % 10 == 0:
                    print(f"{done}/{len(jobs)} questions, {time.perf_counter() - started:.0f} s", flush=True)
    else:
        for job in jobs:
            rows.extend(_question(job))
    frame = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "rows.csv", index=False)
    groups = {"all": figures(frame)}
    for (block, kind, window), group in frame.groupby(["block", "kind", "window"], sort=False):
        groups[f"{block.replace('_', ' ')} {kind}, window {window}"] = figures(group)
    seconds = time.perf_counter() - started
    load_after = _uptime()
    overall = groups["all"]
    verdict = verdicts(overall)
    head = (f"`{command}`: demo model, {len(jobs)} easy-VQA test questions ({args.per_type} per type), "
            f"{args.samples} noise samples per map, reference of {args.reference_samples}, noise "
            f"{args.noise if args.noise is not None else 'the model default'}; blip-trace-widgets "
            f"{blip_trace_widgets.__version__}, {_machine()}, {args.workers} worker(s), {seconds:.0f} s; "
            f"`uptime` before: {load_before}; after: {load_after}")
    targets = (f"Targets over every map: placebo maps with ≤5% of cells flagged ≥ 95%: "
               f"{_pct(overall['placebo_maps_clean'])}, {verdict['placebo_maps_clean']}; flagged cells of the "
               f"same sign again ≥ 90%: {_pct(overall['replication_same_sign'])}, "
               f"{verdict['replication_same_sign']}; flagged top cell is the reference's ≥ 85%: "
               f"{_pct(overall['replication_reference_top'])}, {verdict['replication_reference_top']}; verified "
               f"≥ 90% of the exact map's rate at ≤ 0.5× its time: {_pct(overall['verified_rate_of_exact'])} at "
               f"{_num(overall['verified_time_of_exact'])}×, {verdict['verified']}; auto sampling's significant set "
               f"at Jaccard ≥ 0.8 with the full map's at ≤ 50% of its samples (medians): "
               f"{_num(overall['auto_jaccard_median'])} at {_pct(overall['auto_samples_share_median'])}, "
               f"{verdict['auto']}.")
    text = f"{head}\n\n{summarise(groups)}\n\n{targets}\n"
    report = {"command": command, "release": blip_trace_widgets.__version__, "machine": _machine(),
              "uptime_before": load_before, "uptime_after": load_after, "seconds": seconds,
              "questions": len(jobs), "per_type": args.per_type, "samples": args.samples,
              "reference_samples": args.reference_samples, "noise": args.noise, "workers": args.workers,
              "blocks": args.blocks, "kinds": args.kinds, "windows": args.windows, "targets": TARGETS,
              "verdicts": verdict, "groups": groups}
    (args.out / "summary.md").write_text(text)
    (args.out / "figures.json").write_text(json.dumps(_strict(report), indent=1))
    print(text)
    return report


def _strict(value):
    """NaN as null, for strict JSON."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return _strict(value.item())
    return value


if __name__ == "__main__":
    main()
