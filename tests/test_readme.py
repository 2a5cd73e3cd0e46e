"""The README is the front door: each of its Python snippets runs on its own, and it points to the reference."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_is_the_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 200 and "docs/reference.md" in text and "--allow-root" in text
    reference = (ROOT / "docs" / "reference.md").read_text()
    for heading in ("## What is traced", "## Attention heads", "## Estimates", "## Command line", "## Layout"):
        assert heading in reference


@pytest.mark.slow
@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_each_snippet_runs_on_its_own(snippet, tmp_path):
    # a notebook's kernel outlives the explorer's background trace; a script waits for it before it exits
    wait = "\nimport threading\nfor t in threading.enumerate():\n    t is threading.main_thread() or t.join()\n"
    run = subprocess.run([sys.executable, "-c", snippet + wait], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={"MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                              "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-3000:]


def test_ci_runs_the_readmes_two_set_up_commands():
    """.ci/run installs everything with the README's set-up and then runs the README's test command."""
    readme = (ROOT / "README.md").read_text()
    commands = [line.strip() for line in re.findall(r"```bash\n(.*?)```", readme, re.S)[:2]]
    assert commands[0].startswith("bash scripts/setup.sh && .venv/bin/blip-trace demo")
    assert commands[1].startswith("bash scripts/setup.sh --browser && .venv/bin/python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()
