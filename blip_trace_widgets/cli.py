"""The ``blip-trace`` command line (also ``python -m blip_trace_widgets``).

    blip-trace demo --out trace-output
    blip-trace trace --model demo --image cat.png --question "what color is the cat?" --out out/
    blip-trace trace --model demo-caption --image cat.png --out out/          # every word of the caption
    blip-trace trace --model demo-itm --image cat.png --text "a red circle" --out out/
    blip-trace sweep --dataset easy-vqa-color --limit 50 --model demo --out sweep-output
    blip-trace knockout --image cat.png --question "what color is the cat?" --edges image --edges cls --out out/
    accelerate launch --multi_gpu --num_processes 2 -m blip_trace_widgets sweep --dataset coco-qa-color ...

Each trace writes a PNG heatmap and a JSON result (``TraceResult.load`` reads it back),
named after the question, the image and the configuration, so runs never overwrite each
other. A user's mistake (bad arguments, a missing file, a model that cannot be loaded)
prints one line and exits with status 2; anything else is a bug or an environment
problem, and prints its full traceback (exit status 1).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .causal_trace.config import parse_position
from .core.errors import BlipTraceError
from .core.names import (
    ANSWER_DECODER,
    ANSWER_MODES,
    CAPTION_DECODER,
    DEMO_MODELS,
    DTYPES,
    HIDDEN,
    HUB_MODELS,
    ITM_ENCODER,
    KINDS,
    QFORMER,
    QUESTION_ENCODER,
    QUESTION_PAIRS,
    QUESTIONS_PER_PAIR,
    SUBLAYER_KINDS,
    VISION_ENCODER,
    VISION_KINDS,
    facts,
    is_head_kind,
    kinds_of,
    window_for,
)
from .core.roles import ROLES
from .corruptions.kinds import BY_NAME, PairSwap, WordSwap, from_name
from .datasets.easy_vqa import PAIR_KINDS
from .models import heads

DEMO_TRACES = [*((QUESTION_ENCODER, kind, window_for(kind, 3)) for kind in SUBLAYER_KINDS),
               (ANSWER_DECODER, HIDDEN, 1), (VISION_ENCODER, HIDDEN, 1)]
#: The demo's traces of the other heads: (model, block, kind, window).
DEMO_HEAD_TRACES = [("demo-caption", CAPTION_DECODER, "mlp", 3), ("demo-itm", ITM_ENCODER, "mlp", 3),
                    ("demo-blip2", QFORMER, HIDDEN, 1)]


class UsageError(BlipTraceError):
    """A problem with the user's input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line gets one line and a pointer to --help, not the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "trace"


def output_stem(question: str, image_key: str, config: Any) -> str:
    """A file name per (question, image, configuration): unique, and never starting with '-'."""
    digest = hashlib.sha1(json.dumps(config.to_json(), sort_keys=True).encode()).hexdigest()[:8]
    return f"{_slug(question)}-{image_key[:8]}-{config.block}-{config.kind}-{digest}"


def _progress_bar(total_traces: int):
    from tqdm.auto import tqdm

    return tqdm(total=total_traces, unit="trace", file=sys.stderr, disable=None)


def _write(result, out: Path, stem: str) -> tuple[Path, Path]:
    from .causal_trace.plots import save_heatmap

    out.mkdir(parents=True, exist_ok=True)
    json_path = result.save(out / f"{stem}.json")
    png_path = out / f"{stem}.png"
    save_heatmap(result, str(png_path))
    return png_path, json_path


def _load(model: str, device: str | None, dtype: str | None):
    from .models.loading import load_model

    return load_model(model, device=device, dtype=dtype)


