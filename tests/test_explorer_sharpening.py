"""The explorers sharpen their exact maps live: each round of noise redrawn, a status line, a stop button that ends
it after the round in progress, and a newer change that cancels it. Driven from Python on the demo model; the last
test looks at the status line in a browser (JupyterLab and Notebook 7, as tests/test_browser.py does)."""
from __future__ import annotations

import json
import threading
import urllib.request
from dataclasses import replace
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from test_browser import ARTIFACTS, lab, notebook_page  # noqa: F401  (lab: JupyterLab and Notebook 7 servers)
from tolerance import assert_close

from blip_trace_widgets import BlipTraceError, GaussianNoise, TraceConfig, trace
from blip_trace_widgets.causal_trace.sharpen import AutoSampling, sharpen, status_text
from blip_trace_widgets.widgets import TraceExplorer, VisionTraceExplorer
from blip_trace_widgets.widgets.controls import AUTO_PLAN

# every test here drives an explorer through rounds of sharpening on the demo model: the full suite runs them
pytestmark = pytest.mark.slow

USER = "by the user"


def watch(explorer: TraceExplorer) -> list:
    """Every map the explorer shows from now on, in order."""
    seen: list = []
    explorer.observe(lambda change: seen.append(change["new"]), names="result")
    return seen


def test_the_first_exact_map_sharpens_and_its_status_line_says_how_far(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    explorer = TraceExplorer(demo_bundle, image, question, background=False)
    assert explorer.noise_samples.value == "auto" and explorer.method.value == "exact"
    assert AUTO_PLAN == AutoSampling()  # the explorer's plan is sharpen.py's defaults
    result = explorer.result
    auto = result.config["auto"]
    assert auto["stopped"] in ("stable", "budget") and auto["round_samples"] == AUTO_PLAN.round_samples
    assert explorer.sharpening.line.value == status_text(result)
    assert " cells significant · " in explorer.sharpening.line.value
    top = result.stability()["top"]
    assert explorer.sharpening.stability.value == f"top cell stable in {top:.0%} of resamples"
    assert explorer.sharpening.stop.disabled and explorer.sharpening.layout.display is None
    assert f"· {result.config['samples']} noise samples ·" in explorer.status.value  # the samples it drew, said
    assert explorer.config.samples == result.config["samples"]
    static = trace(demo_bundle, image, question, corruption=GaussianNoise(demo_bundle.noise_scale), samples="auto")
    assert static.config["samples"] == result.config["samples"]
    assert_close(result.scores, static.scores)  # the map trace(samples="auto") gives


def test_each_round_redraws_the_map(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    explorer = TraceExplorer(demo_bundle, image, question, background=False, noise_samples=3)
    assert "auto" not in explorer.result.config and explorer.sharpening.layout.display == "none"
    seen, pngs, lines = watch(explorer), [], []
    explorer.heatmap.observe(lambda change: pngs.append(bytes(change["new"])), names="value")
    explorer.sharpening.line.observe(lambda change: lines.append(change["new"]), names="value")
    explorer.noise_samples.value = "auto"
    rounds = [r.config["auto"] for r in seen]
    assert len(seen) >= 3, "the demo map needs several rounds: it must be redrawn after each"
    assert [a["rounds"] for a in rounds] == list(range(1, len(seen) + 1))
    assert [r.config["samples"] for r in seen] == [AUTO_PLAN.round_samples * (i + 1) for i in range(len(seen))]
    assert all(a["stopped"] is None for a in rounds[:-1]) and rounds[-1]["stopped"] in ("stable", "budget")
    assert len(pngs) == len(seen) and len(set(pngs)) == len(seen)  # a new heatmap per round
    assert lines[0] == status_text(seen[0]) and lines[0].endswith(" · sharpening…")
    assert lines[-1] == status_text(seen[-1]) and "· stopped: " in lines[-1]


def test_the_stop_button_ends_it_after_the_round_in_progress(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    explorer = TraceExplorer(demo_bundle, image, question, noise_samples=4)
    explorer.wait()
    seen, enabled = [], []

    def on_result(change):
        seen.append(change["new"])
        enabled.append(not explorer.sharpening.stop.disabled)
        if len(seen) == 1:
            explorer.sharpening.stop.click()  # as the second round starts

    explorer.observe(on_result, names="result")
    explorer.noise_samples.value = "auto"
    explorer.wait()
    last = explorer.result
    assert len(seen) == 2 and last is seen[-1] and enabled == [True, True]
    assert last.config["auto"]["stopped"] == USER and last.config["samples"] == 2 * AUTO_PLAN.round_samples
    assert explorer.sharpening.line.value == status_text(last) and explorer.sharpening.stop.disabled
    asked = iter([False, True])  # asked after each round that is neither stable nor at its budget
    expected = sharpen(explorer.tracer, explorer.controls_config(), AUTO_PLAN, should_stop=lambda: next(asked))
    np.testing.assert_array_equal(last.scores, expected.scores)  # the map it had, kept on screen
    assert explorer.error.value == ""
    explorer.kind.value = "mlp"
    explorer.kind.value = "hidden"  # a stopped map is not kept: it sharpens again, to its end
    explorer.wait()
    assert explorer.result.config["auto"]["stopped"] in ("stable", "budget")
    finished = explorer.result
    explorer.kind.value = "mlp"
    explorer.kind.value = "hidden"  # a map that ran its course is shown again at once
    explorer.wait()
    assert explorer.result is finished


def test_a_change_while_it_sharpens_cancels_it_for_the_new_settings(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    explorer = TraceExplorer(demo_bundle, image, question, noise_samples=4)
    explorer.wait()
    first, resume = threading.Event(), threading.Event()
    seen = watch(explorer)

    def hold_the_first_round(change):
        if len(seen) == 1:
            first.set()
            resume.wait(60)  # the hidden-state map's worker waits here, mid-sharpening

    explorer.observe(hold_the_first_round, names="result")
    explorer.noise_samples.value = "auto"
    assert first.wait(60) and seen[0].config["auto"]["stopped"] is None
    explorer.kind.value = "mlp"
    resume.set()
    explorer.wait()
    assert [r.kind for r in seen[1:]] == ["mlp"] * (len(seen) - 1)  # nothing of the old map after the change
    result = explorer.result
    assert result.kind == "mlp" and result.config["auto"]["stopped"] in ("stable", "budget")
    assert explorer.sharpening.line.value == status_text(result) and explorer.error.value == ""
    expected = sharpen(explorer.tracer, explorer.controls_config(), AUTO_PLAN)
    assert expected.config["samples"] == result.config["samples"]
    np.testing.assert_array_equal(result.scores, expected.scores)


def test_estimates_stay_and_the_verified_or_exact_map_after_one_sharpens(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    explorer = TraceExplorer(demo_bundle, image, question, background=False, mode="verified")
    result = explorer.result  # the estimate's top cells made exact, drawn in rounds
    auto = result.config["auto"]
    assert result.config["method"] == "verified" and auto["stopped"] and auto["estimate_samples"] == 10
    assert explorer.sharpening.line.value == status_text(result)
    cells = np.array(result.config["exact_cells"])
    assert len(cells) == 10  # its exact cells are the exact map's of the same samples; the others are estimates
    exact = explorer.tracer.trace(replace(explorer.controls_config(), method="exact", samples=result.config["samples"]))
    np.testing.assert_allclose(result.scores[cells[:, 0], cells[:, 1]], exact.scores[cells[:, 0], cells[:, 1]],
                               atol=1e-6)
    tested = result.statistics().tested()
    assert tested.sum() == 10 and tested[cells[:, 0], cells[:, 1]].all()
    seen = watch(explorer)
    explorer.method.value = "both"  # the estimate, then the exact map, which sharpens
    assert seen[0].config["method"] == "estimate" and "auto" not in seen[0].config
    assert len(seen) >= 3 and all(r.config["method"] == "exact" for r in seen[1:])
    assert explorer.result.config["auto"]["stopped"] and explorer.sharpening.line.value == status_text(explorer.result)


def test_a_fixed_number_still_works_and_a_bad_one_is_said_inside(demo_bundle, demo_sample):
    import traitlets

    image, question, _ = demo_sample
    explorer = TraceExplorer(demo_bundle, image, question, background=False)
    explorer.noise_samples.value = 3
    assert explorer.noise_samples.value == "3" and explorer.result.config["samples"] == 3
    assert "auto" not in explorer.result.config and explorer.sharpening.layout.display == "none"
    with pytest.raises(traitlets.TraitError, match="is outside 1 to 1000"):
        explorer.noise_samples.value = 0
    explorer.noise_samples.value = "many"  # typed in the box: said inside the widget, the kernel carries on
    assert "type auto or a whole number from 1 to 1000" in explorer.error.value
    assert explorer.heatmap.layout.visibility == "hidden" and explorer.sharpening.layout.display == "none"
    explorer.noise_samples.value = "auto"
    assert explorer.error.value == "" and explorer.result.config["auto"]["stopped"]


def test_a_starting_config_keeps_its_samples_unless_told(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    noise = GaussianNoise(demo_bundle.noise_scale)
    fixed = TraceExplorer(demo_bundle, image, question, background=False, config=TraceConfig(corruption=noise,
                                                                                             samples=4))
    assert fixed.noise_samples.value == "4" and fixed.result.config["samples"] == 4
    auto = TraceExplorer(demo_bundle, image, question, background=False, config=TraceConfig(corruption=noise),
                         noise_samples="auto")
    assert auto.result.config["auto"]["stopped"]
    with pytest.raises(BlipTraceError, match="samples=4 and noise_samples='auto': pass one"):
        TraceExplorer(demo_bundle, image, question, background=False, config=TraceConfig(corruption=noise, samples=4),
                      noise_samples="auto")


@pytest.mark.slow  # four panels, each to its end
def test_the_compare_view_sharpens_its_panels_in_step(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    explorer = TraceExplorer(demo_bundle, image, question, background=False)
    explorer.view.value = "compare"
    panels = explorer.results
    assert len(panels) == 4 and all(r.config["auto"]["stopped"] for r in panels.values())
    lines = explorer.sharpening.line.value.split("<br>")
    assert lines[0] == "hidden states: " + status_text(panels["hidden"])
    assert len(lines) == 4 and explorer.error.value == ""


def test_the_vision_explorer_sharpens_too(demo_bundle):
    explorer = VisionTraceExplorer(demo_bundle, background=False, regions=2)
    result = explorer.result
    assert explorer.noise_samples.value == "auto" and result.config["auto"]["stopped"]
    assert explorer.sharpening.line.value == status_text(result)
    explorer.corruption.value = "blur"  # nothing is drawn: one sample, no sharpening
    assert "auto" not in explorer.result.config and explorer.sharpening.layout.display == "none"


# ----- in a browser ---------------------------------------------------------------------------------------------------
SHARPENING_CELL = """\
from blip_trace_widgets import load_model, demo_samples
from blip_trace_widgets.widgets import TraceExplorer
image, question, _ = demo_samples()[0]
TraceExplorer(load_model("demo"), image, question)"""


def _put_notebook(url: str, name: str, source: str) -> None:
    """Write a one-cell notebook into the running server's root, through its contents API."""
    parts = urlsplit(url)
    token = parse_qs(parts.query)["token"][0]
    notebook = {"cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                           "source": source}],
                "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
                "nbformat": 4, "nbformat_minor": 5}
    body = json.dumps({"type": "notebook", "format": "json", "content": notebook}).encode()
    request = urllib.request.Request(f"{parts.scheme}://{parts.netloc}/api/contents/{name}", data=body, method="PUT",
                                     headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).close()


@pytest.mark.browser
@pytest.mark.slow
def test_the_status_line_shows_the_sharpening_in_a_browser(lab):  # noqa: F811  (the fixture imported above)
    app, url = lab
    _put_notebook(url, "sharpening.ipynb", SHARPENING_CELL)
    url = url.replace("explorer.ipynb", "sharpening.ipynb").replace("lab/tree/", "lab/workspaces/sharpening/tree/")
    with notebook_page(app, url, "sharpening") as page:
        done = "() => [...document.querySelectorAll('.jp-OutputArea-output')].some(o => o.innerText.includes('stopped: '))"
        page.wait_for_function(done, timeout=120_000)
        text = page.locator(".jp-OutputArea-output").first.inner_text()
        page.screenshot(path=str(ARTIFACTS / f"{app}-explorer-sharpened.png"), full_page=True)
        assert "cells significant" in text and "top cell stable in" in text and "of resamples" in text
        assert page.get_by_role("button", name="stop").is_disabled()
        assert "Error displaying widget" not in page.content()

