"""The ``blip-trace sweep`` subcommand: causal tracing over a question set, written as a Parquet table, averaged
heatmaps and effect-by-layer lines; resumable, and sharded under ``accelerate``.

    blip-trace sweep --dataset easy-vqa-color --limit 50 --model demo --out sweep-output
    accelerate launch --multi_gpu --num_processes 2 -m blip_trace_widgets sweep --dataset coco-qa-color ...

    >>> from blip_trace_widgets.sweeps.command import add_sweep_parser
    >>> add_sweep_parser.__name__
    'add_sweep_parser'
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..causal_trace.command import SHARED_FIELDS, add_noise_options, check_dataset_head, load_bundle
from ..causal_trace.config import TraceConfig
from ..core.command_line import (
    UsageError,
    add_config_options,
    add_device_options,
    add_model_option,
    add_out_option,
    check_out,
    config_fields,
)
from ..core.names import (
    ANSWER_MODES,
    HIDDEN,
    KINDS,
    QUESTION_PAIRS,
    QUESTIONS_PER_PAIR,
    VISION_KINDS,
    facts,
    is_head_kind,
    kinds_of,
    window_for,
)
from ..corruptions.kinds import PairSwap, from_name
from ..datasets.easy_vqa import PAIR_KINDS
from ..models import heads


def run_sweep(args: argparse.Namespace) -> int:
    from .sweep import ProcessGroup, process_device, sweep

    by_question = args.pairs == QUESTION_PAIRS
    if by_question and args.dataset is None:
        raise UsageError(f"--pairs {QUESTION_PAIRS} pairs the questions of --dataset: give --dataset too")
    if not by_question and (args.dataset is None) == (args.pairs is None):
        raise UsageError("give --dataset (a question set) or --pairs (color or shape image pairs), one of them "
                         f"(or both, with --pairs {QUESTION_PAIRS})")
    bundle = load_bundle(args.model, args.device or process_device(), args.dtype)
    args.block = args.block or heads.of(bundle).default_block
    if args.pairs is not None and not heads.of(bundle).reads_questions:
        raise UsageError("--pairs are easy-VQA questions: use a visual question answering model")
    if args.dataset is not None:
        check_dataset_head(args.dataset, bundle.head)
    vision = facts(args.block).image_side
    configs = _sweep_configs(args, bundle)
    samples = _sweep_samples(args)
    if bundle.device.type == "cpu":
        _share_cpu_threads()
    scored = _scored_mode(args)
    check_out(args.out)
    out = Path(args.out)
    group = ProcessGroup()
    shard = group.shard
    if shard.count > 1:
        print(f"process {shard.index + 1}/{shard.count} on {bundle.device}: "
              f"{len(range(shard.index, len(samples), shard.count))} of {len(samples)} {heads.of(bundle).unit}", file=sys.stderr)
    if group.is_main:
        source = (f"{args.dataset}, paired by question" if by_question else f"easy-VQA {args.pairs} pairs"
                  if args.pairs else args.dataset)
        how = ("each with its partner image swapped in" if args.pairs else str(configs[0].to_json()["corruption"]))
        print(f"{len(samples)} {heads.of(bundle).unit} from {source}; {len(configs)} traces each on {bundle.name}, "
              f"{configs[0].direction}; {how}; results in {out}")
    started = time.perf_counter()
    dataset = {"name": args.dataset or f"easy-vqa {args.pairs} pairs", "limit": args.limit, "words": args.words,
               **({"pairs": QUESTION_PAIRS} if by_question else {})}
    table = sweep(bundle, samples, configs=configs, out=out, scored=scored, overwrite=args.overwrite,
                  dataset=dataset)
    if group.is_main and len(table) == 0:
        raise UsageError("the sweep made no trace: " + (
            f"no caption has the words --caption-words {args.caption_words} picks; pick smaller word indices "
            "(from 0)" if args.caption_words else "no question could be traced"))
    if group.is_main:
        _write_averages(table, out, args.correct_only, vision, started)
    return 0


def _sweep_configs(args: argparse.Namespace, bundle: Any) -> list[Any]:
    """The sweep's configurations: each --kinds kind (and caption word) through the one resolver."""
    from ..causal_trace.procedures import resolve_config

    block = args.block or heads.of(bundle).default_block
    allowed = kinds_of(block)
    positional = [k for k in allowed if not is_head_kind(k)]  # the default: head maps only when asked for
    kinds = [k.strip() for k in (args.kinds or ",".join(positional)).split(",") if k.strip()]
    for kind in kinds:
        if kind not in allowed:
            raise UsageError(f"--kinds: unknown kind {kind!r} for {block}; use some of {','.join(allowed)}")
    if args.regions is not None and not facts(block).image_side:
        raise UsageError("--regions groups image patches: use it with --block vision_encoder")
    if args.pairs is not None and args.noise is not None:
        raise UsageError("--pairs swaps in each pair's partner image instead of noise: drop --noise and --scale")
    if args.scale is not None and args.noise is None:
        raise UsageError("--scale sets the level of --noise: pass --noise too")
    corruption = PairSwap() if args.pairs is not None else from_name(args.noise, args.scale) if args.noise else None
    if args.qk_fix and HIDDEN not in kinds:
        raise UsageError("--qk-fix corrects estimates of hidden states: add hidden to --kinds")
    return [resolve_config(bundle, "rome", **config_fields(
        args, TraceConfig, block=block, kind=kind, corruption=corruption, word=word,
        window=None if args.window is None else window_for(kind, args.window),
        qk_fix=args.qk_fix if kind == HIDDEN else None))
        for word in caption_words_option(args.caption_words, bundle.head) for kind in kinds]