def run_demo(args: argparse.Namespace) -> int:
    from .causal_trace.procedures import default_corruption
    from .causal_trace.tracer import Tracer, default_config
    from .datasets.easy_vqa import demo_samples

    started = time.perf_counter()
    bundle = _load("demo", args.device, None)
    samples = demo_samples(per_type=1)
    levels = [getattr(default_corruption(bundle, stage), "level", 0.0) for stage in ("image", "patches")]
    print(f"demo model: Gaussian noise of {levels[0]:g}σ on the image embeddings "
          f"({levels[1]:g}σ on the patch embeddings for the image-side trace), "
          f"{default_config(bundle, samples=args.samples).samples} noise samples. "
          "Each model is traced at its own level: the one its folder's "
          "trace_defaults.json names, where its maps show a clear effect (ROME's 3σ where it names none)")
    _check_out(args.out)
    out = Path(args.out)
    bar = _progress_bar(len(samples) * len(DEMO_TRACES) + len(DEMO_HEAD_TRACES))
    heatmaps, overlays = 0, 0
    for index, (image, question, expected) in enumerate(samples):
        tracer = Tracer(bundle, image, question)
        bar.write(f"\n[{index + 1}] question: {question}\n    model's answer: {tracer.model_answer!r} (expected {expected!r})")
        for block, kind, window in DEMO_TRACES:
            config = default_config(bundle, block=block, kind=kind, window=window, samples=args.samples, seed=args.seed)
            result = tracer.trace(config)
            stem = f"{index + 1}-{output_stem(question, tracer.image_key, config)}"
            png, js = _write(result, out, stem)
            heatmaps += 1
            if facts(block).image_side:
                from .causal_trace.plots import figure_png, plot_on_image

                (out / f"{stem}-on-image.png").write_bytes(figure_png(plot_on_image(result, tracer.image)))
                overlays += 1
            bar.update(1)
            flag = "  (corruption has almost no effect: this map is noise)" if result.is_tiny() else ""
            bar.write(f"    {block:16s} {kind:10s} -> {png} , {js.name}{flag}")
    heatmaps += _demo_heads(args, samples[0][0], samples[0][1], out, bar)
    bar.close()
    print(f"\nwrote {heatmaps} heatmaps with their JSON results, and {overlays} image overlays (*-on-image.png), "
          f"to {out.resolve()} in {time.perf_counter() - started:.1f} s")
    return 0


def _demo_heads(args: argparse.Namespace, image: Any, question: str, out: Path, bar: Any) -> int:
    """The demo's captioning trace (the caption's colour word), image-text matching trace (its own caption) and
    BLIP-2 trace (the first question, through the Q-Former's queries)."""
    from .causal_trace.tracer import Tracer, default_config

    written, caption = 0, ""
    for model, block, kind, window in DEMO_HEAD_TRACES:  # the captioner first: the matcher matches its caption
        bundle = _load(model, args.device, None)
        task = heads.of(bundle)
        caption_model = task.scores_words
        tracer = Tracer(bundle, image, question if task.reads_questions else "" if caption_model else caption)
        if caption_model:
            caption = tracer.model_answer
        config = default_config(bundle, block=block, kind=kind, window=window, samples=args.samples, seed=args.seed)
        result = tracer.trace(config)
        what = (f"caption {tracer.model_answer!r}, word {result.answer!r}" if caption_model
                else f"question {tracer.question!r}: answer {tracer.model_answer!r}" if task.reads_questions
                else f"text {tracer.question!r}: {tracer.model_answer} (p {tracer.match_probability:.3f})")
        level = getattr(config.corruption, "level", None)
        why = "its trace_defaults.json" if getattr(bundle, "noise_scale", 3.0) != 3.0 else "ROME's, as it names none"
        what += f"; noise {level:g}σ ({why})" if level is not None else ""
        bar.write(f"\n[{model}] {task.label}: {what}")
        png, js = _write(result, out, f"{model}-{output_stem(tracer.question or 'caption', tracer.image_key, config)}")
        bar.update(1)
        flag = "  (corruption has almost no effect: this map is noise)" if result.is_tiny() else ""
        bar.write(f"    {block:16s} {kind:10s} -> {png} , {js.name}{flag}")
        written += 1
    return written


def _corrupt_tokens(text: str | None) -> Any:
    if text is None or text == "object":
        return text
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise UsageError(f"--corrupt-tokens must be 'object' or comma-separated positions such as 1,2; got {text!r}") from None


