"""A Binder rehearsal: what repo2docker does with binder/, then notebook 1 under Binder's 2 GB on one thread.

It builds a fresh virtual environment (about a minute and a half here), so it is marked slow; CI runs it. It is its
own file so that the test runner can put it on another worker than the wheel's and Colab's jobs.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_packaging import GIB, ROOT, RUN_NOTEBOOK, _pip

pytestmark = [pytest.mark.slow, pytest.mark.packaging]

def _memory_cgroup(limit: int) -> Path | None:
    """A cgroup (v1) with a memory limit, where this machine allows one; None elsewhere."""
    root = Path("/sys/fs/cgroup/memory")
    group = root / f"blip-trace-binder-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
        return group
    except OSError:
        return None


def test_binder_rehearsal_runs_notebook_1_within_2_gb_on_one_thread(tmp_path):
    """What repo2docker does with binder/: requirements.txt (constraints pinned), then postBuild in the
    repository; then notebook 1 on the demo model with one CPU thread under Binder's 2 GB."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "__pycache__", "build",
                                                               "dist", ".mypy_cache", ".ruff_cache", ".pytest_cache"))
    python = tmp_path / "venv" / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", str(python.parents[1])], check=True, timeout=300)
    _pip(python, "install", "--upgrade", "pip")
    requirements = [line for line in (repo / "binder" / "requirements.txt").read_text().splitlines()
                    if not line.startswith("--extra-index-url")]  # PyTorch's own index is not reachable here
    (repo / "binder" / "requirements-here.txt").write_text("\n".join(requirements) + "\n")
    _pip(python, "install", "-r", str(repo / "binder" / "requirements-here.txt"))
    env = {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ['PATH']}", "PIP_RETRIES": "0"}
    post = subprocess.run(["bash", "binder/postBuild"], cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
    assert post.returncode == 0, post.stdout[-2000:] + post.stderr[-3000:]
    _pip(python, "install", "nbclient")
    group = _memory_cgroup(2 * 10**9)
    command = [str(python), "-c", RUN_NOTEBOOK, str(repo / "notebooks" / "01_quickstart.ipynb"), str(tmp_path)]
    if group is not None:  # the kernel is a child: it inherits the cgroup and its limit
        command = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *command]
    try:
        run = subprocess.run(command, cwd=repo, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                             timeout=900)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        if group is not None:
            peak = int((group / "memory.max_usage_in_bytes").read_text())
            print(json.dumps({"binder_rehearsal_peak_gib": round(peak / GIB, 2)}))
            assert peak <= 2 * 10**9
    finally:
        if group is not None:
            group.rmdir()
