"""What a stranger installs: the wheel and sdist, the wheel alone in a fresh environment, and Colab's packages
(the Binder rehearsal is in test_binder.py, so that the two long jobs can run on different workers).

These build fresh virtual environments (about a minute each here: torch comes from the package index's
CPU wheel), so they are marked slow; CI runs them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.packaging]
GIB = 2**30
RUN_NOTEBOOK = r"""
import sys, nbformat
from nbclient import NotebookClient
notebook = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": sys.argv[2]}}).execute()
errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
print("errors:", len(errors))
sys.exit(1 if errors else 0)
"""


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """A folder holding the wheel and the sdist: built here from the source tree, or, with BLIP_TRACE_DIST set
    (the release workflow sets it to the files it is about to publish), that folder's files as they are."""
    given = os.environ.get("BLIP_TRACE_DIST")
    if given:
        folder = Path(given).resolve()
        assert sorted(f.suffix for f in folder.iterdir()) == [".gz", ".whl"], \
            f"BLIP_TRACE_DIST={given} must hold one wheel and one sdist, and nothing else"
        return folder
    out = tmp_path_factory.mktemp("dist")
    run = subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


def _venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    python = path / "bin" / "python"
    _pip(python, "install", "--upgrade", "pip")
    # the CPU build, as the set-up installs it: PyTorch's CPU index first (a bare torch can pull a multi-GB CUDA one)
    torch = subprocess.run(["bash", str(ROOT / "scripts" / "install_torch.sh"), str(python)], capture_output=True,
                           text=True, timeout=1200)
    assert torch.returncode == 0, torch.stdout[-2000:] + torch.stderr[-3000:]
    return python


def _pip(python: Path, *args: str) -> None:
    run = subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "-q", *args],
                         capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "PIP_RETRIES": "0", "PIP_TIMEOUT": "10"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]


def test_wheel_and_sdist_pass_twine_and_the_wheel_holds_only_the_package(dist):
    files = sorted(dist.iterdir())
    assert {f.suffix for f in files} == {".whl", ".gz"}
    check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, files)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    wheel = next(f for f in files if f.suffix == ".whl")
    names = zipfile.ZipFile(wheel).namelist()
    outside = [n for n in names if not n.startswith(("blip_trace_widgets/", "blip_trace_widgets-"))]
    assert not outside, outside
    for folder in ("demo_model", "demo_caption", "demo_itm", "demo_blip2", "demo_instructblip"):  # each with its card
        processor = "processor_config.json" if folder.startswith("demo_blip2") or folder == "demo_instructblip" \
            else "preprocessor_config.json"
        for name in ("model.safetensors", "README.md", "config.json", "tokenizer.json", processor):
            assert f"blip_trace_widgets/{folder}/{name}" in names, (folder, name)
    assert "blip_trace_widgets/demo_instructblip/qformer_tokenizer/tokenizer.json" in names  # its Q-Former's own
    assert not [n for n in names if "/tests/" in n or n.endswith(".ipynb")]
    info = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = zipfile.ZipFile(wheel).read(info).decode()
    for field in ("License-Expression: MIT", "License-File: LICENSE", "Project-URL: Homepage,", "Requires-Python: >=3.11",
                  "Classifier: Programming Language :: Python :: 3.11"):
        assert field in metadata, field
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


@pytest.fixture(scope="module")
def wheel_venv(dist, tmp_path_factory):
    """A fresh environment holding only the built wheel (and torch, nbclient, ipykernel)."""
    python = _venv(tmp_path_factory.mktemp("wheel") / "venv")
    _pip(python, "install", str(next(dist.glob("*.whl"))), "nbclient", "ipykernel")
    return python


def test_the_wheel_alone_runs_the_demo_and_notebook_1(wheel_venv, tmp_path):
    python = wheel_venv
    work = tmp_path / "elsewhere"  # no source tree here: the installed wheel is all there is
    work.mkdir()
    demo = subprocess.run([str(python.parent / "blip-trace"), "demo", "--out", "out", "--samples", "3"], cwd=work,
                          capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert len(list((work / "out").glob("*.json"))) >= 6
    notebook = work / "01_quickstart.ipynb"
    shutil.copy(ROOT / "notebooks" / "01_quickstart.ipynb", notebook)
    run = subprocess.run([str(python), "-c", RUN_NOTEBOOK, str(notebook), str(work)], cwd=work,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]


def test_colab_first_cell_installs_the_wheel_then_notebook_1_runs(wheel_venv, dist, tmp_path):
    """Colab: google.colab is imported when the kernel starts, torch and the dependencies are there, and
    the first cell's ``%pip install blip-trace-widgets`` gets the built wheel in place of the index."""
    python = wheel_venv
    _pip(python, "uninstall", "-y", "blip-trace-widgets")  # its dependencies stay, as on Colab
    gone = subprocess.run([str(python), "-c", "import blip_trace_widgets"], capture_output=True, text=True, cwd=tmp_path)
    assert gone.returncode != 0
    startup = tmp_path / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-colab.py").write_text("import google.colab\n")
    stand_in = tmp_path / "colab_site" / "google" / "colab"  # a namespace package `google`, as protobuf's is
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text('"""A stand-in for Colab\'s google.colab package."""\n')
    work = tmp_path / "content"
    work.mkdir()
    notebook = work / "01_quickstart.ipynb"
    shutil.copy(ROOT / "notebooks" / "01_quickstart.ipynb", notebook)
    env = {**os.environ, "IPYTHONDIR": str(tmp_path / "ipython"), "PYTHONPATH": str(tmp_path / "colab_site"),
           "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(dist)}
    run = subprocess.run([str(python), "-c", RUN_NOTEBOOK, str(notebook), str(work)], cwd=work, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    installed = subprocess.run([str(python), "-m", "pip", "show", "blip-trace-widgets"], capture_output=True, text=True)
    assert installed.returncode == 0 and "Version:" in installed.stdout


def _versions(python: Path) -> dict[str, str]:
    frozen = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                            check=True).stdout
    return {p["name"].lower(): p["version"] for p in json.loads(frozen)}


def test_colabs_package_list_is_kept_and_notebooks_run_on_it(dist, tmp_path):
    """Colab's preinstalled versions of what this project touches (tests/colab-packages.txt) first, then the wheel:
    it must change none of them, and notebooks 01 (VQA) and 09 (captioning and matching) must run there."""
    pins = [line.strip() for line in (ROOT / "tests" / "colab-packages.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    python = _venv(tmp_path / "colab")
    _pip(python, "install", *pins, "nbclient")
    before = _versions(python)
    _pip(python, "install", str(next(dist.glob("*.whl"))))
    after = _versions(python)
    for pin in pins:
        name, version = pin.split("==")
        assert before[name.lower()] == version and after[name.lower()] == version, (pin, after.get(name.lower()))
    work = tmp_path / "content"
    work.mkdir()
    for name in ("01_quickstart.ipynb", "09_image_conditioned_generation.ipynb"):
        shutil.copy(ROOT / "notebooks" / name, work / name)
        run = subprocess.run([str(python), "-c", RUN_NOTEBOOK, str(work / name), str(work)], cwd=work,
                             capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, name + run.stdout[-2000:] + run.stderr[-3000:]
