"""The widget tests again under ipywidgets 7.7 (which Colab has shipped), in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


def test_widget_suite_passes_under_ipywidgets_7():
    target = Path(sys.prefix) / "ipywidgets7"  # installed by scripts/setup.sh, so this test needs no network
    assert (target / "ipywidgets").is_dir(), f"{target} is missing: run `bash scripts/setup.sh` to install ipywidgets 7.7.5"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    check = subprocess.run([sys.executable, "-c", "import ipywidgets; print(ipywidgets.__version__)"],
                           capture_output=True, text=True, env=env)
    assert check.stdout.strip() == "7.7.5"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "test_widgets.py"),
         str(HERE / "test_vision_demo.py"), "-k", "explorer or test_widgets"],
        capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=1200,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