def _scored_mode(args: argparse.Namespace) -> str:
    """--scored (model or expected); the old --answer spelling still works for one release, with a warning."""
    if args.answer_mode is None:
        return str(args.scored)
    print("warning: sweep --answer is now --scored (--answer will be removed in the next release)", file=sys.stderr)
    return str(args.answer_mode)


def _sweep_samples(args: argparse.Namespace) -> Any:
    """The sweep's questions: --pairs' easy-VQA image pairs, or --dataset's questions."""
    from ..datasets.subsets import load_vqa_subset

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.pairs is not None and args.pairs != QUESTION_PAIRS:
        from ..datasets.easy_vqa import easy_vqa_pairs

        return easy_vqa_pairs(args.pairs, limit=args.limit)
    by_question = args.pairs == QUESTION_PAIRS
    looked_at = args.limit * QUESTIONS_PER_PAIR if by_question and args.limit is not None else args.limit
    samples = load_vqa_subset(args.dataset, cache_dir=args.cache_dir, limit=looked_at, words=args.words,
                              csv_path=args.csv, image_dir=args.image_dir)
    if not samples:
        raise UsageError(f"no questions in {args.dataset} match --words {args.words}")
    if by_question:
        from ..datasets.subsets import question_pairs

        samples = question_pairs(samples, limit=args.limit)
        if not samples:
            raise UsageError(f"no two questions of {args.dataset} ask the same thing with different answers")
    return samples


def caption_words_option(text: str | None, head: str) -> list[int | None]:
    """--caption-words: the caption words each captioning configuration scores (default: each caption's first
    content word, as everywhere)."""
    if not heads.of(head).scores_words:
        if text is not None:
            raise UsageError("--caption-words picks caption words: use it with a captioning model")
        return [None]
    if text is None:
        return [None]
    try:
        words = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--caption-words must be comma-separated word indices such as 1,2; got {text!r}") from None
    if not words or min(words) < 0:
        raise UsageError(f"--caption-words must be word indices 0 or above; got {text!r}")
    return list(dict.fromkeys(words))


