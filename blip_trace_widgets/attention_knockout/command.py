"""The ``blip-trace knockout`` subcommand: attention knockout on one image (a line plot and the result) or over a
question set (every row, the averages with 95% intervals, and their plot).

    blip-trace knockout --image cat.png --question "what color is the cat?" --edges image --edges cls --out out/

    >>> from blip_trace_widgets.attention_knockout.command import KNOCKOUT_FIELDS
    >>> KNOCKOUT_FIELDS
    ('window', 'answer', 'word', 'method', 'empty')
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from ..causal_trace.command import check_dataset_head, load_bundle, what_the_model_says
from ..causal_trace.config import parse_position
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
from ..core.names import ANSWER_DECODER
from ..core.roles import ROLES
from ..models import heads

KNOCKOUT_FIELDS = ("window", "answer", "word", "method", "empty")


def _knockout_edges(args: argparse.Namespace, image: Any, decoder: str | None) -> tuple[Any, ...]:
    from ..core.names import EACH_TOKEN
    from .edges import parse_edges

    queries = parse_position(args.queries) if args.queries not in (None, EACH_TOKEN) else args.queries
    return tuple(parse_edges(name, image, queries, decoder or ANSWER_DECODER) for name in (args.edges or ["image", "cls"]))


def run_knockout(args: argparse.Namespace) -> int:
    from ..models.attention import DEFAULT_EMPTY
    from .knockout import Knockout, KnockoutConfig

    check_out(args.out)
    if (args.image is None) == (args.dataset is None):
        raise UsageError("give --image (one knockout) or --dataset (a sweep), not both or neither")
    if args.image is not None and not Path(args.image).is_file():
        raise UsageError(f"--image {args.image!r}: no such file" + (" (it is a folder)" if Path(args.image).is_dir()
                                                                    else ""))
    bundle = load_bundle(args.model, args.device, args.dtype)
    out = Path(args.out)
    if args.dataset is not None:
        return _knockout_sweep(args, bundle, out)
    task = heads.of(bundle)
    if args.question is None and task.needs_text:
        raise UsageError(f"{task.text_option} is required for {task.a_model}")
    knock = Knockout.of(bundle, args.image, args.question or "")
    print(what_the_model_says(knock.tracer))
    config = KnockoutConfig(**config_fields(args, KnockoutConfig, edges=_knockout_edges(
        args, knock.tracer.image, knock.tracer.task.decoder)))
    result = knock.run(config)
    out.mkdir(parents=True, exist_ok=True)
    asked = json.dumps([[e.to_dict() for e in config.edges], config.window, config.method, config.answer,
                        config.word, *([config.empty] if config.empty != DEFAULT_EMPTY else [])], sort_keys=True)
    stem = (f"knockout-{slug(knock.tracer.question or 'caption')}-{knock.tracer.image_key[:8]}-"
            f"{hashlib.sha1(asked.encode()).hexdigest()[:8]}")
    json_path = result.save(out / f"{stem}.json")
    from ..causal_trace.plots import figure_png

    png = out / f"{stem}.png"
    png.write_bytes(figure_png((result.plot_tokens() if args.queries == "each" else result.plot()).figure))
    print(f"scored {result.answer}  clean p {result.clean_score:.4f}  window {result.window}  ({result.method}; "
          f"{result.empty_label})")
    for (label, layer, change), tiny in zip(result.strongest(), result.tiny()):
        print(f"  {label}: strongest at layer {layer}, {change:+.1%}" + ("  (no effect)" if tiny else ""))
    print(f"wrote {png} and {json_path}")
    return 0


def _knockout_sweep(args: argparse.Namespace, bundle: Any, out: Path) -> int:
    from ..causal_trace.plots import figure_png
    from ..core.options import field_default
    from ..datasets.subsets import load_vqa_subset
    from .knockout import KnockoutConfig
    from .sweep import knockout_average, knockout_sweep, plot_knockout_average

    check_dataset_head(args.dataset, bundle.head)
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
    with progress_bar(len(samples)) as bar:
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


def add_knockout_parser(sub: Any) -> None:
    from ..datasets.subsets import SUBSETS
    from .edges import SHORTHANDS
    from .knockout import KnockoutConfig

    ko = sub.add_parser(
        "knockout", help="cut attention edges around each layer and see what the answer loses (attention knockout)",
        description="Attention knockout on the clean input: for each edge group and layer, cut the group's edges in "
                    "a window of layers around it and score p(answer). One image (--image) writes a line plot (PNG) "
                    "and the result (JSON); a dataset (--dataset) writes every row, the averages with 95% intervals "
                    "and their plot.")
    add_model_option(ko)
    ko.add_argument("--image", default=None, help="path of the image file")
    ko.add_argument("--question", "--prompt", "--text", dest="question", default=None,
                    help="the question (VQA), prompt (captioning) or text (image-text matching)")
    ko.add_argument("--edges", action="append", default=None,
                    help="an edge group to cut (repeat for several; default: image and cls): "
                         + "; ".join(f"{k}: {v}" for k, v in SHORTHANDS.items()))
    ko.add_argument("--queries", default=None,
                    help="which tokens' attention is cut: a position, comma-separated positions, a role "
                         f"({', '.join(ROLES)}), or 'each' for a tokens x layers map (default: every token)")
    add_config_options(ko, KNOCKOUT_FIELDS, KnockoutConfig)
    ko.add_argument("--dataset", choices=SUBSETS, default=None, help="sweep a question set instead of one image")
    ko.add_argument("--limit", type=int, default=None, help="with --dataset: at most this many questions")
    ko.add_argument("--correct-only", action="store_true", help="with --dataset: average correct answers only")
    ko.add_argument("--cache-dir", default=None, help="where downloaded CSVs and images are kept")
    add_device_options(ko)
    add_out_option(ko, "the figures and results")
    ko.set_defaults(run=run_knockout)
