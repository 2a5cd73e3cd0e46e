"""``blip-trace circuit``: the edge scores and circuit of one image and question, written as PNG, JSON and CSV.

    blip-trace circuit --image shape.png --question "what is the color of the shape?" --method eap-ig --top 50 --out out/
    blip-trace circuit --image a.png --question "what color is the shape?" --counterfactual-image b.png --out out/
    blip-trace circuit --dataset easy-vqa-color --limit 30 --method eap --out out/
    blip-trace circuit --pairs shape --limit 30 --out out/

Writes ``circuit-<method>.png`` (the top edges as a layered graph beside the faithfulness curve),
``circuit-<method>.json`` (the :class:`~.result.EdgeResult`; ``EdgeResult.from_json`` reads it back), its table as
``circuit-<method>.csv`` (one row per edge) and the curve as ``circuit-<method>-faithfulness.json``. With
``--dataset`` (a question set, noised) or ``--pairs`` (easy-VQA image pairs, each corrupted by its partner image) it
scores every question and writes the average over them (:class:`~.sweep.EdgeAverage`):
``circuit-<method>-<set>.png`` (the top edges by mean, the non-significant ones grey and dashed), ``.json``
(``EdgeAverage.from_json`` reads it back), ``.csv`` (one row per edge: mean, interval, p- and q-value) and
``-questions.csv`` (each question's score per edge).

    >>> import argparse
    >>> sub = argparse.ArgumentParser().add_subparsers()
    >>> args = add_parser(sub).parse_args(["--image", "x.png", "--question", "q?", "--out", "o"])
    >>> args.method, args.top, args.steps
    ('eap-ig', 50, 5)
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..core.command_line import add_device_options, add_model_option, add_out_option
from ..core.errors import BlipTraceError
from .names import DEFAULT_SAMPLES, DEFAULT_SEED, DEFAULT_STEPS, DEFAULT_TOP, DIRECTIONS, METHODS, METRICS


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``circuit`` subcommand, with the package's usual options (--model, --image, --question, --out)."""
    parser = subparsers.add_parser(
        "circuit", help="edge scores and a circuit: which states feed which, for one image and question",
        description="Score every edge of a BLIP VQA, BLIP-2 or InstructBLIP model's circuit graph (EAP, EAP-IG or "
                    "exact path patching) under noise on the image embeddings or a counterfactual image or question, "
                    "keep the top edges, and measure how faithful circuits of each size are. Writes PNG, JSON and "
                    "CSV.")
    add_model_option(parser)
    parser.add_argument("--image", default=None, help="path of the image file (or --dataset, or --pairs)")
    parser.add_argument("--question", default=None, help="the question about the image")
    parser.add_argument("--dataset", default=None, choices=_subsets(), help="a question set: every question's edge "
                        "scores and their average with 95%% intervals and q-values, instead of one image")
    parser.add_argument("--pairs", default=None, choices=_pair_kinds(), help="easy-VQA image pairs that differ in "
                        "this attribute, each corrupted with its partner image, instead of one image")
    parser.add_argument("--limit", type=int, default=None, help="with --dataset or --pairs: at most this many "
                        "questions (default: all)")
    parser.add_argument("--cache-dir", default=None, help="with --dataset: where downloaded CSVs and images are kept")
    parser.add_argument("--method", choices=METHODS, default="eap-ig", help="edge scores (default: %(default)s)")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP, help="edges drawn (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="EAP-IG's points (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="noise draws (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="noise seed (default: %(default)s)")
    parser.add_argument("--direction", choices=DIRECTIONS, default="noise", help="noise: corrupted senders in the "
                        "clean run; denoise: clean senders in the corrupted run (default: %(default)s)")
    parser.add_argument("--counterfactual-image", default=None, help="corrupt with this image instead of noise")
    parser.add_argument("--counterfactual-question", default=None, help="corrupt with this question (as many "
                        "tokens) instead of noise")
    parser.add_argument("--answer", default=None, help="the answer to score (default: the model's own)")
    parser.add_argument("--metric", choices=METRICS, default="logprob", help="log p or p of the answer's first token "
                        "(default: %(default)s)")
    add_device_options(parser)
    add_out_option(parser, "the PNG, JSON and CSV files")
    parser.set_defaults(run=run)
    return parser


def _subsets() -> list[str]:
    from ..datasets.subsets import SUBSETS

    return list(SUBSETS)


def _pair_kinds() -> list[str]:
    from ..datasets.easy_vqa import PAIR_KINDS

    return list(PAIR_KINDS)


