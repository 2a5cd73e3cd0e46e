"""ruff on the package, its tests, scripts and benchmarks, and mypy on the package, so that the README's test command
(and so CI) runs them."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is missing: run `bash scripts/setup.sh` (it installs the test extras)"
    return found


def test_ruff_is_clean():
    run = subprocess.run([_tool("ruff"), "check", "blip_trace_widgets", "tests", "scripts", "benchmarks"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:]


@pytest.mark.slow
def test_mypy_is_clean():
    run = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:]
