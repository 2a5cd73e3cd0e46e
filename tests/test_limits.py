"""No input gives a wrong answer quietly, and nothing grows without bound."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from fast_subset import lengthy

from blip_trace_widgets import BlipTraceError, Blur, Box, GaussianNoise, TraceConfig, Tracer, TraceResult, trace


def test_noise_samples_that_would_not_fit_are_refused_before_allocating(tiny_bundle, image, question, monkeypatch):
    from blip_trace_widgets.causal_trace import corrupted

    tracer = Tracer(tiny_bundle, image, question)
    monkeypatch.setattr(corrupted, "available_memory", lambda: tracer.corrupted_runs.run_bytes(4, False))
    with pytest.raises(BlipTraceError, match="use at most 3 samples"):
        tracer.trace(samples=10)
    assert tracer.stats["corrupted_passes"] == 0
    assert np.isfinite(tracer.trace(samples=3).scores).all()


@pytest.mark.parametrize("make, message", [
    (lambda: TraceConfig(samples=100_000), "samples must be between 1 and 1000"),
    (lambda: Blur(1e5), "wider than any model input"),
    (lambda: GaussianNoise(float("inf")), "finite"),
    (lambda: GaussianNoise(1e30 * 0 + float("nan")), "finite"),
    (lambda: GaussianNoise("3"), "must be a number"),
    (lambda: GaussianNoise(3.0, region="abc"), "region must be a Box"),
    (lambda: TraceConfig(seed=2**32), "seed must be between 0 and 4294967295"),
    (lambda: TraceConfig(seed=1.5), "seed must be an integer"),
    (lambda: TraceConfig(samples=True), "samples must be an integer"),
    (lambda: TraceConfig(answer=123), "answer must be a string"),
    (lambda: TraceConfig(corrupt="question", corrupt_tokens=3), "corrupt_tokens must be a list"),
    (lambda: TraceConfig(corrupt="question", corruption=GaussianNoise(3.0, region=Box(0, 0, 1, 1))), "a region picks"),
])
def test_bad_settings_are_refused_at_the_boundary(make, message):
    with pytest.raises(BlipTraceError, match=message):
        make()


def test_a_corruption_returning_nan_is_refused(tiny_bundle, image, question):
    def broken(clean, samples, generator):
        return torch.full((samples, *clean.shape[1:]), float("nan"))

    with pytest.raises(BlipTraceError, match="NaN or infinite"):
        trace(tiny_bundle, image, question, corruption=broken, samples=2)


def test_saved_results_are_strict_json(tiny_bundle, image, question, tmp_path):
    result = trace(tiny_bundle, image, question, samples=1)  # one sample: standard errors are NaN
    assert np.isnan(result.stderr).all()
    path = result.save(tmp_path / "r.json")

    def refuse(token):
        raise ValueError(f"bare {token} in the JSON")

    data = json.loads(path.read_text(), parse_constant=refuse)
    assert data["format"] == 3 and data["stderr"][0][0] is None and len(data["draws"]) == 1
    assert TraceResult.load(path) == result


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"), ('{"scores": [[1]]}', "not a saved TraceResult"), ("[1, 2]", "not a saved TraceResult"),
])
def test_foreign_or_truncated_json_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(BlipTraceError, match=message):
        TraceResult.load(path)


@lengthy
def test_long_answers_are_scored_in_log_space(tiny_bundle, image, question):
    answer = " ".join(["red blue green"] * 4)  # 12 tokens: a product of 12 probabilities
    prob = trace(tiny_bundle, image, question, answer=answer, metric="prob", samples=1)  # one sample: no mean of exps
    logprob = trace(tiny_bundle, image, question, answer=answer, metric="logprob", samples=1)
    assert (prob.scores > 0).all()  # no underflow to exactly 0
    np.testing.assert_allclose(prob.scores, np.exp(logprob.scores), rtol=1e-5)
    too_long = " ".join(["red"] * 40)  # the tiny model reads 16 positions
    with pytest.raises(BlipTraceError, match="the decoder reads at most"):
        trace(tiny_bundle, image, question, answer=too_long, samples=1)


def test_blank_and_wide_range_images(tiny_bundle, question):
    from PIL import Image

    from blip_trace_widgets.core.inputs import ImageRangeWarning, to_rgb_image

    # as BLIP's processor converts them (PIL's 8-bit conversion), with a warning that says so and how to rescale
    sixteen = Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16))
    with pytest.warns(ImageRangeWarning, match="values from 0 to 63960.*clipped"):
        assert sixteen.mode == "I;16" and np.asarray(to_rgb_image(sixteen)).mean() > 250  # as the model sees it
    white = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    with pytest.warns(ImageRangeWarning):
        assert np.asarray(to_rgb_image(white)).min() == 255  # a flat white 16-bit image is white, not black
    floating = Image.fromarray(np.linspace(0, 0.5, 1600, dtype=np.float32).reshape(40, 40))
    with pytest.warns(ImageRangeWarning, match="truncated"):
        assert np.asarray(to_rgb_image(floating)).max() == 0
    with pytest.raises(BlipTraceError, match="NaN or infinite"):
        to_rgb_image(Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32)))
    with pytest.raises(BlipTraceError, match="empty"):
        to_rgb_image(np.zeros((0, 0, 3), dtype=np.uint8))


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    from blip_trace_widgets.core.inputs import to_rgb_image

    wide = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° when shown
    wide.save(tmp_path / "rotated.jpg", exif=exif)
    assert to_rgb_image(tmp_path / "rotated.jpg").size == (20, 40)


@pytest.mark.slow
def test_an_explorer_browsing_many_questions_keeps_memory_bounded(demo_bundle, monkeypatch):
    from blip_trace_widgets import demo_samples, widgets

    monkeypatch.setattr(widgets.live, "TRACER_MEMORY", 3 << 20)  # read when an explorer is made
    gallery = [(s.image, s.question) for s in demo_samples(per_type=6)]
    explorer = widgets.TraceExplorer(demo_bundle, gallery=gallery, background=False)
    for index in range(len(gallery)):
        explorer.gallery.value = index
    kept = list(explorer._tracers._entries.values())
    assert len(gallery) >= 12 and 1 <= len(kept) < len(gallery)
    newest = kept[-1].held_bytes()
    assert sum(t.held_bytes() for t in kept) <= (3 << 20) + newest  # the budget, plus the one on screen


@lengthy
def test_export_errors_show_inside_the_widget(demo_bundle, tmp_path):
    from blip_trace_widgets.widgets import TraceExplorer

    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    explorer = TraceExplorer(demo_bundle, background=False, export_dir=blocker / "sub")
    assert explorer.export("png") is None
    assert "could not save" in explorer.error.value


def test_sweep_questions_are_named_by_content():
    from PIL import Image

    from blip_trace_widgets.sweeps.sweep import question_id

    one = Image.new("RGB", (8, 8), "red")
    assert question_id(one, "what?", "red") == question_id(one.copy(), "what?", "red")
    assert question_id(one, "what?", "red") != question_id(Image.new("RGB", (8, 8), "blue"), "what?", "red")
    assert question_id(one, "what?", "red") != question_id(one, "what?", "blue")


def test_results_of_infinite_levels_never_reach_json(tiny_bundle, image, question):
    assert math.isfinite(trace(tiny_bundle, image, question, samples=2, corruption=GaussianNoise(1e3)).low_score)


def test_threads_follow_the_free_cores(monkeypatch):
    from blip_trace_widgets.core import threads

    monkeypatch.delenv("BLIP_TRACE_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(threads, "_busy_now", lambda: 0.0)
    assert threads.choose_threads() == 4
    monkeypatch.setattr(threads, "_busy_now", lambda: 3.0)
    assert threads.choose_threads() == 1
    monkeypatch.setattr(threads, "_busy_now", lambda: 9.0)
    assert threads.choose_threads() == 1  # never fewer than one
    monkeypatch.setenv("BLIP_TRACE_THREADS", "3")
    assert threads.choose_threads() == 3
    monkeypatch.setattr(threads, "_APPLIED", False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.delenv("BLIP_TRACE_THREADS")
    assert threads.use_sensible_threads() is None  # the user's OMP_NUM_THREADS is kept


def test_a_decompression_bomb_is_refused_in_one_line(tmp_path, monkeypatch):
    from PIL import Image

    from blip_trace_widgets.core.inputs import to_rgb_image

    path = tmp_path / "big.png"
    Image.new("RGB", (200, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 40,000 pixels is then more than twice the limit
    with pytest.raises(BlipTraceError, match="too large to open safely"):
        to_rgb_image(path)


@lengthy
def test_a_dataset_sigma_sets_the_noise_level(demo_bundle):
    """GaussianNoise(sigma=...) uses that σ, not the input's own; estimate_sigma gives ROME's kind of σ."""
    from blip_trace_widgets import demo_samples, estimate_sigma

    clean = torch.full((1, 50, 40), 7.0) + torch.randn(1, 50, 40, generator=torch.Generator().manual_seed(1))
    drawn = GaussianNoise(2.0, sigma=0.5)(clean, 4, torch.Generator().manual_seed(0)) - clean
    assert float(drawn.std()) == pytest.approx(1.0, rel=0.05)  # scale 2 × σ 0.5
    own = GaussianNoise(2.0)(clean, 4, torch.Generator().manual_seed(0)) - clean
    assert float(own.std()) == pytest.approx(2.0 * float(clean.std()), rel=0.05)
    samples = demo_samples()[:3]
    sigma = estimate_sigma(demo_bundle, samples)
    embeds = [Tracer(demo_bundle, s.image, s.question).clean_pass.embed_image(s.image).flatten() for s in samples]
    assert sigma == pytest.approx(float(torch.cat(embeds).std()), rel=1e-5)
    with pytest.raises(BlipTraceError, match="unknown stage"):
        estimate_sigma(demo_bundle, samples, stage="nowhere")