def _checked(args: argparse.Namespace) -> tuple[Path, Any]:
    from PIL import Image

    if sum(x is not None for x in (args.image, args.dataset, args.pairs)) != 1:
        raise BlipTraceError("give one of --image (one question), --dataset (a question set) or --pairs (image pairs)")
    if args.image is not None and args.question is None:
        raise BlipTraceError("--image needs its --question")
    for option, path in (("--image", args.image), ("--counterfactual-image", args.counterfactual_image)):
        if path is not None and not Path(path).is_file():
            raise BlipTraceError(f"{option} {path!r}: no such file" + (" (it is a folder: name an image file in it)"
                                                                       if Path(path).is_dir() else ""))
    if args.counterfactual_image and args.counterfactual_question:
        raise BlipTraceError("give --counterfactual-image or --counterfactual-question, not both")
    if args.top < 1:
        raise BlipTraceError(f"--top must be 1 or more, got {args.top}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise BlipTraceError(f"--out {args.out!r} is a file: name a folder to write the results into")
    corruption = Image.open(args.counterfactual_image) if args.counterfactual_image else args.counterfactual_question
    return out, corruption


def run(args: argparse.Namespace) -> int:
    """Run ``blip-trace circuit``: print the top edges and faithfulness, and write the files."""
    from PIL import Image

    from ..models.loading import load_model
    from .faithfulness import faithfulness_curve
    from .inputs import circuit_inputs
    from .plots import circuit_png
    from .scores import edge_scores

    out, corruption = _checked(args)
    bundle = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.image is None:
        return _sweep(args, bundle, out)
    image = Image.open(args.image)
    pair = circuit_inputs(bundle, image, args.question, corruption=corruption, samples=args.samples, seed=args.seed,
                          answer=args.answer, metric=args.metric)
    result = edge_scores(bundle, image, args.question, method=args.method, steps=args.steps, direction=args.direction,
                         inputs=pair)
    curve = faithfulness_curve(bundle, image, args.question, result, inputs=pair)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"circuit-{args.method}"
    written = {Path(f"{stem}.png"): circuit_png(result, args.top, curve), Path(f"{stem}.json"): result.to_json().encode(),
               Path(f"{stem}-faithfulness.json"): curve.to_json().encode()}
    for path, data in written.items():
        path.write_bytes(data)
    result.to_dataframe().to_csv(f"{stem}.csv", index=False)
    print(result.title())
    for edge in result.top(min(args.top, 10)):
        print(f"  {edge}: {result.scores[result.edges.index(edge)]:+.4f}")
    print(f"faithfulness area {curve.area:.3f} (CMD {curve.cmd:.3f}) over {len(curve.ks)} circuit sizes")
    for path in [*written, Path(f"{stem}.csv")]:
        print(f"wrote {path}")
    return 0


def _sweep_items(args: argparse.Namespace) -> tuple[str, list[Any]]:
    """--dataset's questions or --pairs' image pairs, and the name the files take."""
    from ..datasets.easy_vqa import check_limit, easy_vqa_pairs
    from ..datasets.subsets import load_vqa_subset

    if args.question is not None or args.counterfactual_image or args.counterfactual_question or args.answer:
        raise BlipTraceError("--question, --counterfactual-image, --counterfactual-question and --answer are for one "
                             "image: drop them with --dataset or --pairs (each question is its own)")
    limit = check_limit(args.limit, "--limit")
    if args.pairs is not None:
        return f"{args.pairs}-pairs", easy_vqa_pairs(args.pairs, limit=limit)
    return args.dataset, load_vqa_subset(args.dataset, cache_dir=args.cache_dir, limit=limit)


def _sweep(args: argparse.Namespace, bundle: Any, out: Path) -> int:
    """``--dataset`` or ``--pairs``: every question's edge scores, their average, the figure and the tables."""
    from ..core.command_line import progress_bar
    from .sweep import edge_average_png, edge_sweep

    name, items = _sweep_items(args)
    with progress_bar(len(items)) as bar:
        def progress(done: int) -> None:
            bar.n = done
            bar.refresh()

        average = edge_sweep(bundle, items, method=args.method, steps=args.steps, samples=args.samples,
                             seed=args.seed, direction=args.direction, metric=args.metric, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"circuit-{args.method}-{name}"
    written = {Path(f"{stem}.png"): edge_average_png(average, args.top), Path(f"{stem}.json"): average.to_json().encode()}
    for path, data in written.items():
        path.write_bytes(data)
    average.to_dataframe().to_csv(f"{stem}.csv", index=False)
    average.question_table().to_csv(f"{stem}-questions.csv", index=False)
    print(average.title())
    for index in average.order()[:min(args.top, 10)]:
        print(f"  {average.edges[index]}: {average.mean[index]:+.4f} [{average.low[index]:+.4f}, "
              f"{average.high[index]:+.4f}] q = {average.qvalues[index]:.2g}")
    for path in [*written, Path(f"{stem}.csv"), Path(f"{stem}-questions.csv")]:
        print(f"wrote {path}")
    return 0