def _trace_config(args: argparse.Namespace, bundle: Any) -> Any:
    from .causal_trace.procedures import resolve_config

    args.block = args.block or heads.of(bundle).default_block
    counterfactual = _counterfactual(args)
    if counterfactual is not None and (args.noise is not None or args.scale is not None):
        raise UsageError("--counterfactual-image and --swap replace the noise: drop --noise and --scale")
    if counterfactual is not None:
        corruption = counterfactual
    elif args.noise is not None:
        corruption = from_name(args.noise, args.scale)
    elif args.scale is not None:
        raise UsageError("--scale sets the level of --noise: pass --noise too")
    else:
        corruption = None  # the procedure's own, at the model's level for ROME's (resolve_config)
    if isinstance(corruption, WordSwap):
        args.corrupt = args.corrupt or "question"
    return resolve_config(bundle, args.procedure, **config_fields(
        args, corruption=corruption, corrupt_tokens=_corrupt_tokens(args.corrupt_tokens),
        word=None if args.word == "all" else args.word, position=parse_position(args.position)))


def _counterfactual(args: argparse.Namespace) -> Any:
    """--counterfactual-image PATH or --swap OLD=NEW[,OLD=NEW]: an ImageSwap or a WordSwap, else None."""
    from .corruptions.kinds import ImageSwap

    if args.counterfactual_image is not None and args.swap is not None:
        raise UsageError("--counterfactual-image swaps the image, --swap the text's words: pick one")
    if args.counterfactual_image is not None:
        if Path(args.counterfactual_image).is_dir():
            raise UsageError(f"--counterfactual-image {args.counterfactual_image!r} is a folder: name an image file in it")
        if not Path(args.counterfactual_image).is_file():
            raise UsageError(f"--counterfactual-image {args.counterfactual_image!r}: no such file")
        return ImageSwap(args.counterfactual_image)
    if args.swap is None:
        return None
    given = ",".join(args.swap)  # --swap a=b --swap c=d is --swap a=b,c=d
    pairs = [item.split("=") for item in given.split(",") if item.strip()]
    if not pairs or any(len(pair) != 2 or not all(w.strip() for w in pair) for pair in pairs):
        raise UsageError(f"--swap takes OLD=NEW words, comma-separated, such as circle=triangle; got {given!r}")
    swap: dict[str, str] = {}
    for old, new in pairs:
        key = old.strip().lower()
        if swap.get(key, new.strip()) != new.strip():
            raise UsageError(f"--swap {given!r} swaps {old.strip()!r} twice, for {swap[key]!r} and {new.strip()!r}: "
                             "swap each word once")
        swap[key] = new.strip()
    return WordSwap(swap)


def _check_out(out: str) -> None:
    """--out must be a folder (made when missing), not a file."""
    if Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out!r} is a file: name a folder to write the results into")


def run_trace(args: argparse.Namespace) -> int:
    from .causal_trace.tracer import Tracer

    if args.model not in DEMO_MODELS and not Path(args.model).exists() and "/" not in args.model:
        raise UsageError(f"--model {args.model!r} is neither {', '.join(DEMO_MODELS)}, a folder, nor a hub id such as "
                         f"{', '.join(HUB_MODELS.values())} (did you mean a local folder?)")
    if Path(args.image).is_dir():
        raise UsageError(f"--image {args.image!r} is a folder: name an image file in it")
    if not Path(args.image).is_file():
        raise UsageError(f"--image {args.image!r}: no such file")
    _check_out(args.out)
    bundle = _load(args.model, args.device, args.dtype)
    task = heads.of(bundle)
    if args.question is None and task.needs_text:
        raise UsageError(f"{task.text_option} is required for {task.a_model}: the {task.text}")
    config = _trace_config(args, bundle)
    tracer = Tracer(bundle, args.image, args.question or "")
    if args.word == "all":
        if not task.scores_words:
            raise UsageError("--word all traces every word of a caption: use it with a captioning model")
        return _trace_every_word(args, tracer, config)
    print(_what_the_model_says(tracer))
    from .causal_trace.cost import trace_cost

    warning = trace_cost(tracer, config).warning()
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    unknown = tracer.unknown_words
    if unknown:
        print(f"warning: the model's vocabulary lacks {', '.join(map(repr, unknown))}; it reads [UNK] there, "
              "so its answer may not be about your words", file=sys.stderr)
    from tqdm.auto import tqdm

    with tqdm(total=1, unit="cell", file=sys.stderr, disable=None) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        result = tracer.trace(config, progress=progress)
    stem = output_stem(tracer.question, tracer.image_key, config)
    png, js = _write(result, Path(args.out), stem)
    if facts(args.block).image_side:
        from .causal_trace.plots import figure_png, plot_on_image

        overlay = Path(args.out) / f"{stem}-on-image.png"
        overlay.write_bytes(figure_png(plot_on_image(result, tracer.image)))
        print(f"wrote {overlay}")
    print(f"scored {result.scored}  clean {result.high_score:.4f}  corrupted {result.low_score:.4f}  "
          f"total effect {result.total_effect:.4f}")
    reason = result.tiny_reason()
    if reason is not None:
        print(f"warning: the corruption has almost no effect on this answer, so the heatmap is noise ({reason}).",
              file=sys.stderr)
    print(f"wrote {png} and {js}")
    return 0


