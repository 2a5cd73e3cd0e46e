"""TraceExplorer's "what it carries / what it says" toggle in a real browser: JupyterLab on localhost, Debian's
chromium driven by Playwright (as tests/test_browser.py runs the explorer). Screenshots go to ``$ARTIFACTS_DIR``."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request

import pytest
from test_browser import ARTIFACTS, CHROMIUM, _browser, _free_port, _run_first_cell

pytestmark = [pytest.mark.browser, pytest.mark.slow]
CELL = """\
from blip_trace_widgets import load_model, demo_samples
from blip_trace_widgets.causal_trace.tracer import default_config
from blip_trace_widgets.widgets import TraceExplorer
bundle = load_model("demo")
image, question, _ = demo_samples()[0]
TraceExplorer(bundle, image, question, config=default_config(bundle, block="answer_decoder"), background=False,
              mode="exact", noise_samples=4)"""
#: The images shown (laid out, drawn): the sample's, then the heatmap or the lens grid.
SHOWN = "[...document.querySelectorAll('.jp-OutputArea-output img')].filter(i => i.offsetParent !== null && i.naturalWidth > 100)"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from pathlib import Path

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium) to run browser tests")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download is needed)")
    pytest.importorskip("jupyterlab")
    root = tmp_path_factory.mktemp("lens-toggle")
    notebook = {"cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": CELL}],
                "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
                "nbformat": 4, "nbformat_minor": 5}
    (root / "toggle.ipynb").write_text(json.dumps(notebook))
    port, token = _free_port(), secrets.token_hex(8)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(root / ".jupyter"), "JUPYTER_RUNTIME_DIR": str(root / ".runtime")}
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--allow-root",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=open(root / "lab.log", "w"), stderr=subprocess.STDOUT, env=env)
    base, deadline = f"http://127.0.0.1:{port}", time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        server.terminate()
        pytest.fail("JupyterLab did not start:\n" + (root / "lab.log").read_text()[-3000:])
    yield f"{base}/lab/tree/toggle.ipynb?token={token}"
    server.terminate()
    server.wait(timeout=30)


def test_the_toggle_renders_and_switches_between_the_map_and_the_lens(lab):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        try:
            page.goto(lab, timeout=90_000)
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=90_000)
            _run_first_cell(page)
            page.wait_for_function(f"() => {SHOWN}.length >= 2", timeout=120_000)
            heatmap = page.evaluate(f"() => {SHOWN}[1].src")
            page.screenshot(path=str(ARTIFACTS / "lens-toggle-carries.png"), full_page=True)
            page.locator("button", has_text="what it says").click()
            page.wait_for_function(f"(old) => {SHOWN}.length >= 2 && !{SHOWN}.some(i => i.src === old)", arg=heatmap,
                                   timeout=60_000)
            # the picked cell's tokens come in their own widget message, after the grid: wait for them (it fails if
            # they never show)
            page.locator("text=what it says: top 10 tokens").first.wait_for(state="visible", timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "lens-toggle-says.png"), full_page=True)
            page.locator("button", has_text="what it carries").click()
            page.wait_for_function(f"(old) => {SHOWN}.some(i => i.src === old)", arg=heatmap, timeout=60_000)
            assert "Error displaying widget" not in page.content()
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "lens-toggle-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
