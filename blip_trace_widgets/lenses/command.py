"""``blip-trace lens``: the lens of one image and question, written as PNG, JSON and CSV.

    blip-trace lens --image shape.png --question "what is the color of the shape?" --out out/
    blip-trace lens --model demo-blip2 --image shape.png --question "what is the color of the shape?" \\
        --block language_model --kind tuned --out out/

Writes ``lens-<kind>-<block>.png`` (positions x layers coloured by p(answer), each cell its top token),
``...-rank.png`` (the answer's rank by layer), ``...-queries.png`` for BLIP-2's image queries, the result as
``.json`` (:meth:`~.result.LensResult.from_json` reads it back) and its table as ``.csv`` (one row per position x
layer).

    >>> import argparse
    >>> from blip_trace_widgets.lenses.command import add_parser
    >>> sub = argparse.ArgumentParser().add_subparsers()
    >>> add_parser(sub).parse_args(["--image", "x.png", "--out", "o"]).kind
    'logit'
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..core.command_line import add_device_options, add_model_option, add_out_option
from ..core.errors import BlipTraceError
from .names import DEFAULT_TOP, LENS_KINDS, LOGIT


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``lens`` subcommand, with the package's usual options (--model, --image, --question, --answer, --out)."""
    parser = subparsers.add_parser(
        "lens", help="what each state of a block already says: the logit lens or the tuned lens",
        description="The lens of one image and question: every position x layer of a block that ends in a vocabulary "
                    "(the answer or caption decoder, BLIP-2's language model) read through the model's own head "
                    "(logit) or a trained translator first (tuned), from one forward pass. Writes PNG, JSON and CSV.")
    add_model_option(parser)
    parser.add_argument("--image", default=None, help="path of the image file (or --dataset)")
    parser.add_argument("--dataset", default=None, choices=_subsets(), help="a question set: p(answer), its rank and "
                        "the KL per layer over its questions, averaged with 95%% intervals, instead of one image")
    parser.add_argument("--limit", type=int, default=None, help="with --dataset: at most this many questions")
    parser.add_argument("--cache-dir", default=None, help="with --dataset: where downloaded CSVs and images are kept")
    parser.add_argument("--question", "--prompt", "--text", dest="question", default="",
                        help="the question (VQA, BLIP-2) or the prompt (captioning)")
    parser.add_argument("--block", default=None, help="the block to lens (default: the model's own that ends in a "
                        "vocabulary: answer_decoder, caption_decoder, language_model or lm_decoder)")
    parser.add_argument("--kind", choices=LENS_KINDS, default=LOGIT, help="logit or tuned lens (default: %(default)s)")
    parser.add_argument("--tuned", default=None, help="a tuned lens saved by TunedLens.save (default: the translators "
                        "shipped with a demo model)")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP, help="top tokens kept per cell (default: %(default)s)")
    parser.add_argument("--answer", default=None, help="the answer to follow (default: the model's own next token)")
    add_device_options(parser)
    add_out_option(parser, "the PNG, JSON and CSV files")
    parser.set_defaults(run=run)
    return parser


def _subsets() -> list[str]:
    from ..datasets.subsets import SUBSETS

    return list(SUBSETS)


def _check_paths(args: argparse.Namespace) -> Path:
    if (args.image is None) == (args.dataset is None):
        raise BlipTraceError("give --image (one lens) or --dataset (a sweep), not both or neither")
    if args.image is not None and not Path(args.image).is_file():
        raise BlipTraceError(f"--image {args.image!r}: no such file" + (" (it is a folder: name an image file in it)"
                                                                       if Path(args.image).is_dir() else ""))
    if args.tuned is not None and not Path(args.tuned).is_file():
        raise BlipTraceError(f"--tuned {args.tuned!r}: no such file (write one with train_tuned_lens(...).save(path))")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise BlipTraceError(f"--out {args.out!r} is a file: name a folder to write the results into")
    return out


def run(args: argparse.Namespace) -> int:
    """Run ``blip-trace lens``: print what the lens says at the last position and write the files."""
    from PIL import Image

    from ..models.loading import load_model
    from .core import lens
    from .plots import lens_png
    from .tuned import TunedLens

    out = _check_paths(args)
    bundle = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.dataset is not None:
        return _sweep(args, bundle, out)
    tuned = TunedLens.load(args.tuned) if args.tuned is not None else None
    result = lens(bundle, Image.open(args.image), args.question, block=args.block, kind=args.kind, top=args.top,
                  answer=args.answer, tuned=tuned)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"lens-{result.kind}-{result.block}"
    written = {Path(f"{stem}.json"): result.to_json().encode(), Path(f"{stem}.png"): lens_png(result, "grid"),
               Path(f"{stem}-rank.png"): lens_png(result, "rank")}
    if result.queries:
        written[Path(f"{stem}-queries.png")] = lens_png(result, "queries")
    for path, data in written.items():
        path.write_bytes(data)
    result.to_dataframe().to_csv(f"{stem}.csv", index=False)
    print(result)
    for path in [*written, Path(f"{stem}.csv")]:
        print(f"wrote {path}")
    return 0


def _sweep(args: argparse.Namespace, bundle: Any, out: Path) -> int:
    """``--dataset``: the lens of each question at its last position, and the averages per layer."""
    from ..datasets.subsets import load_vqa_subset
    from .sweep import lens_average, lens_sweep

    if args.tuned is not None or args.answer is not None:
        raise BlipTraceError("--tuned and --answer lens one image: drop them with --dataset (the shipped translators "
                             "and each question's own answer are used)")
    items = load_vqa_subset(args.dataset, cache_dir=args.cache_dir, limit=args.limit)
    table = lens_sweep(bundle, items, block=args.block, kind=args.kind, limit=args.limit)
    average = lens_average(table)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"lens-{args.kind}-{table['block'].iloc[0]}-{args.dataset}"
    table.to_csv(f"{stem}.csv", index=False)
    average.to_csv(f"{stem}-average.csv", index=False)
    print(average[["layer", "questions", "p_answer", "p_answer_low", "p_answer_high", "rank_median", "top_share"]]
          .round(3).to_string(index=False))
    print(f"wrote {stem}.csv and {stem}-average.csv")
    return 0