def _what_the_model_says(tracer: Any) -> str:
    return tracer.task.describe(tracer)


def _trace_every_word(args: argparse.Namespace, tracer: Any, config: Any) -> int:
    """A captioner with --word all: one heatmap per word of the caption, and the summary."""
    from dataclasses import replace

    from .causal_trace.captioning import trace_words
    from .causal_trace.cost import total_cost

    print(_what_the_model_says(tracer))
    words = range(len(tracer.caption_words(config.answer)))
    warning = total_cost(tracer, [replace(config, word=k) for k in words]).warning()
    if warning:
        print(f"warning: {warning}", file=sys.stderr)

    def write(k: int, word: str, result: Any) -> None:
        png, _ = _write(result, Path(args.out), f"word{k}-{output_stem(word, tracer.image_key, replace(config, word=k))}")
        print(f"word {k} {word!r}: clean {result.high_score:.4f}  corrupted {result.low_score:.4f}  total effect "
              f"{result.total_effect:.4f}  -> {png}")

    print(trace_words(tracer, config, write).describe())
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    from .sweeps.sweep import ProcessGroup, process_device, sweep

    by_question = args.pairs == QUESTION_PAIRS
    if by_question and args.dataset is None:
        raise UsageError(f"--pairs {QUESTION_PAIRS} pairs the questions of --dataset: give --dataset too")
    if not by_question and (args.dataset is None) == (args.pairs is None):
        raise UsageError("give --dataset (a question set) or --pairs (color or shape image pairs), one of them "
                         f"(or both, with --pairs {QUESTION_PAIRS})")
    bundle = _load(args.model, args.device or process_device(), args.dtype)
    args.block = args.block or heads.of(bundle).default_block
    if args.pairs is not None and not heads.of(bundle).reads_questions:
        raise UsageError("--pairs are easy-VQA questions: use a visual question answering model")
    if args.dataset is not None:
        _check_sweep_dataset(args.dataset, bundle.head)
    vision = facts(args.block).image_side
    configs = _sweep_configs(args, bundle)
    samples = _sweep_samples(args)
    if bundle.device.type == "cpu":
        _share_cpu_threads()
    scored = _scored_mode(args)
    _check_out(args.out)
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
    from .causal_trace.procedures import resolve_config

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
        args, block=block, kind=kind, corruption=corruption, word=word,
        window=None if args.window is None else window_for(kind, args.window),
        qk_fix=args.qk_fix if kind == HIDDEN else None))
        for word in _caption_words(args.caption_words, bundle.head) for kind in kinds]


def _scored_mode(args: argparse.Namespace) -> str:
    """--scored (model or expected); the old --answer spelling still works for one release, with a warning."""
    if args.answer_mode is None:
        return str(args.scored)
    print("warning: sweep --answer is now --scored (--answer will be removed in the next release)", file=sys.stderr)
    return str(args.answer_mode)


