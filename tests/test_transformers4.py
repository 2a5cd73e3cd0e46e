"""The core, engine, widget and loading tests again under transformers 4.40 (the oldest the package claims).

transformers 4.x returns tuples where 5.x returns tensors, does not tie the answer decoder's
output matrix, and reads the image processor from ``preprocessor_config.json`` only. The
4.40.2 stack is installed beside the venv by ``scripts/setup.sh``, so this test needs no
network. The dataset loaders are left out: the installed ``datasets`` needs a newer
huggingface_hub than transformers 4.40 accepts.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
OLDEST = "4.40.2"
#: The suites whose results depend on transformers: its modules' arithmetic (engine, heads, captioning, vision), its
#: loading and image processing (images, limits), and the widgets over them. The CLI, figure, estimate and demo-accuracy
#: suites run on the engine's own arithmetic, which these check, and are left to the main run; so are the slow tests
#: of the suites below (the many-cell loops, and the other cases of each family): their fast tests, one per-cell-loop
#: check of each family, cover the same transformers code here (142 tests instead of 408, so that .ci/run stays near
#: 20 minutes on two cores).
SUITES = ["test_core.py", "test_engine_equivalence.py", "test_faithful.py", "test_vision_tracing.py",
          "test_widgets.py", "test_limits.py", "test_loading.py", "test_demo_model.py", "test_heads.py",
          "test_captioning.py", "test_image_modes.py", "test_attention_heads.py", "test_directions.py",
          "test_knockout.py", "test_blip2_family.py"]


def test_core_and_widget_suites_pass_under_the_oldest_transformers():
    target = Path(sys.prefix) / "transformers4"
    assert (target / "transformers").is_dir(), f"{target} is missing: run `bash scripts/setup.sh` to install it"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    check = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                           capture_output=True, text=True, env=env)
    assert check.stdout.strip() == OLDEST, check.stderr[-2000:]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-m", "not browser and not packaging and not slow",
         *[str(HERE / name) for name in SUITES]],
        capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=1500,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], run.stdout[-500:]
