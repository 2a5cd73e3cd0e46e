"""A script that builds an explorer and ends at once exits cleanly: the explorers' background traces are cancelled
and waited for at interpreter exit (a thread left inside torch as the interpreter exits aborted the process with
"terminate called without an active exception", exit status 134, in about one run in three)."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.slow  # 24 fresh interpreters, two at a time
#: Runs per explorer. The old code failed about one run in three, so 8 runs miss it with probability (2/3)**8, under
#: 4% per explorer and under 0.01% for all three; BLIP_TRACE_EXIT_RUNS=20 repeats the 60-run check.
RUNS = int(os.environ.get("BLIP_TRACE_EXIT_RUNS", "8"))
SCRIPT = """\
from blip_trace_widgets import load_model
from blip_trace_widgets.widgets import {name}
{name}(load_model("demo"))
"""


@pytest.mark.parametrize("name", ["TraceExplorer", "VisionTraceExplorer", "KnockoutExplorer"])
def test_a_script_that_builds_an_explorer_exits_cleanly_every_time(name):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(_: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", SCRIPT.format(name=name)], capture_output=True, text=True,
                              timeout=300, env=env)

    with ThreadPoolExecutor(2) as pool:  # two at a time: the machine's cores
        runs = list(pool.map(run, range(RUNS)))
    failed = [r for r in runs if r.returncode != 0]
    assert not failed, (f"{len(failed)} of {RUNS} runs failed, exit status {sorted({r.returncode for r in failed})}:\n"
                        + failed[0].stderr[-2000:])
