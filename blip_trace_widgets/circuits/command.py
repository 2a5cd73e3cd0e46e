"""``blip-trace circuit``: the edge scores and circuit of one image and question, written as PNG, JSON and CSV.

    blip-trace circuit --image shape.png --question "what is the color of the shape?" --method eap-ig --top 50 --out out/
    blip-trace circuit --image a.png --question "what color is the shape?" --counterfactual-image b.png --out out/

Writes ``circuit-<method>.png`` (the top edges as a layered graph beside the faithfulness curve),
``circuit-<method>.json`` (the :class:`~.result.EdgeResult`; ``EdgeResult.from_json`` reads it back), its table as
``circuit-<method>.csv`` (one row per edge) and the curve as ``circuit-<method>-faithfulness.json``.

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

from ..core.errors import BlipTraceError
from ..core.names import DEMO_MODELS, DTYPES
from .names import DEFAULT_SAMPLES, DEFAULT_SEED, DEFAULT_STEPS, DEFAULT_TOP, DIRECTIONS, METHODS, METRICS


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``circuit`` subcommand, with the package's usual options (--model, --image, --question, --out)."""
    parser = subparsers.add_parser(
        "circuit", help="edge scores and a circuit: which states feed which, for one image and question",
        description="Score every edge of a BLIP VQA model's circuit graph (EAP, EAP-IG or exact path patching) under "
                    "noise on the image embeddings or a counterfactual image or question, keep the top edges, and "
                    "measure how faithful circuits of each size are. Writes PNG, JSON and CSV.")
    parser.add_argument("--model", default="demo", help=f"{', '.join(DEMO_MODELS)}, a local folder or a hub id "
                        "(default: %(default)s)")
    parser.add_argument("--image", required=True, help="path of the image file")
    parser.add_argument("--question", required=True, help="the question about the image")
    parser.add_argument("--method", choices=METHODS, default="eap-ig", help="edge scores (default: %(default)s)")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP, help="edges drawn (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="EAP-IG's points (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="noise draws (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="noise seed (default: %(default)s)")
    parser.add_argument("--direction", choices=DIRECTIONS, default="noise", help="noise: corrupted senders in the "
                        "clean run; restore: clean senders in the corrupted run (default: %(default)s)")
    parser.add_argument("--counterfactual-image", default=None, help="corrupt with this image instead of noise")
    parser.add_argument("--counterfactual-question", default=None, help="corrupt with this question (as many "
                        "tokens) instead of noise")
    parser.add_argument("--answer", default=None, help="the answer to score (default: the model's own)")
    parser.add_argument("--metric", choices=METRICS, default="logprob", help="log p or p of the answer's first token "
                        "(default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="model dtype (default: float32)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    parser.add_argument("--out", required=True, help="folder for the PNG, JSON and CSV files")
    parser.set_defaults(run=run)
    return parser


def _checked(args: argparse.Namespace) -> tuple[Path, Any]:
    from PIL import Image

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