def _sweep_samples(args: argparse.Namespace) -> Any:
    """The sweep's questions: --pairs' easy-VQA image pairs, or --dataset's questions."""
    from .datasets.subsets import load_vqa_subset

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.pairs is not None and args.pairs != QUESTION_PAIRS:
        from .datasets.easy_vqa import easy_vqa_pairs

        return easy_vqa_pairs(args.pairs, limit=args.limit)
    by_question = args.pairs == QUESTION_PAIRS
    looked_at = args.limit * QUESTIONS_PER_PAIR if by_question and args.limit is not None else args.limit
    samples = load_vqa_subset(args.dataset, cache_dir=args.cache_dir, limit=looked_at, words=args.words,
                              csv_path=args.csv, image_dir=args.image_dir)
    if not samples:
        raise UsageError(f"no questions in {args.dataset} match --words {args.words}")
    if by_question:
        from .datasets.subsets import question_pairs

        samples = question_pairs(samples, limit=args.limit)
        if not samples:
            raise UsageError(f"no two questions of {args.dataset} ask the same thing with different answers")
    return samples


def _check_sweep_dataset(dataset: str, head: str) -> None:
    from .datasets.subsets import CAPTION_SUBSETS

    task = heads.of(head)
    if (dataset in CAPTION_SUBSETS) == task.reads_questions:
        wanted = "a question set" if task.reads_questions else ", ".join(CAPTION_SUBSETS)
        raise UsageError(f"--dataset {dataset} does not suit {task.a_model}: use {wanted}")


def _caption_words(text: str | None, head: str) -> list[int | None]:
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
    from .causal_trace.averages import average_effect, top_heads
    from .sweeps.plots import plot_average_heatmaps, plot_effect_by_layer

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


def _noise_help() -> str:
    levels = ", ".join(f"{name} {cls.info.default_level:g}" for name, cls in BY_NAME.items()
                       if cls.info.default_level is not None)
    return f"noise level: the {{scale, std, factor, sigma}} of --noise (defaults: {levels})"


#: The TraceConfig fields that both ``trace`` and ``sweep`` offer as options, with one default each (the
#: configuration's own, through :func:`~.procedures.resolve_config`); ``trace`` offers TRACE_FIELDS too.
SHARED_FIELDS = ("block", "window", "samples", "seed", "metric", "regions", "direction", "method", "steps", "verify",
                 "order", "qk_fix", "grad_drop")
#: Options' old names, still taken for one release (argparse gives both the same destination).
TRACE_FIELDS = ("kind", "answer", "word", "contrast", "sever", "sever_at", "corrupt", "corrupt_tokens", "position")
KNOCKOUT_FIELDS = ("window", "answer", "word", "method", "empty")


def _add_config_options(parser: argparse.ArgumentParser, names: Sequence[str], settings: Any = None) -> None:
    """One option per field of ``settings`` (a configuration class; TraceConfig by default) in ``names``, built
    from the field's help, choices, type and default. Each option's value is None unless given: the configuration
    keeps its own default."""
    from .core.options import OLD_FLAGS, option_spec

    if settings is None:
        from .causal_trace.config import TraceConfig as settings
    for name in names:
        flag, kind, choices, help = option_spec(settings, name)
        flags = (flag, *OLD_FLAGS.get(name, ()))
        if kind is bool:  # a switch: given or not (None keeps the configuration's default)
            parser.add_argument(*flags, dest=name, action="store_const", const=True, default=None, help=help)
            continue
        parser.add_argument(*flags, dest=name, type=kind, choices=choices, default=None, help=help)


def config_fields(args: argparse.Namespace, settings: Any = None, **given: Any) -> dict[str, Any]:
    """The fields of ``settings`` (TraceConfig by default) the command line sets: every option named like a field,
    as :func:`_add_config_options` built it, then ``given`` (values the command line spells its own way). A field
    left at None keeps the configuration's default."""
    from .core.options import given_fields

    if settings is None:
        from .causal_trace.config import TraceConfig as settings
    return given_fields(settings, vars(args), **given)


