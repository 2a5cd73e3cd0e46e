"""TraceExplorer driven from Python: controls in, heatmaps, caching and errors out."""
from __future__ import annotations

import numpy as np
import pytest
from tolerance import assert_close

from blip_trace_widgets import GaussianNoise, MultiplicativeNoise, TraceResult, demo_samples, trace
from blip_trace_widgets.widgets import TraceExplorer, tooltip_of


@pytest.fixture()
def explorer(demo_bundle, demo_sample, tmp_path):
    image, question, _ = demo_sample
    # estimate, then the exact map (the default, "verified", is tested on its own)
    ex = TraceExplorer(demo_bundle, image, question, background=False, export_dir=tmp_path, mode="both")
    ex.noise_samples.value = 4
    return ex


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_controls_drive_the_heatmap(explorer, demo_bundle, demo_sample):
    image, question, _ = demo_sample
    first_png = explorer.heatmap.value
    explorer.kind.value = "mlp"
    explorer.window.value = 3
    expected = trace(demo_bundle, image, question, kind="mlp", window=3, samples=4,
                     corruption=GaussianNoise(demo_bundle.noise_scale))
    assert explorer.config.corruption == GaussianNoise(demo_bundle.noise_scale)
    assert explorer.result.kind == "mlp" and explorer.result.window == 3
    np.testing.assert_array_equal(explorer.result.scores, expected.scores)
    assert explorer.heatmap.value != first_png
    explorer.corruption.value = "multiplicative"
    explorer.noise.value = 5.0
    expected = trace(demo_bundle, image, question, kind="mlp", window=3, samples=4,
                     corruption=MultiplicativeNoise(std=5.0))
    np.testing.assert_array_equal(explorer.result.scores, expected.scores)
    explorer.block.value = "answer_decoder"
    assert explorer.result.block == "answer_decoder" and explorer.result.tokens == ["[DEC]"]


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_repeat_configuration_hits_the_cache(explorer):
    tracer = explorer.tracer
    explorer.kind.value = "mlp"
    calls = tracer.stats["engine_calls"]
    mlp_scores = explorer.result.scores
    explorer.kind.value = "hidden"  # shown first, so cached
    explorer.kind.value = "mlp"
    assert tracer.stats["engine_calls"] == calls
    assert tracer.stats["cache_hits"] >= 2
    assert explorer.result.scores is mlp_scores


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_noise_changes_do_not_redo_the_clean_pass(explorer):
    tracer = explorer.tracer
    for value in (1.0, 5.0, 0.5):
        explorer.noise.value = value
    explorer.seed.value = 3
    explorer.noise_samples.value = 6
    assert tracer.stats["clean_passes"] == 1 and tracer.stats["vision_passes"] == 1
    assert tracer.stats["corrupted_passes"] >= 4


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_new_question_recomputes_the_clean_pass(explorer):
    old = explorer.tracer
    explorer.question_box.value = "what shape is present?"
    assert explorer.tracer is not old and explorer.tracer.stats["clean_passes"] == 1
    assert "shape" in explorer.result.tokens


def test_errors_show_inside_and_widget_recovers(explorer):
    good = explorer.question_box.value
    explorer.question_box.value = "   "
    assert "empty" in explorer.error.value
    explorer.question_box.value = "what is the zebra quux?"  # unknown words become [UNK]; still traceable
    explorer.question_box.value = good
    assert explorer.error.value == ""
    assert explorer.result.config["question"] == good


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_window_disabled_for_hidden_with_reason(explorer):
    explorer.kind.value = "hidden"
    assert explorer.window.disabled and "one layer at a time" in tooltip_of(explorer.window)
    explorer.kind.value = "cross_attn"
    assert not explorer.window.disabled
    assert explorer.window.max == explorer.bundle.num_layers()


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_exports(explorer, tmp_path):
    explorer.kind.value = "self_attn"
    png, js, csv = (explorer.export(fmt) for fmt in ("png", "json", "csv"))
    assert png.read_bytes().startswith(b"\x89PNG")
    assert TraceResult.load(js) == explorer.result
    assert len(csv.read_text().strip().splitlines()) == 1 + explorer.result.scores.size
    explorer.export_buttons[1].click()
    assert "saved" in explorer.status.value


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_gallery_switches_samples(demo_bundle, tmp_path):
    ex = TraceExplorer(demo_bundle, background=False, mode="exact")
    assert len(ex.gallery.options) == len(demo_samples())
    ex.noise_samples.value = 3
    ex.gallery.value = 2
    image, question, _ = demo_samples()[2]
    assert ex.question_box.value == question
    assert ex.result.config["question"] == question
    np.testing.assert_array_equal(ex.result.scores, trace(demo_bundle, image, question, samples=3,
                                                                  corruption=GaussianNoise(demo_bundle.noise_scale)).scores)


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_compare_view_shows_four_kinds(explorer, demo_bundle, demo_sample):
    image, question, _ = demo_sample
    explorer.window.value = 2
    explorer.view.value = "compare"
    assert set(explorer.results) == {"hidden", "mlp", "self_attn", "cross_attn"}
    assert explorer.kind.disabled and explorer.comparison.layout.display == "flex"
    assert all(bytes(view.value).startswith(b"\x89PNG") for view in explorer.comparison.children)
    expected = trace(demo_bundle, image, question, kind="cross_attn", window=2, samples=4,
                     corruption=GaussianNoise(demo_bundle.noise_scale))
    np.testing.assert_array_equal(explorer.results["cross_attn"].scores, expected.scores)


