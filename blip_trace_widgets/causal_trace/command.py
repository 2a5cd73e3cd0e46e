"""The ``blip-trace demo`` and ``blip-trace trace`` subcommands: one trace (or the demo's few) written as PNG and
JSON, named after the question, the image and the configuration.

    blip-trace demo --out trace-output
    blip-trace trace --model demo --image cat.png --question "what color is the cat?" --out out/
    blip-trace trace --model demo-caption --image cat.png --out out/          # every word of the caption
    blip-trace trace --model demo-itm --image cat.png --text "a red circle" --out out/

    >>> from blip_trace_widgets.causal_trace.command import SHARED_FIELDS
    >>> "samples" in SHARED_FIELDS
    True
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..core.command_line import (
    UsageError,
    add_config_options,
    add_device_options,
    add_model_option,
    add_out_option,
    check_out,
    config_fields,
    progress_bar,
    slug,
)
from ..core.names import (
    ANSWER_DECODER,
    CAPTION_DECODER,
    DEMO_MODELS,
    HIDDEN,
    HUB_MODELS,
    ITM_ENCODER,
    QFORMER,
    QUESTION_ENCODER,
    SUBLAYER_KINDS,
    VISION_ENCODER,
    facts,
    window_for,
)
from ..corruptions.kinds import BY_NAME, WordSwap, from_name
from ..models import heads
from .config import TraceConfig, parse_position

DEMO_TRACES = [*((QUESTION_ENCODER, kind, window_for(kind, 3)) for kind in SUBLAYER_KINDS),
               (ANSWER_DECODER, HIDDEN, 1), (VISION_ENCODER, HIDDEN, 1)]


DEMO_HEAD_TRACES = [("demo-caption", CAPTION_DECODER, "mlp", 3), ("demo-itm", ITM_ENCODER, "mlp", 3),
                    ("demo-blip2", QFORMER, HIDDEN, 1)]


def output_stem(question: str, image_key: str, config: Any) -> str:
    """A file name per (question, image, configuration): unique, and never starting with '-'."""
    digest = hashlib.sha1(json.dumps(config.to_json(), sort_keys=True).encode()).hexdigest()[:8]
    return f"{slug(question)}-{image_key[:8]}-{config.block}-{config.kind}-{digest}"


def write_result(result, out: Path, stem: str) -> tuple[Path, Path]:
    from .plots import save_heatmap

    out.mkdir(parents=True, exist_ok=True)
    json_path = result.save(out / f"{stem}.json")
    png_path = out / f"{stem}.png"
    save_heatmap(result, str(png_path))
    return png_path, json_path


def load_bundle(model: str, device: str | None, dtype: str | None):
    from ..models.loading import load_model

    return load_model(model, device=device, dtype=dtype)


def run_demo(args: argparse.Namespace) -> int:
    from ..datasets.easy_vqa import demo_samples
    from .procedures import default_corruption
    from .tracer import Tracer, default_config

    started = time.perf_counter()
    bundle = load_bundle("demo", args.device, None)
    samples = demo_samples(per_type=1)
    levels = [getattr(default_corruption(bundle, stage), "level", 0.0) for stage in ("image", "patches")]
    print(f"demo model: Gaussian noise of {levels[0]:g}σ on the image embeddings "
          f"({levels[1]:g}σ on the patch embeddings for the image-side trace), "
          f"{default_config(bundle, samples=args.samples).samples} noise samples. "
          "Each model is traced at its own level: the one its folder's "
          "trace_defaults.json names, where its maps show a clear effect (ROME's 3σ where it names none)")
    check_out(args.out)
    out = Path(args.out)
    bar = progress_bar(len(samples) * len(DEMO_TRACES) + len(DEMO_HEAD_TRACES))
    heatmaps, overlays = 0, 0
    for index, (image, question, expected) in enumerate(samples):
        tracer = Tracer(bundle, image, question)
        bar.write(f"\n[{index + 1}] question: {question}\n    model's answer: {tracer.model_answer!r} (expected {expected!r})")
        for block, kind, window in DEMO_TRACES:
            config = default_config(bundle, block=block, kind=kind, window=window, samples=args.samples, seed=args.seed)
            result = tracer.trace(config)
            stem = f"{index + 1}-{output_stem(question, tracer.image_key, config)}"
            png, js = write_result(result, out, stem)
            heatmaps += 1
            if facts(block).image_side:
                from .plots import figure_png, plot_on_image

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
    from .tracer import Tracer, default_config

    written, caption = 0, ""
    for model, block, kind, window in DEMO_HEAD_TRACES:  # the captioner first: the matcher matches its caption
        bundle = load_bundle(model, args.device, None)
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
        png, js = write_result(result, out, f"{model}-{output_stem(tracer.question or 'caption', tracer.image_key, config)}")
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
    from .procedures import resolve_config

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
        args, TraceConfig, corruption=corruption, corrupt_tokens=_corrupt_tokens(args.corrupt_tokens),
        word=None if args.word == "all" else args.word, position=parse_position(args.position)))


def _counterfactual(args: argparse.Namespace) -> Any:
    """--counterfactual-image PATH or --swap OLD=NEW[,OLD=NEW]: an ImageSwap or a WordSwap, else None."""
    from ..corruptions.kinds import ImageSwap

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


def run_trace(args: argparse.Namespace) -> int:
    from .tracer import Tracer

    if args.model not in DEMO_MODELS and not Path(args.model).exists() and "/" not in args.model:
        raise UsageError(f"--model {args.model!r} is neither {', '.join(DEMO_MODELS)}, a folder, nor a hub id such as "
                         f"{', '.join(HUB_MODELS.values())} (did you mean a local folder?)")
    if Path(args.image).is_dir():
        raise UsageError(f"--image {args.image!r} is a folder: name an image file in it")
    if not Path(args.image).is_file():
        raise UsageError(f"--image {args.image!r}: no such file")
    check_out(args.out)
    bundle = load_bundle(args.model, args.device, args.dtype)
    task = heads.of(bundle)
    if args.question is None and task.needs_text:
        raise UsageError(f"{task.text_option} is required for {task.a_model}: the {task.text}")
    config = _trace_config(args, bundle)
    tracer = Tracer(bundle, args.image, args.question or "")
    if args.word == "all":
        if not task.scores_words:
            raise UsageError("--word all traces every word of a caption: use it with a captioning model")
        return _trace_every_word(args, tracer, config)
    print(what_the_model_says(tracer))
    from .cost import trace_cost

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
    png, js = write_result(result, Path(args.out), stem)
    if facts(args.block).image_side:
        from .plots import figure_png, plot_on_image

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


def what_the_model_says(tracer: Any) -> str:
    return tracer.task.describe(tracer)


def _trace_every_word(args: argparse.Namespace, tracer: Any, config: Any) -> int:
    """A captioner with --word all: one heatmap per word of the caption, and the summary."""
    from dataclasses import replace

    from .captioning import trace_words
    from .cost import total_cost

    print(what_the_model_says(tracer))
    words = range(len(tracer.caption_words(config.answer)))
    warning = total_cost(tracer, [replace(config, word=k) for k in words]).warning()
    if warning:
        print(f"warning: {warning}", file=sys.stderr)

    def write(k: int, word: str, result: Any) -> None:
        png, _ = write_result(result, Path(args.out), f"word{k}-{output_stem(word, tracer.image_key, replace(config, word=k))}")
        print(f"word {k} {word!r}: clean {result.high_score:.4f}  corrupted {result.low_score:.4f}  total effect "
              f"{result.total_effect:.4f}  -> {png}")

    print(trace_words(tracer, config, write).describe())
    return 0


def check_dataset_head(dataset: str, head: str) -> None:
    from ..datasets.subsets import CAPTION_SUBSETS

    task = heads.of(head)
    if (dataset in CAPTION_SUBSETS) == task.reads_questions:
        wanted = "a question set" if task.reads_questions else ", ".join(CAPTION_SUBSETS)
        raise UsageError(f"--dataset {dataset} does not suit {task.a_model}: use {wanted}")


def noise_help() -> str:
    levels = ", ".join(f"{name} {cls.info.default_level:g}" for name, cls in BY_NAME.items()
                       if cls.info.default_level is not None)
    return f"noise level: the {{scale, std, factor, sigma}} of --noise (defaults: {levels})"


#: The TraceConfig fields that both ``trace`` and ``sweep`` offer as options, with one default each (the
#: configuration's own, through :func:`~.procedures.resolve_config`); ``trace`` offers TRACE_FIELDS too.
SHARED_FIELDS = ("block", "window", "samples", "seed", "metric", "regions", "direction", "method", "steps", "verify",
                 "order", "qk_fix", "grad_drop")


TRACE_FIELDS = ("kind", "answer", "word", "contrast", "sever", "sever_at", "corrupt", "corrupt_tokens", "position")


def add_trace_options(one: argparse.ArgumentParser) -> None:
    from .procedures import PROCEDURES

    one.add_argument("--procedure", choices=list(PROCEDURES), default="rome",
                     help="preset to start from: " + "; ".join(f"{p.name}: {p.summary}" for p in PROCEDURES.values())
                          + " (default: %(default)s); the options below override it")
    add_noise_options(one)
    one.add_argument("--counterfactual-image", default=None,
                     help="corrupt by swapping in this image instead of noise (at --corrupt image, patches or pixels); "
                          "with --metric logit_diff the model's answer on it is the contrast by default")
    one.add_argument("--swap", default=None, action="append",
                     help="corrupt by swapping the text's words instead of noise, OLD=NEW[,OLD=NEW] such as "
                          "circle=triangle, or the option once per swap (same length in tokens; the model's answer "
                          "to the swapped question is logit_diff's default contrast)")
    add_config_options(one, (*SHARED_FIELDS, *TRACE_FIELDS), TraceConfig)


def add_noise_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--noise", choices=list(BY_NAME), default=None,
                        help="the corruption (default: gaussian, at the model's own level on image embeddings, "
                             "3σ on patch embeddings)")
    parser.add_argument("--scale", type=float, default=None, help=noise_help())


def add_trace_parsers(sub: Any) -> None:
    """The ``demo`` and ``trace`` subcommands."""
    demo = sub.add_parser("demo", help="trace a few easy-VQA samples on the bundled demo model (offline)",
                          description="Offline: the bundled demo models on a few easy-VQA test samples. Traces hidden, "
                                      "MLP, self-attention and cross-attention of the question encoder, hidden states "
                                      "of the answer decoder and of the vision encoder; then the demo captioner's "
                                      "colour word and the demo matcher's p(match) for that caption (MLP, window 3); "
                                      "writes a PNG and a JSON per trace, and an overlay on the image for the vision "
                                      "encoder.")
    demo.add_argument("--out", default="trace-output", help="folder for the PNG and JSON files (default: %(default)s)")
    add_config_options(demo, ("samples", "seed"), TraceConfig)
    add_device_options(demo, "cuda if present", dtype=False)
    demo.set_defaults(run=run_demo)

    one = sub.add_parser("trace", help="trace one image and question", description="Run one causal trace and write "
                         "its heatmap (PNG) and result (JSON), named after the question, image and configuration.")
    add_model_option(one)
    one.add_argument("--image", required=True, help="path of the image file")
    one.add_argument("--question", "--prompt", "--text", dest="question", default=None,
                     help="VQA: the question about the image (required); captioning: the prompt, such as "
                          "'a picture of' (default: none); image-text matching: the text to match (required)")
    add_trace_options(one)
    add_device_options(one)
    add_out_option(one, "the PNG and JSON files")
    one.set_defaults(run=run_trace)