def _add_trace_options(one: argparse.ArgumentParser) -> None:
    from .causal_trace.procedures import PROCEDURES

    one.add_argument("--procedure", choices=list(PROCEDURES), default="rome",
                     help="preset to start from: " + "; ".join(f"{p.name}: {p.summary}" for p in PROCEDURES.values())
                          + " (default: %(default)s); the options below override it")
    _add_noise_options(one)
    one.add_argument("--counterfactual-image", default=None,
                     help="corrupt by swapping in this image instead of noise (at --corrupt image, patches or pixels); "
                          "with --metric logit_diff the model's answer on it is the contrast by default")
    one.add_argument("--swap", default=None, action="append",
                     help="corrupt by swapping the text's words instead of noise, OLD=NEW[,OLD=NEW] such as "
                          "circle=triangle, or the option once per swap (same length in tokens; the model's answer "
                          "to the swapped question is logit_diff's default contrast)")
    _add_config_options(one, (*SHARED_FIELDS, *TRACE_FIELDS))


def _add_noise_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--noise", choices=list(BY_NAME), default=None,
                        help="the corruption (default: gaussian, at the model's own level on image embeddings, "
                             "3σ on patch embeddings)")
    parser.add_argument("--scale", type=float, default=None, help=_noise_help())


def _add_sweep_parser(sub: Any) -> None:
    from .datasets.subsets import SUBSETS

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
    many.add_argument("--model", default="demo", help=f"{', '.join(DEMO_MODELS)}, a local folder or a hub id "
                      "(default: %(default)s)")
    many.add_argument("--out", required=True, help="folder for the table and figures")
    many.add_argument("--caption-words", "--targets", default=None, dest="caption_words",
                      help="captioning: comma-separated caption words to score, from 0 (default: each caption's first "
                           "content word); a caption without such a word is skipped for it (--targets: old name)")
    many.add_argument("--kinds", default=None,
                      help=f"comma-separated kinds to trace (default: {','.join(KINDS)}; "
                           f"{','.join(VISION_KINDS)} for the vision encoder)")
    _add_noise_options(many)
    _add_config_options(many, SHARED_FIELDS)
    many.add_argument("--scored", choices=ANSWER_MODES, default="model",
                      help="which answer each trace scores: the model's own or the dataset's (default: %(default)s)")
    many.add_argument("--answer", choices=ANSWER_MODES, default=None, dest="answer_mode", help=argparse.SUPPRESS)
    many.add_argument("--correct-only", action="store_true", help="average only correctly answered questions")
    many.add_argument("--overwrite", action="store_true", help="discard an earlier, different sweep in --out")
    many.add_argument("--cache-dir", default=None, help="where downloaded CSVs and images are kept")
    many.add_argument("--csv", default=None, help="a local copy of the paper's CSV for --dataset")
    many.add_argument("--image-dir", default=None, help="a local folder of the dataset's images")
    many.add_argument("--dtype", choices=DTYPES, default=None, help="model dtype (default: float32)")
    many.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: the launcher's, else "
                                                      "cuda if present)")
    many.set_defaults(run=run_sweep)


def _knockout_edges(args: argparse.Namespace, image: Any, decoder: str | None) -> tuple[Any, ...]:
    from .attention_knockout.edges import parse_edges
    from .core.names import EACH_TOKEN

    queries = parse_position(args.queries) if args.queries not in (None, EACH_TOKEN) else args.queries
    return tuple(parse_edges(name, image, queries, decoder or ANSWER_DECODER) for name in (args.edges or ["image", "cls"]))


