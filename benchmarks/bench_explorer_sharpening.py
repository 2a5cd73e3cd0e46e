"""Benchmark: the explorer's map that sharpens, as a user sees it: time from making the explorer (clean pass
included) to its first map and to the map that has stopped, then the same after a change of kind, on the demo
model; and, for comparison, the map of a fixed number of samples, each explorer's default before maps sharpened
(10, and 5 for the vision explorer).

    OMP_NUM_THREADS=1 python benchmarks/bench_explorer_sharpening.py            # TraceExplorer, 5 repeats
    OMP_NUM_THREADS=1 python benchmarks/bench_explorer_sharpening.py --vision   # VisionTraceExplorer (8 regions)
    OMP_NUM_THREADS=1 python benchmarks/bench_explorer_sharpening.py --base --repeats 3  # BLIP-base-sized

With ``--base`` the model is BLIP-base-sized (random weights, as ``bench_trace.py`` builds it; a 384 x 384 image),
where the explorer opens on the estimate with its top cells exact (the cost module puts the exact map over its
5 s threshold): "first" is then the estimate's map on screen, "stopped" the map once its top cells are exact.

Each repeat makes a new explorer (background=True, as in a notebook) on the first demo question, and reads the
times off its ``result`` traitlet. It prints medians, the rounds and samples drawn, and the machine's load.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

from blip_trace_widgets import __version__, demo_samples, load_model
from blip_trace_widgets.widgets import TraceExplorer, VisionTraceExplorer


def timed(make, change=None) -> dict[str, float]:
    """Seconds from ``make()`` (or ``change(explorer)``) to the first map drawn (the heatmap's PNG, or the vision
    explorer's overlay) and to the drawing of the map that has stopped."""
    marks: dict[str, float] = {}
    done = threading.Event()
    latest: list = []

    def drawn(_change: dict) -> None:
        if not latest:
            return
        marks.setdefault("first", time.perf_counter() - start)
        auto = latest[-1].config.get("auto")
        if latest[-1].config.get("method") == "estimate" and shown[0].method.value != "estimate":
            return  # the estimate a verified map starts from: its first map, not its last
        if auto is None or auto["stopped"]:
            marks.update(stopped=time.perf_counter() - start, samples=latest[-1].config["samples"],
                         rounds=auto["rounds"] if auto else 1)
            done.set()

    shown: list = []

    def watch(explorer) -> None:
        shown.append(explorer)
        explorer.observe(lambda change: latest.append(change["new"]), names="result")
        view = getattr(explorer, "heatmap", None) or explorer.overlay
        view.observe(drawn, names="value")

    start = time.perf_counter()
    if change is None:
        from blip_trace_widgets.widgets import live

        original = live.LiveView.refresh

        def refresh(self) -> None:  # watch the new explorer before its first trace starts
            live.LiveView.refresh = original
            watch(self)
            original(self)

        live.LiveView.refresh = refresh  # type: ignore[method-assign]
        explorer = make()
    else:
        explorer = make()
        explorer.wait()
        watch(explorer)
        start = time.perf_counter()
        change(explorer)
    done.wait(600)
    explorer.wait()
    marks["estimate first"] = float(explorer.method.value != "exact")
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vision", action="store_true", help="VisionTraceExplorer instead of TraceExplorer")
    parser.add_argument("--base", action="store_true", help="a BLIP-base-sized model (random weights)")
    args = parser.parse_args()
    if args.base:
        import sys
        from pathlib import Path

        import numpy as np
        from PIL import Image

        sys.path.insert(0, str(Path(__file__).parent))
        from bench_trace import QUESTION, build_bundle

        bundle = build_bundle()
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=np.uint8))
        question = QUESTION
    else:
        bundle = load_model("demo")
        image, question, _ = demo_samples()[0]
    explorer = VisionTraceExplorer if args.vision else TraceExplorer

    def kind(view) -> None:
        view.kind.value = "mlp"

    fixed = 5 if args.vision else 10  # each explorer's default before maps sharpened
    cases = {"auto": lambda: explorer(bundle, image, question),
             f"fixed {fixed}": lambda: explorer(bundle, image, question, noise_samples=fixed)}
    explorer(bundle, image, question, background=False, noise_samples=2)  # warm-up: imports, matplotlib
    if args.base:  # a change of kind only: each repeat takes minutes at this size
        cases.pop(f"fixed {fixed}")
    rows = {name: [timed(make) for _ in range(args.repeats)] for name, make in cases.items()}
    rows["auto, kind -> mlp"] = [timed(cases["auto"], kind) for _ in range(args.repeats)]
    if not args.base:
        rows[f"fixed {fixed}, kind -> mlp"] = [timed(cases[f"fixed {fixed}"], kind) for _ in range(args.repeats)]
    load = os.getloadavg()
    report = {"release": __version__, "explorer": explorer.__name__,
              "model": "BLIP-base-sized" if args.base else "demo", "threads": os.environ.get("OMP_NUM_THREADS"),
              "cores": os.cpu_count(), "load_1_5_15": [round(x, 2) for x in load], "repeats": args.repeats}
    for name, marks in rows.items():
        report[name] = {key: round(statistics.median(m[key] for m in marks), 3) for key in marks[0]}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