def _write_averages(table: Any, out: Path, correct_only: bool, vision: bool, started: float) -> None:
    """average_effect.csv and the averaged figures of a finished sweep."""
    from ..causal_trace.averages import average_effect, top_heads
    from .plots import plot_average_heatmaps, plot_effect_by_layer

    correct = table.drop_duplicates("sample")["correct"].dropna()
    if len(correct):
        print(f"model answered {int(correct.sum())} of {len(correct)} questions correctly")
    only = correct_only and bool(correct.any())
    average_effect(table, correct_only=only).to_csv(out / "average_effect.csv", index=False)
    plot_average_heatmaps(table, correct_only=only).savefig(out / "average_heatmaps.png")
    figures = ["average_heatmaps.png"]
    if not vision:  # image-side sweeps average per region: the heatmaps show them; there are no token roles
        plot_effect_by_layer(table, correct_only=only).savefig(out / "effect_by_layer.png")
        figures.append("effect_by_layer.png")
    if table["kind"].map(lambda kind: is_head_kind(str(kind))).any():  # head maps: the heads ranked
        top_heads(table, 10, correct_only=only).to_csv(out / "top_heads.csv", index=False)
        figures.insert(0, "top_heads.csv")
    print(f"wrote {out / 'sweep.parquet'} ({len(table)} rows), average_effect.csv, {', '.join(figures)} "
          f"in {time.perf_counter() - started:.1f} s")


def _share_cpu_threads() -> None:
    """Under a multi-process launch on CPU, split the cores between the processes."""
    import os

    import torch

    world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))


def add_sweep_parser(sub: Any) -> None:
    from ..datasets.subsets import SUBSETS

    many = sub.add_parser(
        "sweep", help="trace every question of a dataset and average (resumable; shards under accelerate launch)",
        description="Trace each question of a subset with each kind, write sweep.parquet (resumable: run the same "
                    "command again to continue), average_effect.csv and the averaged figures. Under `accelerate "
                    "launch --multi_gpu --num_processes N -m blip_trace_widgets sweep ...` each process takes a disjoint shard.")
    many.add_argument("--dataset", default=None, choices=SUBSETS, help="the question set (or --pairs)")
    many.add_argument("--pairs", default=None, choices=[*PAIR_KINDS, QUESTION_PAIRS],
                      help="instead of --dataset: easy-VQA image pairs that differ in this attribute; or, with "
                           f"--dataset, '{QUESTION_PAIRS}': the dataset's images paired where they are asked the same "
                           f"question and answer it differently (looking at {QUESTIONS_PER_PAIR} x --limit questions). "
                           "Each is traced with its partner image swapped in (with --metric logit_diff, against the "
                           "partner's answer)")
    many.add_argument("--limit", type=int, default=None, help="at most this many questions")
    many.add_argument("--words", type=int, default=None,
                      help="keep questions of exactly this many words (the paper used 7)")
    add_model_option(many)
    add_out_option(many, "the table and figures")
    many.add_argument("--caption-words", "--targets", default=None, dest="caption_words",
                      help="captioning: comma-separated caption words to score, from 0 (default: each caption's first "
                           "content word); a caption without such a word is skipped for it (--targets: old name)")
    many.add_argument("--kinds", default=None,
                      help=f"comma-separated kinds to trace (default: {','.join(KINDS)}; "
                           f"{','.join(VISION_KINDS)} for the vision encoder)")
    add_noise_options(many)
    add_config_options(many, SHARED_FIELDS, TraceConfig)
    many.add_argument("--scored", choices=ANSWER_MODES, default="model",
                      help="which answer each trace scores: the model's own or the dataset's (default: %(default)s)")
    many.add_argument("--answer", choices=ANSWER_MODES, default=None, dest="answer_mode", help=argparse.SUPPRESS)
    many.add_argument("--correct-only", action="store_true", help="average only correctly answered questions")
    many.add_argument("--overwrite", action="store_true", help="discard an earlier, different sweep in --out")
    many.add_argument("--cache-dir", default=None, help="where downloaded CSVs and images are kept")
    many.add_argument("--csv", default=None, help="a local copy of the paper's CSV for --dataset")
    many.add_argument("--image-dir", default=None, help="a local folder of the dataset's images")
    add_device_options(many, device_default="the launcher's, else cuda if present")
    many.set_defaults(run=run_sweep)