def run_knockout(args: argparse.Namespace) -> int:
    from .attention_knockout.knockout import Knockout, KnockoutConfig
    from .models.attention import DEFAULT_EMPTY

    _check_out(args.out)
    if (args.image is None) == (args.dataset is None):
        raise UsageError("give --image (one knockout) or --dataset (a sweep), not both or neither")
    if args.image is not None and not Path(args.image).is_file():
        raise UsageError(f"--image {args.image!r}: no such file" + (" (it is a folder)" if Path(args.image).is_dir()
                                                                    else ""))
    bundle = _load(args.model, args.device, args.dtype)
    out = Path(args.out)
    if args.dataset is not None:
        return _knockout_sweep(args, bundle, out)
    task = heads.of(bundle)
    if args.question is None and task.needs_text:
        raise UsageError(f"{task.text_option} is required for {task.a_model}")
    knock = Knockout.of(bundle, args.image, args.question or "")
    print(_what_the_model_says(knock.tracer))
    config = KnockoutConfig(**config_fields(args, KnockoutConfig, edges=_knockout_edges(
        args, knock.tracer.image, knock.tracer.task.decoder)))
    result = knock.run(config)
    out.mkdir(parents=True, exist_ok=True)
    asked = json.dumps([[e.to_dict() for e in config.edges], config.window, config.method, config.answer,
                        config.word, *([config.empty] if config.empty != DEFAULT_EMPTY else [])], sort_keys=True)
    stem = (f"knockout-{_slug(knock.tracer.question or 'caption')}-{knock.tracer.image_key[:8]}-"
            f"{hashlib.sha1(asked.encode()).hexdigest()[:8]}")
    json_path = result.save(out / f"{stem}.json")
    from .causal_trace.plots import figure_png

    png = out / f"{stem}.png"
    png.write_bytes(figure_png((result.plot_tokens() if args.queries == "each" else result.plot()).figure))
    print(f"scored {result.answer}  clean p {result.clean_score:.4f}  window {result.window}  ({result.method}; "
          f"{result.empty_label})")
    for (label, layer, change), tiny in zip(result.strongest(), result.tiny()):
        print(f"  {label}: strongest at layer {layer}, {change:+.1%}" + ("  (no effect)" if tiny else ""))
    print(f"wrote {png} and {json_path}")
    return 0


