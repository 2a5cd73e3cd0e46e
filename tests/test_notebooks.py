"""Every notebook runs top to bottom on the demo model, and is committed without outputs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS


def _committed(path: Path) -> str:
    """The notebook as git would commit it (through the strip-outputs filter), or the file outside git."""
    import subprocess

    root = path.parents[1]
    staged = subprocess.run(["git", "show", f":notebooks/{path.name}"], cwd=root, capture_output=True, text=True)
    return staged.stdout if staged.returncode == 0 and staged.stdout else path.read_text()


def test_outputs_are_stripped_on_commit():
    """Running a notebook in the repository leaves outputs in the file; the git filter strips them."""
    import subprocess
    import sys

    root = NOTEBOOKS[0].parents[1]
    assert (root / ".gitattributes").read_text().strip() == "*.ipynb filter=strip-outputs"
    notebook = json.loads(NOTEBOOKS[0].read_text())
    notebook["cells"][1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["ran\n"]}]
    notebook["cells"][1]["execution_count"] = 3
    stripped = subprocess.run([sys.executable, str(root / "scripts" / "strip_notebook_outputs.py")], input=json.dumps(notebook),
                              capture_output=True, text=True, check=True).stdout
    cell = json.loads(stripped)["cells"][1]
    assert cell["outputs"] == [] and cell["execution_count"] is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    cells = json.loads(_committed(path))["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    assert 'MODEL = "demo"' in "".join(code[0]["source"])


#: Smaller loops for CI, set in a cell run right after each notebook's first (settings) cell: every cell still runs,
#: over fewer images, questions or noise samples than the notebook's own measurement uses (as papermill would pass
#: parameters). The notebooks' stated figures come from their own settings, not these.
SMALLER = {
    "05_dataset_average.ipynb": "N_QUESTIONS = 16",
    "07_image_side_tracing.ipynb": "N_IMAGES, SAMPLES = 3, 4",
    "08_paper_and_rome.ipynb": "N_QUESTIONS = 6",
    "09_image_conditioned_generation.ipynb": "N_IMAGES = 4",
    "13_blip2_bottleneck.ipynb": "QUESTIONS = 4",
}


def test_the_smaller_settings_name_the_notebooks_own_settings():
    for name, line in SMALLER.items():
        first = next(c for c in json.loads((NOTEBOOKS[0].parent / name).read_text())["cells"] if c["cell_type"] == "code")
        for setting in line.split("=")[0].replace(" ", "").split(","):
            assert re.search(rf"^{setting} = ", "".join(first["source"]), re.M), (name, setting)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_runs_top_to_bottom(path, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    if path.name in SMALLER:
        first = next(i for i, c in enumerate(notebook.cells) if c.cell_type == "code")
        notebook.cells.insert(first + 1, nbformat.v4.new_code_cell(SMALLER[path.name]))
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    reprs = [c.source for c in notebook.cells if c.cell_type == "code" for o in c.outputs
             if "<PIL." in o.get("data", {}).get("text/plain", "") and "image/png" not in o["data"]]
    assert not reprs, f"these cells show an image's repr, not the image: {reprs}"
    _left_behind_is_ignored(path, tmp_path)
    figure_line = re.compile(r"^(plot_\w+\(.*|.*\.plot(_on_image)?\(.*\)(\.figure)?)$")
    plotted = [c for c in notebook.cells
               if c.cell_type == "code" and figure_line.match(c.source.strip().splitlines()[-1])]
    for cell in plotted:  # a figure as a cell's value is shown as a picture, not as '<Figure ...>'
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source


def _left_behind_is_ignored(path: Path, folder: Path) -> None:
    """What a notebook leaves in the folder it runs in (a user's notebooks/) is ignored by git: a resumable sweep
    folder sweep-*/ at most; anything else goes to a temporary folder."""
    import subprocess

    root = path.parents[1]
    if subprocess.run(["git", "rev-parse", "--git-dir"], cwd=root, capture_output=True).returncode != 0:
        return  # not a git checkout (an unpacked sdist): nothing to commit by mistake
    for entry in folder.iterdir():
        name = f"notebooks/{entry.name}" + ("/" if entry.is_dir() else "")
        ignored = subprocess.run(["git", "check-ignore", "-q", name], cwd=root).returncode == 0
        assert ignored, f"{path.name} leaves {entry.name} in notebooks/, which git would commit"


def test_a_sweep_folder_left_in_notebooks_is_ignored(tmp_path):
    (tmp_path / "sweep-colour").mkdir()
    _left_behind_is_ignored(NOTEBOOKS[0], tmp_path)
    (tmp_path / "figure.png").write_bytes(b"")
    with pytest.raises(AssertionError, match="leaves figure.png"):
        _left_behind_is_ignored(NOTEBOOKS[0], tmp_path)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_colab_install_runs_only_on_colab(path, monkeypatch):
    """The first code cell installs the package through %pip on Colab, and does nothing elsewhere."""
    import sys
    import types

    import tomllib
    from IPython.core.inputtransformer2 import TransformerManager

    cells = json.loads(path.read_text())["cells"]
    source = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
    python = TransformerManager().transform_cell(source)
    calls = []

    class Shell:
        def run_line_magic(self, name, line, _stack_depth=1):
            calls.append((name, line))

    namespace = {"get_ipython": Shell}
    exec(python, namespace)
    assert calls == [] and namespace["MODEL"] in ("demo", "demo-blip2")  # the bundled demo of the notebook's model
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    namespace = {"get_ipython": Shell}
    exec(python, namespace)
    assert calls == [("pip", "install --quiet {PACKAGE}")]
    project = tomllib.loads((path.parents[1] / "pyproject.toml").read_text())["project"]["name"]
    assert namespace["PACKAGE"] == project


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_a_failed_colab_install_says_what_to_do(path, monkeypatch):
    """While the package is unpublished, pip fails on Colab: the first cell then stops with a clear message."""
    import importlib.util
    import sys
    import types

    from IPython.core.inputtransformer2 import TransformerManager

    cells = json.loads(path.read_text())["cells"]
    python = TransformerManager().transform_cell("".join(next(c for c in cells if c["cell_type"] == "code")["source"]))

    class Shell:
        def run_line_magic(self, name, line, _stack_depth=1):
            pass  # pip "fails": nothing is installed

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "blip_trace_widgets" else real(name, *a))
    with pytest.raises(RuntimeError, match="did not install: blip-trace-widgets may not be published yet"):
        exec(python, {"get_ipython": Shell})
