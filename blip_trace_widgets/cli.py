"""The ``blip-trace`` command line (also ``python -m blip_trace_widgets``).

    blip-trace demo --out trace-output
    blip-trace trace --model demo --image cat.png --question "what color is the cat?" --out out/
    blip-trace sweep --dataset easy-vqa-color --limit 50 --model demo --out sweep-output
    accelerate launch --multi_gpu --num_processes 2 -m blip_trace_widgets sweep --dataset coco-qa-color ...

Each trace writes a PNG heatmap and a JSON result (``TraceResult.load`` reads it back).
Bad arguments or missing files print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import anatomy
from .corruption import BY_NAME, from_name

DEFAULT_LEVEL = {"gaussian": 3.0, "multiplicative": 5.0, "uniform": 3.0}
DEMO_TRACES = [("question_encoder", "hidden", 1), ("question_encoder", "mlp", 3), ("question_encoder", "self_attn", 3),
               ("question_encoder", "cross_attn", 3), ("answer_decoder", "hidden", 1), ("vision_encoder", "hidden", 1)]
DEMO_PATCH_NOISE = 3.0  # image-side demo trace: ROME's 3σ on the patch embeddings


class UsageError(Exception):
    """A problem with the user's input: reported in one line, exit status 2."""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


def _progress_bar(total_traces: int):
    from tqdm.auto import tqdm

    return tqdm(total=total_traces, unit="trace", file=sys.stderr, disable=None)


def _write(result, out: Path, stem: str) -> tuple[Path, Path]:
    from .plotting import save_heatmap

    out.mkdir(parents=True, exist_ok=True)
    json_path = result.save(out / f"{stem}.json")
    png_path = out / f"{stem}.png"
    save_heatmap(result, str(png_path))
    return png_path, json_path


def _load(model: str, device: str | None, dtype: str | None):
    from .loading import load_model

    return load_model(model, device=device, dtype=dtype)