def _knockout_sweep(args: argparse.Namespace, bundle: Any, out: Path) -> int:
    from .attention_knockout.knockout import KnockoutConfig
    from .attention_knockout.sweep import knockout_average, knockout_sweep, plot_knockout_average
    from .causal_trace.plots import figure_png
    from .core.options import field_default
    from .datasets.subsets import load_vqa_subset

    _check_sweep_dataset(args.dataset, bundle.head)
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    samples = load_vqa_subset(args.dataset, cache_dir=args.cache_dir, limit=args.limit)
    edges = args.edges or ["image", "cls"]
    settings = {name: value for name, value in config_fields(args, KnockoutConfig).items() if name != "edges"}
    if settings.pop("word", None) is not None:
        raise UsageError("--word picks a word of one caption: drop it with --dataset")
    scored = "expected" if settings.pop("answer", None) == "expected" else "model"
    window = settings.get("window", field_default(KnockoutConfig, "window"))
    print(f"{len(samples)} questions from {args.dataset}; edges {', '.join(edges)}; window {window}")
    started = time.perf_counter()
    with _progress_bar(len(samples)) as bar:
        table = knockout_sweep(bundle, samples, edges=edges, scored=scored, progress=lambda done: bar.update(1),
                               **settings)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "knockout_sweep.csv", index=False)
    averages = knockout_average(table, correct_only=args.correct_only)
    averages.to_csv(out / "knockout_average.csv", index=False)
    (out / "knockout_average.png").write_bytes(figure_png(plot_knockout_average(averages).figure))
    print(f"wrote knockout_sweep.csv ({len(table)} rows), knockout_average.csv and knockout_average.png in {out} "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


def _add_knockout_parser(sub: Any) -> None:
    from .attention_knockout.edges import SHORTHANDS
    from .attention_knockout.knockout import KnockoutConfig
    from .datasets.subsets import SUBSETS

    ko = sub.add_parser(
        "knockout", help="cut attention edges around each layer and see what the answer loses (attention knockout)",
        description="Attention knockout on the clean input: for each edge group and layer, cut the group's edges in "
                    "a window of layers around it and score p(answer). One image (--image) writes a line plot (PNG) "
                    "and the result (JSON); a dataset (--dataset) writes every row, the averages with 95% intervals "
                    "and their plot.")
    ko.add_argument("--model", default="demo", help=f"{', '.join(DEMO_MODELS)}, a local folder or a hub id "
                    "(default: %(default)s)")
    ko.add_argument("--image", default=None, help="path of the image file")
    ko.add_argument("--question", "--prompt", "--text", dest="question", default=None,
                    help="the question (VQA), prompt (captioning) or text (image-text matching)")
    ko.add_argument("--edges", action="append", default=None,
                    help="an edge group to cut (repeat for several; default: image and cls): "
                         + "; ".join(f"{k}: {v}" for k, v in SHORTHANDS.items()))
    ko.add_argument("--queries", default=None,
                    help="which tokens' attention is cut: a position, comma-separated positions, a role "
                         f"({', '.join(ROLES)}), or 'each' for a tokens x layers map (default: every token)")
    _add_config_options(ko, KNOCKOUT_FIELDS, KnockoutConfig)
    ko.add_argument("--dataset", choices=SUBSETS, default=None, help="sweep a question set instead of one image")
    ko.add_argument("--limit", type=int, default=None, help="with --dataset: at most this many questions")
    ko.add_argument("--correct-only", action="store_true", help="with --dataset: average correct answers only")
    ko.add_argument("--cache-dir", default=None, help="where downloaded CSVs and images are kept")
    ko.add_argument("--dtype", choices=DTYPES, default=None, help="model dtype (default: float32)")
    ko.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cuda if present, else cpu)")
    ko.add_argument("--out", required=True, help="folder for the figures and results")
    ko.set_defaults(run=run_knockout)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="blip-trace", description="Causal tracing of BLIP (ROME-style): visual question answering, "
                     "captioning and image-text matching.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="trace a few easy-VQA samples on the bundled demo model (offline)",
                          description="Offline: the bundled demo models on a few easy-VQA test samples. Traces hidden, "
                                      "MLP, self-attention and cross-attention of the question encoder, hidden states "
                                      "of the answer decoder and of the vision encoder; then the demo captioner's "
                                      "colour word and the demo matcher's p(match) for that caption (MLP, window 3); "
                                      "writes a PNG and a JSON per trace, and an overlay on the image for the vision "
                                      "encoder.")
    demo.add_argument("--out", default="trace-output", help="folder for the PNG and JSON files (default: %(default)s)")
    _add_config_options(demo, ("samples", "seed"))
    demo.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cuda if present)")
    demo.set_defaults(run=run_demo)

    one = sub.add_parser("trace", help="trace one image and question", description="Run one causal trace and write "
                         "its heatmap (PNG) and result (JSON), named after the question, image and configuration.")
    one.add_argument("--model", default="demo", help=f"{', '.join(DEMO_MODELS)}, a local folder, or a hub id such as "
                     f"{', '.join(HUB_MODELS.values())} (default: %(default)s)")
    one.add_argument("--image", required=True, help="path of the image file")
    one.add_argument("--question", "--prompt", "--text", dest="question", default=None,
                     help="VQA: the question about the image (required); captioning: the prompt, such as "
                          "'a picture of' (default: none); image-text matching: the text to match (required)")
    _add_trace_options(one)
    one.add_argument("--dtype", choices=DTYPES, default=None, help="model dtype (default: float32)")
    one.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    one.add_argument("--out", required=True, help="folder for the PNG and JSON files")
    one.set_defaults(run=run_trace)

    _add_sweep_parser(sub)
    _add_knockout_parser(sub)
    from .lenses.command import add_parser as add_lens_parser

    add_lens_parser(sub)
    from .circuits.command import add_parser as add_circuit_parser

    add_circuit_parser(sub)
    return parser


#: Errors from the operating system that name a path the user gave: their fix is the user's.
USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from .core.threads import use_sensible_threads

        use_sensible_threads()  # fewer threads than cores when other work is running (unless OMP_NUM_THREADS is set)
        return args.run(args)
    except (BlipTraceError, *USER_OS_ERRORS) as error:  # a user's mistake: one line (any other error: a traceback)
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"blip-trace: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `blip-trace ... | head`: the reader left; end quietly
        import os

        try:  # point stdout at /dev/null, so that Python's final flush does not complain
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