def test_background_mode_updates(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    ex = TraceExplorer(demo_bundle, image, question, background=True)
    ex.wait()
    ex.kind.value = "mlp"
    ex.kind.value = "self_attn"  # cancels or follows the mlp trace
    ex.wait()
    assert ex.result.kind == "self_attn"
    assert ex.progress.value == ex.progress.max


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_set_sample_and_bad_image(explorer, demo_bundle):
    image, question, _ = demo_samples()[1]
    explorer.set_sample(image, question)
    assert explorer.result.config["question"] == question and explorer.tracer.stats["clean_passes"] == 1
    explorer.set_sample("/no/such/image.png", question)
    assert "not found" in explorer.error.value
    explorer.kind.value = "mlp"  # still works
    assert explorer.result.kind == "mlp" and explorer.result.config["question"] == question


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_heatmap_shown_at_natural_width(explorer):
    import io

    from PIL import Image

    from blip_trace_widgets.widgets import png_width

    png = bytes(explorer.heatmap.value)
    assert explorer.heatmap.layout.width == f"{png_width(png)}px"
    assert png_width(png) == Image.open(io.BytesIO(png)).width


def test_explorer_rejects_a_corruption_its_controls_cannot_show(demo_bundle, demo_sample):
    from blip_trace_widgets import ImageSwap, TraceConfig

    image, question, _ = demo_sample
    with pytest.raises(ValueError, match="gaussian, multiplicative, uniform, scale"):
        TraceExplorer(demo_bundle, image, question, config=TraceConfig(corruption=ImageSwap(image)), background=False)


def test_unknown_words_are_listed_in_the_explorer(demo_bundle, demo_sample):
    from blip_trace_widgets.widgets import TraceExplorer

    image, _, _ = demo_sample
    explorer = TraceExplorer(demo_bundle, image, "what is the cat doing?", background=False)
    assert "lacks" in explorer.answer_view.value and "cat" in explorer.answer_view.value


def test_controls_become_a_config_without_a_kernel():
    from blip_trace_widgets.widgets import controls_config

    config = controls_config(block="question_encoder", kind="hidden", window=5, corruption="multiplicative", level=5.0,
                             samples=3, seed=2)
    assert config.window == 1 and config.corruption.std == 5.0 and (config.samples, config.seed) == (3, 2)
    assert controls_config(block="answer_decoder", kind="mlp", window=3, corruption="gaussian", level=2.5,
                           samples=1, seed=0).window == 3


def test_the_old_samples_keyword_still_works_with_a_warning(demo_bundle):
    import warnings

    from blip_trace_widgets import demo_samples
    from blip_trace_widgets.widgets import TraceExplorer

    gallery = [(s.image, s.question) for s in demo_samples()[:2]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explorer = TraceExplorer(demo_bundle, samples=gallery, background=False)
    assert any(issubclass(w.category, DeprecationWarning) and "gallery=" in str(w.message) for w in caught)
    assert len(explorer.gallery_items) == 2


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_the_estimate_shows_first_then_the_exact_map(explorer):
    shown = []
    explorer.heatmap.observe(lambda change: shown.append(explorer.result.is_estimate), names="value")
    statuses = []
    explorer.status.observe(lambda change: statuses.append(change["new"]), names="value")
    explorer.kind.value = "mlp"
    assert shown == [True, False]  # estimate, then exact, in that order
    assert any("ESTIMATE" in s and "exact map follows" in s for s in statuses)
    assert "ESTIMATE" not in explorer.status.value and not explorer.result.is_estimate


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_the_default_shows_the_estimate_then_its_top_cells_exact(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    explorer = TraceExplorer(demo_bundle, image, question, background=False)
    assert explorer.method.value == "verified"
    shown = []
    explorer.heatmap.observe(lambda change: shown.append(explorer.result.config["method"]), names="value")
    explorer.kind.value = "mlp"
    assert shown == ["estimate", "verified"]
    result = explorer.result
    assert result.exact_cells.sum() == 5 and "5 cells exact (outlined)" in explorer.status.value
    exact = explorer.tracer.trace(result.config and explorer.config)
    assert_close(result.scores[result.exact_cells], exact.scores[result.exact_cells])
    explorer.window.value = 3  # a window's estimate costs more than the exact map: exact at once
    assert explorer.result.config["method"] == "exact"


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_estimate_only_never_runs_the_engine(explorer):
    explorer.method.value = "estimate"
    tracer = explorer.tracer
    calls = tracer.stats["engine_chunks"]
    explorer.kind.value = "cross_attn"
    assert explorer.result.is_estimate and explorer.result.kind == "cross_attn"
    assert tracer.stats["engine_chunks"] == calls  # no patched run: the estimate alone
    assert "ESTIMATE" in explorer.status.value
    explorer.view.value = "compare"
    assert all(r.is_estimate for r in explorer.results.values())
    explorer.method.value = "exact"
    assert not explorer.result.is_estimate


def test_a_bug_inside_shows_its_traceback_and_a_mistake_one_line(demo_bundle, demo_sample, monkeypatch):
    from blip_trace_widgets import BlipTraceError
    from blip_trace_widgets.widgets import TraceExplorer

    image, question, _ = demo_sample
    explorer = TraceExplorer(demo_bundle, image, question, background=False)
    explorer._show_error(BlipTraceError("the question is empty: type one"))
    assert "the question is empty" in explorer.error.value and "<details>" not in explorer.error.value
    try:
        raise ValueError("shapes (2,3) and (4,5) not aligned")
    except ValueError as error:
        explorer._show_error(error)
    assert "<details>" in explorer.error.value and "Traceback" in explorer.error.value


def test_result_and_config_are_traitlets_that_users_can_observe(demo_bundle, demo_sample):
    from blip_trace_widgets import TraceConfig
    from blip_trace_widgets.widgets import TraceExplorer

    image, question, _ = demo_sample
    explorer = TraceExplorer(demo_bundle, image, question, background=False, mode="exact")
    seen, configs = [], []
    explorer.observe(lambda change: seen.append(change["new"]), names="result")
    explorer.observe(lambda change: configs.append(change["new"]), names="config")
    explorer.kind.value = "mlp"
    assert [r.kind for r in seen] == ["mlp"] and seen[-1] is explorer.result
    assert isinstance(configs[-1], TraceConfig) and configs[-1].kind == "mlp" == explorer.config.kind
    assert explorer.controls_config() == explorer.config


def test_the_vision_explorer_names_corruptions_as_everything_else_does():
    """Its controls go through one pure function and corruption.from_name: 'gaussian', not a name of its own."""
    from blip_trace_widgets.corruption import BY_NAME, Blur, GaussianNoise, Grey
    from blip_trace_widgets.regions import Box
    from blip_trace_widgets.widgets.controls import VISION_CORRUPTION_OPTIONS, VISION_LEVEL_TIPS, vision_config

    assert {name for _, name in VISION_CORRUPTION_OPTIONS} == set(VISION_LEVEL_TIPS) <= set(BY_NAME)
    box = Box(0, 0, 0.5, 0.5)
    common = dict(kind="mlp", window=2, regions=4, level=3.0, region=box, samples=5, seed=7, metric="prob")
    noisy, blurred, grey = (vision_config(corruption=name, **common) for name in ("gaussian", "blur", "grey"))
    assert noisy.corruption == GaussianNoise(3.0, region=box) and noisy.samples == 5 and noisy.window == 2
    assert blurred.corruption == Blur(3.0, region=box) and grey.corruption == Grey(region=box)
    assert blurred.samples == grey.samples == 1  # nothing is drawn: one sample is all there is


@pytest.mark.slow  # an explorer round trip with GradDrop: the full suite runs it
def test_the_flagged_mode_makes_the_cells_graddrop_flags_exact(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    explorer = TraceExplorer(demo_bundle, image, question, background=False, mode="flagged")
    result = explorer.result
    assert result.config["method"] == "verified" and result.config["grad_drop"] is True
    assert "cells and its flagged cells exact" in explorer.status.value
    estimate = explorer.tracer.trace(explorer.config, method="estimate", grad_drop=True)
    flagged = estimate.unreliable_cells
    assert result.exact_cells[flagged].all() and result.exact_cells.sum() >= 5
    exact = explorer.tracer.trace(explorer.config, method="exact", grad_drop=False)
    assert_close(result.scores[result.exact_cells], exact.scores[result.exact_cells])
    explorer.kind.value = "mlp"
    explorer.window.value = 3  # no GradDrop for windows: the exact map at once
    assert explorer.result.config["method"] == "exact"
