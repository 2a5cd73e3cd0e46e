"""How many torch threads suit a shared CPU: one demo-model heatmap at 1 thread against torch's default.

    python benchmarks/bench_threads.py            # on the machine as it is
    python benchmarks/bench_threads.py --load 2   # with 2 busy processes beside it (a shared machine)

Prints the median of 5 runs per thread count, the load average, and what
``blip_trace_widgets.core.threads.choose_threads()`` picks.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time


def _burn(stop: float) -> None:
    while time.time() < stop:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", type=int, default=0, help="busy processes to run beside the benchmark")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch

    from blip_trace_widgets import Tracer, default_config, demo_samples, load_model
    from blip_trace_widgets.core.threads import choose_threads

    default_threads = torch.get_num_threads()
    burners = [multiprocessing.Process(target=_burn, args=(time.time() + 600,)) for _ in range(args.load)]
    for burner in burners:
        burner.start()
    try:
        time.sleep(2 if burners else 0)
        bundle = load_model("demo")
        image, question, _ = demo_samples()[0]
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            times = []
            for seed in range(args.repeats):
                tracer = Tracer(bundle, image, question)
                started = time.perf_counter()
                tracer.trace(default_config(bundle, samples=10, seed=seed))
                times.append(time.perf_counter() - started)
            print(f"{threads} thread(s): median {statistics.median(times):.3f} s, worst {max(times):.3f} s "
                  f"(a full question-encoder heatmap from a new image and question, 10 samples)")
        print(f"cores {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}, busy processes beside: {args.load}, "
              f"choose_threads() -> {choose_threads()}")
    finally:
        for burner in burners:
            burner.terminate()


if __name__ == "__main__":
    main()
