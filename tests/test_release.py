"""Publishing is one pushed tag: .github/workflows/release.yml does what RELEASING.md says it does."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from fast_subset import lengthy

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
RELEASING = (ROOT / "RELEASING.md").read_text()


@pytest.fixture(scope="module")
def workflow():
    yaml = pytest.importorskip("yaml")  # PyYAML: transformers, datasets and accelerate all depend on it
    return yaml.safe_load(WORKFLOW.read_text())


def _steps(job: dict) -> list[str]:
    """Each step as one text: its name, what it uses, what it runs and its settings."""
    return [" ".join(str(step.get(key, "")) for key in ("name", "uses", "run", "with", "env")) for step in job["steps"]]


def test_a_version_tag_runs_the_workflow(workflow):
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 (PyYAML) reads the key `on` as True
    assert triggers == {"push": {"tags": ["v*"]}}
    assert set(workflow["jobs"]) == {"build", "publish"}


def test_the_build_job_does_every_step_releasing_md_promises(workflow):
    """Every `code` in RELEASING.md's list of the build job's steps is in one of the job's steps, in that order."""
    promised = RELEASING.split("<!-- release steps -->")[1]
    job = workflow["jobs"]["build"]
    steps = _steps(job) + [" ".join(f"{k}: {v}" for k, v in job.get("env", {}).items())]
    text = "\n".join(steps)
    items = promised.strip().split("\n- ")
    assert len(items) == 5
    for item in items:
        for code in re.findall(r"`([^`]+)`", item):
            assert code in text, f"RELEASING.md promises {code!r}; the build job has no such step"
    for essential in ("python -m build", "twine check --strict", "tests/test_packaging.py", "download.pytorch.org/whl/cpu",
                      "scripts/install_torch.sh", "BLIP_TRACE_DIST"):
        assert essential in text, essential


def test_the_publish_job_uses_trusted_publishing(workflow):
    job = workflow["jobs"]["publish"]
    assert job["needs"] == "build"
    assert job["permissions"] == {"id-token": "write"}
    assert job["environment"]["name"] == "pypi" and "environment name | `pypi`" in RELEASING.lower()
    assert any(step.get("uses", "").startswith("pypa/gh-action-pypi-publish@") for step in job["steps"])
    assert not any("secrets." in step for step in _steps(job))  # no stored token
    assert workflow["permissions"] == {"contents": "read"}
    assert "pypa/gh-action-pypi-publish" in RELEASING and "`release.yml`" in RELEASING


@lengthy
def test_the_tag_must_name_the_version(workflow, tmp_path):
    """The first check stops a release whose tag is not v + __version__; RELEASING.md says where that lives."""
    init = ROOT / "blip_trace_widgets" / "__init__.py"
    version = re.search(r'^__version__ = "([^"]+)"', init.read_text(), re.M).group(1)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "blip_trace_widgets.__version__"}
    assert "`__version__` in `blip_trace_widgets/__init__.py`" in RELEASING
    check = next(step for step in workflow["jobs"]["build"]["steps"] if step.get("name") == "the tag names the package's version")
    (tmp_path / "blip_trace_widgets").mkdir()
    shutil.copy(init, tmp_path / "blip_trace_widgets" / "__init__.py")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(sys.executable)  # the runner's `python`
    for tag, ok in ((f"v{version}", True), (version, False), ("v0.0.0", False)):
        run = subprocess.run(["bash", "-c", check["run"]], cwd=tmp_path, capture_output=True, text=True,
                             env={"GITHUB_REF_NAME": tag, "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"})
        assert (run.returncode == 0) == ok, (tag, run.stdout, run.stderr)
        if not ok:
            assert f"does not match __version__ = '{version}'" in run.stderr


def test_filling_in_the_address_leaves_no_placeholder(tmp_path):
    """RELEASING.md's command replaces OWNER/REPO in every file that holds it, and makes the README's picture
    absolute (PyPI cannot show a relative one)."""
    block = next(b for b in re.findall(r"```bash\n(.*?)```", RELEASING, re.S) if "OWNER/REPO" in b)
    holders = subprocess.run(["git", "grep", "-l", "OWNER/REPO"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    holders = [h for h in holders if h not in ("RELEASING.md",) and not h.startswith("tests/")]
    assert "pyproject.toml" in holders and "README.md" in holders
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    for name in holders:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    subprocess.run(["git", "add", "."], cwd=tmp_path, check=True)
    run = subprocess.run(["bash", "-c", block.replace("alice/blip-trace-widgets", "someone/some-repo")], cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "all filled in", run.stdout + run.stderr
    for name in holders:
        text = (tmp_path / name).read_text()
        assert "OWNER/REPO" not in text and "someone/some-repo" in text, name
    readme = (tmp_path / "README.md").read_text()
    assert "](docs/images/" not in readme
    assert "](https://raw.githubusercontent.com/someone/some-repo/main/docs/images/" in readme
    assert 'Homepage = "https://github.com/someone/some-repo"' in (tmp_path / "pyproject.toml").read_text()