def run_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .corruption import GaussianNoise
    from .data import demo_samples
    from .tracing import Tracer, default_config

    started = time.perf_counter()
    bundle = _load("demo", args.device, None)
    samples = demo_samples(per_type=1)
    print(f"demo model, Gaussian noise of {bundle.noise_scale:g}σ on the image embeddings "
          f"({DEMO_PATCH_NOISE:g}σ on the patch embeddings for the image-side trace), {args.samples} samples")
    out = Path(args.out)
    bar = _progress_bar(len(samples) * len(DEMO_TRACES))
    for index, (image, question, expected) in enumerate(samples):
        tracer = Tracer(bundle, image, question)
        bar.write(f"\n[{index + 1}] question: {question}\n    model's answer: {tracer.model_answer!r} (expected {expected!r})")
        for block, kind, window in DEMO_TRACES:
            config = default_config(bundle, block=block, kind=kind, window=window, samples=args.samples, seed=args.seed)
            if block == anatomy.VISION_BLOCK:
                config = replace(config, corruption=GaussianNoise(DEMO_PATCH_NOISE))
            result = tracer.trace(config)
            stem = f"{index + 1}-{_slug(question)}-{block}-{kind}"
            png, js = _write(result, out, stem)
            if block == anatomy.VISION_BLOCK:
                from .plotting import figure_png, plot_on_image

                (out / f"{stem}-on-image.png").write_bytes(figure_png(plot_on_image(result, tracer.image)))
            bar.update(1)
            bar.write(f"    {block:16s} {kind:10s} -> {png} , {js.name}")
    bar.close()
    print(f"\nwrote {len(samples) * len(DEMO_TRACES)} heatmaps and results to {out.resolve()} "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


def run_trace(args: argparse.Namespace) -> int:
    from .tracing import TraceConfig, Tracer

    if args.model != "demo" and not Path(args.model).exists() and "/" not in args.model:
        raise UsageError(f"--model {args.model!r} is neither 'demo', a folder, nor a hub id such as Salesforce/blip-vqa-base")
    if not Path(args.image).is_file():
        raise UsageError(f"--image {args.image!r}: no such file")
    level = args.scale if args.scale is not None else DEFAULT_LEVEL[args.noise]
    config = TraceConfig(block=args.block, kind=args.kind, window=args.window, corruption=from_name(args.noise, level),
                         samples=args.samples, seed=args.seed, answer=args.answer, sever=args.sever,
                         corrupt=args.corrupt, regions=args.regions)
    bundle = _load(args.model, args.device, args.dtype)
    tracer = Tracer(bundle, args.image, args.question)
    print(f"question: {tracer.question}\nmodel's answer: {tracer.model_answer!r}")
    from tqdm.auto import tqdm

    with tqdm(total=1, unit="cell", file=sys.stderr, disable=None) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        result = tracer.trace(config, progress=progress)
    png, js = _write(result, Path(args.out), f"{_slug(tracer.question)}-{args.block}-{args.kind}")
    if args.block == anatomy.VISION_BLOCK:
        from .plotting import figure_png, plot_on_image

        overlay = Path(args.out) / f"{_slug(tracer.question)}-{args.block}-{args.kind}-on-image.png"
        overlay.write_bytes(figure_png(plot_on_image(result, tracer.image)))
        print(f"wrote {overlay}")
    print(f"scored answer: {result.answer!r}  clean {result.high_score:.4f}  corrupted {result.low_score:.4f}")
    print(f"wrote {png} and {js}")
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    from .sweep_plots import plot_average_heatmaps, plot_effect_by_layer
    from .subsets import load_vqa_subset
    from .sweep import _ProcessGroup, process_device, sweep
    from .tracing import TraceConfig

    vision = args.block == anatomy.VISION_BLOCK
    allowed = anatomy.VISION_KINDS if vision else anatomy.KINDS
    kinds = [k.strip() for k in (args.kinds or ",".join(allowed)).split(",") if k.strip()]
    for kind in kinds:
        if kind not in allowed:
            raise UsageError(f"--kinds: unknown kind {kind!r} for {args.block}; use some of {','.join(allowed)}")
    if args.regions is not None and not vision:
        raise UsageError("--regions groups image patches: use it with --block vision_encoder")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    samples = load_vqa_subset(args.dataset, cache_dir=args.cache_dir, limit=args.limit, words=args.words,
                              csv_path=args.csv, image_dir=args.image_dir)
    if not samples:
        raise UsageError(f"no questions in {args.dataset} match --words {args.words}")
    device = args.device or process_device()
    if device is not None and device.startswith("cpu"):
        _share_cpu_threads()
    bundle = _load(args.model, device, args.dtype)
    level = args.scale if args.scale is not None else (  # the model's own level is for its image embeddings
        bundle.noise_scale if args.noise == "gaussian" and not vision else DEFAULT_LEVEL[args.noise])
    configs = [TraceConfig(block=args.block, kind=kind, window=1 if kind == "hidden" else args.window,
                           corruption=from_name(args.noise, level), samples=args.samples, seed=args.seed,
                           regions=args.regions)
               for kind in kinds]
    out = Path(args.out)
    group = _ProcessGroup()
    shard = group.shard
    if shard.count > 1:
        print(f"process {shard.index + 1}/{shard.count} on {bundle.device}: "
              f"{len(range(shard.index, len(samples), shard.count))} of {len(samples)} questions", file=sys.stderr)
    if group.is_main:
        print(f"{len(samples)} questions from {args.dataset}; {len(configs)} traces each on {bundle.name}; "
              f"{args.noise} noise {level:g}; results in {out}")
    started = time.perf_counter()
    table = sweep(bundle, samples, configs=configs, out=out, answer=args.answer, overwrite=args.overwrite)
    if not group.is_main:
        return 0
    correct = table.drop_duplicates("sample")["correct"].dropna()
    if len(correct):
        print(f"model answered {int(correct.sum())} of {len(correct)} questions correctly")
    from .aggregate import average_effect

    only = args.correct_only and bool(correct.any())
    average_effect(table, correct_only=only).to_csv(out / "average_effect.csv", index=False)
    plot_average_heatmaps(table, correct_only=only).savefig(out / "average_heatmaps.png")
    figures = ["average_heatmaps.png"]
    if not vision:  # image-side sweeps average per region: the heatmaps show them; there are no token roles
        plot_effect_by_layer(table, correct_only=only).savefig(out / "effect_by_layer.png")
        figures.append("effect_by_layer.png")
    print(f"wrote {out / 'sweep.parquet'} ({len(table)} rows), average_effect.csv and {' and '.join(figures)} "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


def _share_cpu_threads() -> None:
    """Under a multi-process launch on CPU, split the cores between the processes."""
    import os

    import torch

    world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blip-trace", description="Causal tracing of BLIP visual question answering (ROME-style).")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="trace a few easy-VQA samples on the bundled demo model (offline)",
                          description="Offline: the bundled demo model on a few easy-VQA test samples. Traces hidden, "
                                      "MLP, self-attention and cross-attention of the question encoder, and hidden "
                                      "states of the answer decoder; writes a PNG and a JSON per trace.")
    demo.add_argument("--out", default="trace-output", help="folder for the PNG and JSON files (default: %(default)s)")
    demo.add_argument("--samples", type=int, default=10, help="noise samples per trace (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    demo.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cuda if present)")
    demo.set_defaults(run=run_demo)

    one = sub.add_parser("trace", help="trace one image and question", description="Run one causal trace and write "
                         "its heatmap (PNG) and result (JSON).")
    one.add_argument("--model", default="demo", help="'demo', a local folder, or a hub id such as "
                     "Salesforce/blip-vqa-base (default: %(default)s)")
    one.add_argument("--image", required=True, help="path of the image file")
    one.add_argument("--question", required=True, help="the question about the image")
    one.add_argument("--block", choices=anatomy.BLOCKS, default="question_encoder",
                     help="which text transformer to restore states in (default: %(default)s)")
    one.add_argument("--kind", choices=anatomy.KINDS, default="hidden",
                     help="which state to restore: layer output or a sublayer's own output (default: %(default)s)")
    one.add_argument("--window", type=int, default=1, help="consecutive layers restored together (default: %(default)s)")
    one.add_argument("--noise", choices=list(BY_NAME), default="gaussian",
                     help="corruption of the image embeddings (default: %(default)s)")
    one.add_argument("--scale", type=float, default=None,
                     help="noise level: multiple of the embeddings' std for gaussian/uniform (default 3), "
                          "std of the factor for multiplicative (default 5)")
    one.add_argument("--samples", type=int, default=10, help="noise samples averaged per cell (default: %(default)s)")
    one.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    one.add_argument("--answer", default=None, help="answer to score (default: the model's own first answer token)")
    one.add_argument("--sever", choices=anatomy.SEVERABLE, default=None,
                     help="hold this sublayer at its corrupted values while restoring hidden states")
    one.add_argument("--corrupt", choices=["image", "patches", "pixels", "question"], default=None,
                     help="where the noise goes: image embeddings (the paper's; default for text blocks), patch "
                          "embeddings (default for --block vision_encoder), pixels, or the question's tokens")
    one.add_argument("--regions", type=int, default=None,
                     help="vision_encoder: regions per side restored as units (default: every patch)")
    one.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None, help="model dtype")
    one.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    one.add_argument("--out", required=True, help="folder for the PNG and JSON files")
    one.set_defaults(run=run_trace)

    from .subsets import SUBSETS

    many = sub.add_parser(
        "sweep", help="trace every question of a dataset and average (resumable; shards under accelerate launch)",
        description="Trace each question of a subset with each kind, write sweep.parquet (resumable: run the same "
                    "command again to continue), average_effect.csv and the averaged figures. Under `accelerate "
                    "launch --multi_gpu --num_processes N -m blip_trace_widgets sweep ...` each process takes a disjoint shard.")
    many.add_argument("--dataset", required=True, choices=SUBSETS, help="the question set")
    many.add_argument("--limit", type=int, default=None, help="at most this many questions")
    many.add_argument("--words", type=int, default=None,
                      help="keep questions of exactly this many words (the paper used 7)")
    many.add_argument("--model", default="demo", help="'demo', a local folder or a hub id (default: %(default)s)")
    many.add_argument("--out", required=True, help="folder for the table and figures")
    many.add_argument("--block", choices=anatomy.BLOCKS, default="question_encoder")
    many.add_argument("--kinds", default=None,
                      help=f"comma-separated kinds to trace (default: {','.join(anatomy.KINDS)}; "
                           f"{','.join(anatomy.VISION_KINDS)} for the vision encoder)")
    many.add_argument("--regions", type=int, default=None,
                      help="vision_encoder: regions per side restored as units (default: every patch)")
    many.add_argument("--window", type=int, default=3, help="window for the sublayer kinds (default: %(default)s)")
    many.add_argument("--noise", choices=list(BY_NAME), default="gaussian")
    many.add_argument("--scale", type=float, default=None,
                      help="noise level (default: the model's own for gaussian noise on image embeddings, else 3 for "
                           "gaussian/uniform, 5 for multiplicative)")
    many.add_argument("--samples", type=int, default=10, help="noise samples per trace (default: %(default)s)")
    many.add_argument("--seed", type=int, default=0)
    many.add_argument("--answer", choices=["model", "expected"], default="model",
                      help="score the model's own answer or the dataset's (default: %(default)s)")
    many.add_argument("--correct-only", action="store_true", help="average only correctly answered questions")
    many.add_argument("--overwrite", action="store_true", help="discard an earlier, different sweep in --out")
    many.add_argument("--cache-dir", default=None, help="where downloaded CSVs and images are kept")
    many.add_argument("--csv", default=None, help="a local copy of the paper's CSV for --dataset")
    many.add_argument("--image-dir", default=None, help="a local folder of the dataset's images")
    many.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    many.add_argument("--device", default=None, help="torch device (default: the launcher's, else cuda if present)")
    many.set_defaults(run=run_sweep)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, ValueError, RuntimeError, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"blip-trace: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
