"""The README is the front door: each of its snippets runs on its own and prints what the README shows, its picture
is what its command writes, and it points to the reference."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
#: (code, what it prints): a Python snippet, and the ```text block after "prints" that follows it, if any
SNIPPETS = re.findall(r"```python\n(.*?)```(?:\n+prints\n```text\n(.*?)```)?", README, re.S)
COMMANDS = re.findall(r"```bash\n(.*?)```", README, re.S)
PICTURE = re.search(r"!\[[^\]]*\]\((docs/images/[\w.-]+\.png)\)", README)
#: Words about how the project was made, not about the product (bracketed so that a search for them skips this line)
PROCESS_WORDS = re.compile(r"[s]top [0-9]|[t]his session|[l]ent to|[e]arlier session|\b[i]ssue [0-9]|release's session", re.I)


def test_the_readme_is_the_front_door():
    assert len(README.splitlines()) < 200 and "docs/reference.md" in README and "--allow-root" in README
    reference = (ROOT / "docs" / "reference.md").read_text()
    for heading in ("## What is traced", "## Attention heads", "## Estimates", "## Command line", "## Layout"):
        assert heading in reference
    assert "](RELEASING.md)" in README and (ROOT / "RELEASING.md").is_file()
    # the first paragraph says what it is in a few lines; the list of what it traces follows
    first = README.split("\n\n")[1]
    assert len(first.splitlines()) <= 5 and README.split("\n\n")[2].startswith("It traces")


def test_the_readme_shows_a_small_picture():
    assert PICTURE, "the README embeds a picture from docs/images/"
    assert (ROOT / PICTURE.group(1)).stat().st_size < 50_000


def test_product_text_speaks_only_of_the_product():
    files = [ROOT / "README.md", ROOT / "RELEASING.md", *sorted((ROOT / "notebooks").glob("*.ipynb")),
             *sorted((ROOT / "binder").iterdir()), *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "blip_trace_widgets").rglob("*.py")), *sorted((ROOT / "tests").glob("*.py")),
             *sorted((ROOT / "tests").glob("*.txt")), *sorted((ROOT / "benchmarks").glob("*.py")),
             *sorted((ROOT / "scripts").glob("*"))]
    files = [path for path in files if path.is_file() and path.name != "test_readme.py"]
    hits = [f"{path.relative_to(ROOT)}: {m.group(0)!r}" for path in files for m in PROCESS_WORDS.finditer(path.read_text())]
    assert not hits, hits


def _env(home: Path) -> dict[str, str]:
    return {"MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(home)}


@pytest.mark.slow
@pytest.mark.parametrize("snippet, prints", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_each_snippet_runs_on_its_own(snippet, prints, tmp_path):
    # a notebook's kernel outlives the explorer's background trace; a script waits for it before it exits
    wait = "\nimport threading\nfor t in threading.enumerate():\n    t is threading.main_thread() or t.join()\n"
    run = subprocess.run([sys.executable, "-c", snippet + wait], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=_env(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    if prints:
        assert run.stdout == prints, f"the README says this snippet prints\n{prints}\nit printed\n{run.stdout}"
    for name in re.findall(r'\.export\(f?"([\w{}]+)\.png"\)', snippet):  # every PNG it says it writes
        if "{" not in name:
            assert (tmp_path / f"{name}.png").stat().st_size > 10_000, name
    if "savefig(" in snippet:
        assert (tmp_path / "trace.pdf").read_bytes().startswith(b"%PDF")


def test_the_snippets_that_print_say_what_they_print():
    assert [bool(prints) for _, prints in SNIPPETS] == [True, False, True]  # the explorer prints nothing: it is shown


@pytest.mark.slow
def test_the_command_line_example_writes_the_readmes_picture(tmp_path):
    """The README's `blip-trace trace` example runs from a fresh folder on an image that ships with the package,
    prints the scores the README quotes, and writes the heatmap the README shows."""
    import numpy as np
    from PIL import Image

    command = next(c for c in COMMANDS if "blip-trace trace" in c)
    script = command.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env=_env(tmp_path))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "model's answer: 'red'" in run.stdout
    clean, corrupted = re.search(r"clean (\d\.\d+)\s+corrupted (\d\.\d+)", run.stdout).groups()
    assert f'p("red") clean ({float(clean):.3f}) and with noise on the image ({float(corrupted):.3f})' in README
    written = sorted((tmp_path / "trace-output").glob("*.png"))
    assert len(written) == 1
    ours = np.asarray(Image.open(written[0]).convert("RGB"), dtype=float)
    shown = np.asarray(Image.open(ROOT / PICTURE.group(1)).convert("RGB"), dtype=float)  # a 256-colour copy of it
    assert ours.shape == shown.shape and np.abs(ours - shown).mean() < 2.0, \
        f"{PICTURE.group(1)} is no longer what this command writes: run .venv/bin/python scripts/readme_picture.py"


def test_ci_runs_the_readmes_two_set_up_commands():
    """.ci/run installs everything with the README's set-up and then runs the README's test command."""
    commands = [line.strip() for line in COMMANDS[:2]]
    assert commands[0].startswith("bash scripts/setup.sh && .venv/bin/blip-trace demo")
    assert commands[1].startswith("bash scripts/setup.sh --browser && .venv/bin/python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()
