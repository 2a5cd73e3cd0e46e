"""TraceExplorer driven from Python: controls in, heatmaps, caching and errors out."""
from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
from fast_subset import lengthy
from tolerance import assert_close

from blip_trace_widgets import GaussianNoise, MultiplicativeNoise, TraceResult, demo_samples, trace
from blip_trace_widgets.core.names import DEFAULT_VERIFY
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


@lengthy
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


@lengthy
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


@lengthy
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


@lengthy
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
def test_verified_mode_shows_the_estimate_then_its_top_cells_exact(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    explorer = TraceExplorer(demo_bundle, image, question, background=False, mode="verified")
    assert explorer.method.value == "verified"
    shown = []
    explorer.heatmap.observe(lambda change: shown.append(explorer.result.config["method"]), names="value")
    explorer.kind.value = "mlp"
    assert shown[0] == "estimate" and len(shown) >= 2 and set(shown[1:]) == {"verified"}  # its rounds
    result = explorer.result
    assert result.exact_cells.sum() == DEFAULT_VERIFY and f"{DEFAULT_VERIFY} cells exact (outlined)" in explorer.status.value
    assert result.config["auto"]["stopped"] in ("stable", "budget")
    exact = explorer.tracer.trace(replace(explorer.config, method="exact"))  # as many samples as the rounds drew
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


@lengthy
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


@lengthy
def test_result_and_config_are_traitlets_that_users_can_observe(demo_bundle, demo_sample):
    from blip_trace_widgets import TraceConfig
    from blip_trace_widgets.widgets import TraceExplorer

    image, question, _ = demo_sample
    explorer = TraceExplorer(demo_bundle, image, question, background=False, mode="exact")
    seen, configs = [], []
    explorer.observe(lambda change: seen.append(change["new"]), names="result")
    explorer.observe(lambda change: configs.append(change["new"]), names="config")
    explorer.kind.value = "mlp"  # the map sharpens: one result per round, every one of the new kind
    assert seen and {r.kind for r in seen} == {"mlp"} and seen[-1] is explorer.result
    assert isinstance(configs[-1], TraceConfig) and configs[-1].kind == "mlp" == explorer.config.kind
    drawn = explorer.result.config["samples"]
    assert replace(explorer.controls_config(), samples=drawn) == explorer.config


def test_the_vision_explorer_names_corruptions_as_everything_else_does():
    """Its controls go through one pure function and corruption.from_name: 'gaussian', not a name of its own."""
    from blip_trace_widgets.core.regions import Box
    from blip_trace_widgets.corruptions.kinds import BY_NAME, Blur, GaussianNoise, Grey
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


# ----- the first view, every mode, no silent changes, an honest status line -------------------------------------
@lengthy
def test_the_first_view_is_the_exact_map_where_it_is_quick(demo_bundle, demo_sample):
    """On the demo model the explorer opens on the whole exact map, the one the static trace shows (notebook 1), with
    its strongest cells where trace() puts them; the status line says it is exact, with its samples and noise."""
    image, question, _ = demo_sample
    explorer = TraceExplorer(demo_bundle, image, question, background=False)
    assert explorer.method.value == "exact" and "Opened on the exact map" in tooltip_of(explorer.method)
    result = explorer.result
    assert not result.is_estimate and result.config["method"] == "exact"
    static = trace(demo_bundle, image, question, corruption=GaussianNoise(demo_bundle.noise_scale), samples="auto")
    assert result.config["samples"] == static.config["samples"]  # the map sharpened as samples="auto" does
    assert_close(result.scores, static.scores)
    top = np.unravel_index(np.argmax(static.scores), static.scores.shape)
    assert static.tokens[top[0]] in ("color", "of") and static.scores[top] > 0.9  # notebook 1's effect, shown as it is
    status = explorer.status.value
    assert "<b>EXACT</b> map" in status and "ESTIMATE" not in status
    assert f"{result.config['samples']} noise samples" in status
    assert f"Gaussian (ROME), scale {demo_bundle.noise_scale:g}" in status
    assert "restoring clean states" in status


@lengthy
def test_a_slow_model_opens_on_the_estimate_and_says_why(demo_bundle, demo_sample, monkeypatch):
    from blip_trace_widgets.widgets import controls

    monkeypatch.setattr(controls, "QUICK_SECONDS", 0.0)  # as if the exact map took longer than is quick here
    image, question, _ = demo_sample
    explorer = TraceExplorer(demo_bundle, image, question, background=False)
    assert explorer.method.value == "verified" and "pick 'exact only'" in tooltip_of(explorer.method)
    assert explorer.result.config["method"] == "verified"
    assert f"<b>ESTIMATE</b> (attribution patching), its top {DEFAULT_VERIFY} cells exact (outlined)" in explorer.status.value
    assert TraceExplorer(demo_bundle, image, question, background=False, mode="exact").method.value == "exact"


@lengthy
def test_every_mode_kind_window_and_view_builds_configs_every_phase_accepts():
    """No mode carries a setting another refuses: each phase of every mode, kind, window, direction, source and view
    the controls allow is a valid TraceConfig (building one checks it)."""
    from blip_trace_widgets.core.names import EXPLORER_MODES, kinds_of
    from blip_trace_widgets.corruptions.kinds import WordSwap
    from blip_trace_widgets.widgets.controls import BLOCK_OPTIONS, compare_configs, controls_config, phases

    blocks = {block for options in BLOCK_OPTIONS.values() for _, block in options}
    checked = 0
    for block in sorted(blocks):
        for kind in kinds_of(block):
            for window in range(1, 7):
                base = controls_config(block=block, kind=kind, window=window, corruption="gaussian", level=3.0,
                                       samples=4, seed=0)
                swapped = base.__class__(**{**base.__dict__, "corruption": WordSwap(question="a b"),
                                            "corrupt": "question", "samples": 1})
                for config, direction, mode in itertools.product((base, swapped), ("denoise", "noise"),
                                                                 EXPLORER_MODES):
                    config = replace(config, direction=direction)
                    for panel in ([config], compare_configs(config, window)):
                        for one in panel:
                            steps = phases(one, mode)
                            assert steps and steps[-1].method in ("exact", "verified", "estimate")
                            assert all(not s.grad_drop or mode == "flagged" for s in steps)
                            checked += len(steps)
    assert checked > 1000


@pytest.mark.parametrize("mode", ["exact", "estimate", "both", "verified", "flagged"])
@lengthy
def test_every_mode_traces_a_windowed_mlp_map(demo_bundle, demo_sample, mode):
    """exact only and estimate only with MLP and window 3 raised grad_drop's refusal."""
    image, question, _ = demo_sample
    explorer = TraceExplorer(demo_bundle, image, question, background=False, mode=mode)
    explorer.noise_samples.value = 2
    explorer.kind.value = "mlp"
    explorer.window.value = 3
    assert explorer.error.value == "", explorer.error.value
    assert (explorer.result.kind, explorer.result.window) == ("mlp", 3)
    assert explorer.result.is_estimate == (mode == "estimate")
    explorer.view.value = "compare"  # the window slider applies to every sublayer panel, in every mode
    assert explorer.error.value == "", explorer.error.value
    assert {r.window for k, r in explorer.results.items() if k != "hidden"} == {3}
    explorer.view.value = "single"
    explorer.kind.value = "hidden"  # a hidden-state map of one layer, whose phases the panels must not inherit
    explorer.view.value = "compare"
    assert explorer.error.value == "", explorer.error.value
    assert {k: r.window for k, r in explorer.results.items()} == {"hidden": 1, "mlp": 3, "self_attn": 3,
                                                                   "cross_attn": 3}


@lengthy
def test_a_starting_window_or_position_is_kept_or_refused_never_changed(demo_bundle, demo_sample):
    from blip_trace_widgets import BlipTraceError, TraceConfig

    image, question, _ = demo_sample
    noise = GaussianNoise(demo_bundle.noise_scale)
    with pytest.raises(BlipTraceError, match="window 99 is wider than the 4 layers of the question encoder: pass"):
        TraceExplorer(demo_bundle, image, question, config=TraceConfig(kind="mlp", window=99), background=False)
    with pytest.raises(BlipTraceError, match="hidden states one layer at a time.*pass window=1"):
        TraceExplorer(demo_bundle, image, question, config=TraceConfig(window=3, corruption=noise), background=False)
    explorer = TraceExplorer(demo_bundle, image, question, background=False, mode="exact",
                             config=TraceConfig(kind="self_attn_head", position=(1, 2), corruption=noise, samples=2))
    assert explorer.position.value == "1,2" and explorer.result.config["restored_positions"] == [1, 2]
    explorer = TraceExplorer(demo_bundle, image, question, background=False, mode="exact",
                             config=TraceConfig(kind="cross_attn_head", position=99, corruption=noise, samples=2))
    assert explorer.position.value == "99" and "position 99 is outside" in explorer.error.value


@lengthy
def test_controls_refuse_values_outside_their_range_instead_of_moving_them(explorer):
    import traitlets

    for control, value in ((explorer.window, 99), (explorer.window, 0), (explorer.window, -1),
                           (explorer.noise, 50.0), (explorer.noise, 0.01), (explorer.noise_samples, 0),
                           (explorer.noise_samples, 5000), (explorer.seed, -1)):
        before = control.value
        with pytest.raises(traitlets.TraitError, match="is outside .* pick a value in that range"):
            control.value = value
        assert control.value == before
    explorer.noise.value = 20.0  # the ends themselves are taken
    assert explorer.noise.value == 20.0


@lengthy
def test_a_starting_config_the_controls_cannot_show_is_refused(demo_bundle, demo_sample):
    from blip_trace_widgets import BlipTraceError, TraceConfig

    image, question, _ = demo_sample
    noise = GaussianNoise(demo_bundle.noise_scale)
    for config, message in ((TraceConfig(sever="mlp", corruption=noise), "cannot show sever='mlp'"),
                            (TraceConfig(answer="blue", corruption=noise), "cannot show answer='blue'"),
                            (TraceConfig(corruption=GaussianNoise(3.0, sigma=0.5)), "cannot show corruption="),
                            (TraceConfig(method="estimate", corruption=noise), "pass mode='estimate'")):
        with pytest.raises(BlipTraceError, match=message):
            TraceExplorer(demo_bundle, image, question, config=config, background=False)
    explorer = TraceExplorer(demo_bundle, image, question, background=False, mode="exact",
                             config=TraceConfig(direction="noise", corruption=noise, samples=2))
    assert explorer.counterfactual.direction.value == "noise" and explorer.result.config["direction"] == "noise"
    assert "patching corrupted states into the clean run" in explorer.status.value


def test_the_status_line_says_what_is_shown_with_its_samples_and_corruption(demo_sample):
    from blip_trace_widgets import TraceConfig
    from blip_trace_widgets.core.regions import Box
    from blip_trace_widgets.corruptions.kinds import Blur, ImageSwap, MultiplicativeNoise, WordSwap
    from blip_trace_widgets.widgets.controls import phases, shown_words

    config = TraceConfig(kind="mlp", corruption=MultiplicativeNoise(5.0), samples=7)
    estimate, verified = phases(config, "verified")
    assert shown_words([estimate], last=False, mode="verified") == (
        "<b>ESTIMATE</b> (attribution patching); the exact map follows… · multiplicative (paper), std 5, on the "
        "image embeddings · 7 noise samples · restoring clean states into the corrupted run")
    assert f"its top {DEFAULT_VERIFY} cells exact (outlined)" in shown_words([verified], last=True, mode="verified")
    windowed = shown_words(phases(replace(config, window=3), "verified"), last=True, mode="verified")
    assert windowed.startswith("<b>EXACT</b> map (exact at once: a window's estimate costs more")
    assert "the image swapped for its partner (one sample)" in shown_words(
        [TraceConfig(corruption=ImageSwap(demo_sample.image), samples=1)], last=True)
    assert "swapped for 'what is the color of the circle?'" in shown_words(
        [TraceConfig(corruption=WordSwap(question="what is the color of the circle?"), corrupt="question",
                     samples=1)], last=True)
    vision = TraceConfig(block="vision_encoder", corruption=Blur(4.0, region=Box(0, 0, 0.5, 0.5)), samples=1,
                         regions=4, direction="noise")
    assert shown_words([vision], last=True) == ("<b>EXACT</b> map · blur pixels, sigma 4, on the pixels inside the "
                                                "box · one sample (nothing is drawn) · patching corrupted states into "
                                                "the clean run")


@lengthy
def test_sliders_keep_their_width_beside_the_method_toggle(explorer):
    """The noise slider shrank to a bare handle at 1400 px: the method toggle now has a row of its own and sliders a
    width they keep (a narrow window wraps the row); tests/test_browser.py measures the track."""
    rows = [child for child in explorer.children[1].children if isinstance(child, type(explorer.children[0]))]
    holding = {id(c): r for r in rows for c in r.children}
    assert holding[id(explorer.method)].children == (explorer.method,)
    assert explorer.method not in holding[id(explorer.noise)].children
    for slider in (explorer.noise, explorer.window):
        assert slider.layout.flex == "0 0 auto" and slider.layout.min_width == "320px"
    assert all(r.layout.flex_flow == "row wrap" for r in rows)


@lengthy
def test_background_work_is_cancelled_and_waited_for_on_request(demo_bundle, demo_sample):
    """What the interpreter's exit runs (atexit): every explorer's background traces cancelled and joined, none
    left running; the explorer carries on after."""
    from blip_trace_widgets.widgets import live

    image, question, _ = demo_sample
    explorer = TraceExplorer(demo_bundle, image, question, background=True)
    explorer.noise_samples.value = 50  # a longer trace, still in flight when it is cancelled
    threads = list(explorer._threads)
    assert live.cancel_background_work(timeout=120) == 0
    assert not any(t.is_alive() for t in threads) and not set(threads) & set(live._RUNNING)
    explorer.noise_samples.value = 2
    explorer.wait()
    assert explorer.result.config["samples"] == 2 and explorer.error.value == ""


@lengthy
def test_the_vision_explorer_opens_on_its_exact_map_where_it_is_quick(demo_bundle):
    from blip_trace_widgets.widgets import VisionTraceExplorer

    explorer = VisionTraceExplorer(demo_bundle, background=False, regions=2, noise_samples=2)
    assert explorer.method.value == "exact" and not explorer.result.is_estimate
    assert "<b>EXACT</b> map · Gaussian (ROME), scale 3, on the patch embeddings · 2 noise samples" in \
        explorer.status.value
    assert VisionTraceExplorer(demo_bundle, background=False, regions=2, noise_samples=2,
                               mode="estimate").result.is_estimate


@lengthy
def test_a_captioners_starting_caption_and_word_are_kept_or_refused_inside():
    from blip_trace_widgets import load_model
    from blip_trace_widgets.causal_trace.tracer import default_config

    captioner = load_model("demo-caption")
    explorer = TraceExplorer(captioner, background=False, config=default_config(captioner, samples=2, word=2))
    assert explorer.word.value == 2 and explorer.result.config["word"] == 2 and explorer.error.value == ""
    explorer = TraceExplorer(captioner, background=False, config=default_config(captioner, samples=2, word=9))
    assert "word 9 is past the caption's 3 words (0 to 2)" in explorer.error.value.replace("&#x27;", "'")
    explorer = TraceExplorer(captioner, background=False,
                             config=default_config(captioner, samples=2, answer="a blue circle", word=1))
    assert explorer.caption_box.value == "a blue circle" and explorer.result.scored == "caption word 'blue'"
