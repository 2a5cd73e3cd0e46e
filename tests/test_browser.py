"""TraceExplorer in a real browser: JupyterLab on localhost, Debian's chromium, driven by Playwright.

Screenshots go to ``$ARTIFACTS_DIR`` (default ``artifacts/``) as test artefacts.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("ARTIFACTS_DIR", Path(__file__).resolve().parents[1] / "artifacts"))
CELL = """\
from blip_trace_widgets import load_model, demo_samples
from blip_trace_widgets.widgets import TraceExplorer
image, question, _ = demo_samples()[0]
explorer = TraceExplorer(load_model("demo"), image, question, background=False)
explorer.noise_samples.value = 4
explorer"""
VISION_CELL = """\
from blip_trace_widgets import load_model
from blip_trace_widgets.widgets import VisionTraceExplorer
VisionTraceExplorer(load_model("demo"), background=False, regions=4, noise_samples=2)"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


APPS = {  # app -> (module to run, URL path of the notebook)
    "jupyterlab": ("jupyterlab", "lab/tree/explorer.ipynb"),
    "notebook7": ("notebook", "notebooks/explorer.ipynb"),
}


@pytest.fixture(scope="module", params=sorted(APPS))
def lab(request, tmp_path_factory):
    app = request.param
    module, url_path = APPS[app]
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium) to run browser tests")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download is needed)")
    pytest.importorskip(module)
    root = tmp_path_factory.mktemp(app)
    for name, source in (("explorer", CELL), ("vision", VISION_CELL)):
        notebook = {
            "cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": source}],
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5,
        }
        (root / f"{name}.ipynb").write_text(json.dumps(notebook))
    port, token = _free_port(), secrets.token_hex(8)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(root / ".jupyter"), "JUPYTER_RUNTIME_DIR": str(root / ".runtime")}
    server = subprocess.Popen(
        [sys.executable, "-m", module, "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--allow-root",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=open(root / "lab.log", "w"), stderr=subprocess.STDOUT, env=env,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        server.terminate()
        pytest.fail("JupyterLab did not start:\n" + (root / "lab.log").read_text()[-3000:])
    yield app, f"{base}/{url_path}?token={token}"
    server.terminate()
    server.wait(timeout=30)


def _heatmap_src(page) -> str:
    return page.locator(".jp-OutputArea-output img").nth(1).get_attribute("src") or ""


def _dismiss_dialogs(page) -> None:
    """Accept a dialog that blocks the notebook (JupyterLab's "Select Kernel" appears now and then): its default
    choice is the notebook's own kernel."""
    dialog = page.locator(".jp-Dialog")
    if dialog.count() and dialog.first.is_visible():
        accept = dialog.first.locator(".jp-Dialog-button.jp-mod-accept")
        (accept.first if accept.count() else dialog.first.locator("button").last).click(timeout=5_000)


def _run_first_cell(page) -> None:
    """Shift+Enter on the first cell, again if the kernel was not ready to take it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    started = "() => { const p = document.querySelector('.jp-Cell .jp-InputPrompt');" \
              " return p && /\\[(\\*|\\d+)\\]/.test(p.textContent); }"
    for _ in range(12):
        _dismiss_dialogs(page)
        page.locator(".jp-Cell .jp-InputArea-editor").first.click()
        page.keyboard.press("Shift+Enter")
        try:
            page.wait_for_function(started, timeout=10_000)
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError("the notebook never ran its cell")


def _open_and_run(page, url: str) -> None:
    """Open the notebook, run its cell, and wait until the widget's second image (the plot) has rendered."""
    page.goto(url, timeout=90_000)
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=90_000)
    _run_first_cell(page)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.jp-OutputArea-output img')].length >= 2 && "
        "[...document.querySelectorAll('.jp-OutputArea-output img')][1].naturalWidth > 100", timeout=120_000)
    assert "Error displaying widget" not in page.content()


def _browser(p):
    return p.chromium.launch(
        executable_path=CHROMIUM, headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync"],
    )


CHANGED = ("(old) => { const i = [...document.querySelectorAll('.jp-OutputArea-output img')][1];"
           " return i && i.src !== old && i.naturalWidth > 100; }")


@contextmanager
def notebook_page(app: str, url: str, name: str):
    """A chromium page with the notebook open and its widget rendered; a screenshot is kept if anything fails."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        try:
            _open_and_run(page, url)
            yield page
        except Exception:
            page.screenshot(path=str(ARTIFACTS / f"{app}-{name}-failure.png"), full_page=True)
            raise
        finally:
            browser.close()


def _type_into_slider(page, label: str, value: str) -> None:
    """Type a value into a slider's readout, as a user would, and wait for the plot to change."""
    before = _heatmap_src(page)
    readout = page.locator(".widget-slider", has_text=label).locator(".widget-readout")
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(value)
    page.keyboard.press("Enter")
    page.wait_for_function(CHANGED, arg=before, timeout=120_000)
    assert page.locator(".widget-slider", has_text=label).locator(".widget-readout").inner_text().strip() == value


def test_vision_explorer_renders_and_redraws_per_layer(lab):
    app, url = lab
    url = url.replace("explorer.ipynb", "vision.ipynb").replace("lab/tree/", "lab/workspaces/vision/tree/")
    with notebook_page(app, url, "vision") as page:
        page.screenshot(path=str(ARTIFACTS / f"{app}-vision-layer0.png"), full_page=True)
        _type_into_slider(page, "vision layer", "2")
        page.screenshot(path=str(ARTIFACTS / f"{app}-vision-layer2.png"), full_page=True)
        assert "Error displaying widget" not in page.content()


def test_explorer_renders_and_follows_controls(lab):
    app, url = lab
    with notebook_page(app, url, "explorer") as page:
        page.screenshot(path=str(ARTIFACTS / f"{app}-explorer-initial.png"), full_page=True)
        before = _heatmap_src(page)
        page.locator(".widget-dropdown", has_text="kind").locator("select").select_option(label="MLP")
        page.wait_for_function(CHANGED, arg=before, timeout=120_000)
        page.screenshot(path=str(ARTIFACTS / f"{app}-explorer-mlp.png"), full_page=True)
        _type_into_slider(page, "window", "3")
        page.screenshot(path=str(ARTIFACTS / f"{app}-explorer-mlp-window3.png"), full_page=True)
        assert "Error displaying widget" not in page.content()


def test_sliders_keep_a_usable_track_at_1400_px(lab):
    """The noise-scale slider shrank to a bare handle beside the method toggle in a 1400 px window."""
    app, url = lab
    with notebook_page(app, url, "explorer") as page:
        page.screenshot(path=str(ARTIFACTS / f"{app}-explorer-layout.png"), full_page=True)
        for label in ("noise scale", "window"):
            track = page.locator(".widget-slider", has_text=label).first.locator(".slider-container")
            box = track.bounding_box()
            assert box is not None and box["width"] >= 200, f"the {label} slider's track is {box} wide at 1400 px"
            print(f"{app}: the {label} slider's track is {box['width']:.0f} px wide at 1400 px")
