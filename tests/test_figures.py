"""Figures that cannot mislead: ROME's colour scale, what was done on the figure's face, tiny effects flagged.

Each check reads the figure's own objects (the colour mesh's limits and colour map, titles, texts, patches).
"""
from __future__ import annotations

import re

import numpy as np
import pytest
from fast_subset import lengthy

from blip_trace_widgets import Box, GaussianNoise, Tracer, TraceResult, default_config
from blip_trace_widgets.causal_trace.averages import average_trace
from blip_trace_widgets.causal_trace.plots import (
    TINY_TEXT,
    effect_map,
    overlay_image,
    plot_on_image,
    plot_trace,
    plot_traces,
)


@pytest.fixture(scope="module")
def tracer(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    return Tracer(demo_bundle, image, question)


def _mesh(ax):
    return next(c for c in ax.collections if hasattr(c, "get_clim"))


def _texts(ax):
    return [t.get_text() for t in ax.texts]


def _colour(ax, value):
    mesh = _mesh(ax)
    return np.asarray(mesh.cmap(mesh.norm(value)))[:3]


def _is_white(rgb):
    return bool(np.all(rgb > 0.93))


def _cmap(name):
    from matplotlib import colormaps

    return colormaps[name]


@lengthy
def test_single_heatmap_scale_runs_from_corrupted_to_clean(tracer, demo_bundle):
    result = tracer.trace(default_config(demo_bundle, samples=4))
    ax = plot_trace(result)
    assert _is_white(_colour(ax, result.low_score))  # nothing restored: white
    assert np.allclose(_colour(ax, result.high_score), _cmap("Purples")(1.0)[:3], atol=0.02)  # clean: full colour
    low, high = _mesh(ax).get_clim()
    assert high == pytest.approx(result.high_score)
    assert min(result.scores.min(), result.low_score) - 1e-12 <= low <= result.low_score  # never past the data
    assert "white at corrupted, full colour at clean" in ax.figure.axes[-1].get_ylabel().replace("\n", " ")
    title = ax.get_title(loc="left").replace("\n", " ")
    assert "total effect" in title and "4 noise samples" in title and "gaussian" in title and "image embeddings" in title
    assert not result.is_tiny() and TINY_TEXT not in _texts(ax)
    assert ax.figure.get_size_inches()[0] * ax.figure.dpi >= 600  # legible at a glance


@lengthy
def test_a_corruption_that_raises_the_score_is_drawn_toward_clean(tracer, demo_bundle):
    """An answer the model does not give: the corruption raises its probability (a negative total effect). The
    colour still runs from the corrupted score toward the clean one, downward: the cell nearest the clean score is
    drawn far from white, and the scale never runs past a probability's range."""
    result = tracer.trace(default_config(demo_bundle, samples=6, answer="blue"))
    assert result.total_effect < 0
    ax = plot_trace(result, tiny=None)
    assert _is_white(_colour(ax, result.low_score))
    nearest = result.scores.flat[np.argmin(np.abs(result.scores - result.high_score))]
    assert abs(nearest - result.high_score) < abs(result.total_effect) / 2, "a cell brings the clean score back"
    assert np.abs(_colour(ax, nearest) - _colour(ax, result.low_score)).max() > 0.2
    low, high = _mesh(ax).get_clim()
    assert 0.0 <= low and high <= 1.0  # p(answer): never past where a probability can go


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("normalized", [False, True])
def test_both_directions_of_a_negative_total_effect(direction, normalized):
    """Corrupted 0.6, clean 0.1: a cell near the full end (clean when restoring, corrupted when noising) is far
    from white, a cell past where nothing is patched is blue, in both directions and normalised too."""
    white, full = (0.6, 0.1) if direction == "denoise" else (0.1, 0.6)
    near, against = full + (0.02 if direction == "denoise" else -0.02), white + (0.05 if direction == "denoise" else -0.05)
    scores = np.array([[white, near, against, (white + full) / 2]])
    result = TraceResult(scores, 0.6, 0.1, "no", ["x"], "question_encoder", "hidden", 1,
                         config={"direction": direction, "metric": "prob"})
    ax = plot_trace(result, normalized=normalized, tiny=None)
    values = result.normalized()[0] if normalized else scores[0]
    assert _is_white(_colour(ax, values[0]))
    assert np.abs(_colour(ax, values[1]) - _colour(ax, values[0])).max() > 0.3
    rgb = _colour(ax, values[2])
    assert rgb[2] > rgb[0] + 0.02 and not _is_white(rgb)  # against the direction: blue, visible


@lengthy
def test_effects_against_the_direction_are_blue_in_every_kind(tracer, demo_bundle):
    """One colour language: effects against the trace's direction are blue, and no kind draws its effects in blue
    (cross-attention used to)."""
    from blip_trace_widgets.core.names import AGAINST_COLORMAP, KIND_COLORMAPS

    assert AGAINST_COLORMAP == "Blues"
    assert all("Bu" not in name and "Blu" not in name for name in KIND_COLORMAPS.values())
    result = tracer.trace(default_config(demo_bundle, samples=4, kind="cross_attn"))
    ax = plot_trace(result, tiny=None)
    low = _mesh(ax).get_clim()[0]
    if low < result.low_score:  # some cell falls below the corrupted score: drawn blue
        rgb = _colour(ax, low)
        assert rgb[2] > rgb[0] + 0.05


@lengthy
def test_top_max_and_normalised_scales(tracer, demo_bundle):
    result = tracer.trace(default_config(demo_bundle, samples=4))
    top = plot_trace(result, top="max")
    assert _mesh(top).get_clim()[1] == pytest.approx(result.scores.max())
    assert "furthest cell" in top.figure.axes[-1].get_ylabel().replace("\n", " ")
    normalized = plot_trace(result, normalized=True)
    assert _mesh(normalized).get_clim() == (-1.0, 1.0)


@lengthy
def test_tiny_total_effect_is_greyed_and_flagged(tracer):
    result = tracer.trace(corruption=GaussianNoise(0.3), samples=4)
    assert result.is_tiny()
    ax = plot_trace(result)
    assert TINY_TEXT in _texts(ax)
    assert _mesh(ax).get_cmap().name == "Greys"
    assert list(plot_trace(result, tiny=None).texts) == []  # the caller can switch the flag off


@lengthy
def test_question_corruption_marks_the_corrupted_tokens(tracer):
    result = tracer.trace(corrupt="question", corrupt_tokens="object", corruption=GaussianNoise(6.0), samples=3)
    labels = [t.get_text() for t in plot_trace(result).get_yticklabels()]
    marked = [i for i, label in enumerate(labels) if label.endswith("*")]
    assert marked == result.config["corrupted_positions"] and marked


@lengthy
def test_compare_view_shares_one_scale(tracer, demo_bundle):
    results = [tracer.trace(default_config(demo_bundle, kind=k, window=1 if k == "hidden" else 3, samples=3))
               for k in ("hidden", "mlp")]
    figure = plot_traces(results)
    limits = {tuple(np.round(_mesh(ax).get_clim(), 9)) for ax in figure.axes if ax.collections and ax.get_title(loc="left")}
    assert len(limits) == 1


@lengthy
def test_averaged_heatmap_shows_its_real_range():
    import pandas as pd

    rows = [{"sample": i, "config": 0, "block": "question_encoder", "kind": "hidden", "window": 1, "corruption": "{}",
             "tokens": ["[CLS]", "a", "[SEP]"], "scores": s, "low_score": 0.1, "high_score": 0.9, "num_layers": 2,
             "correct": True}
            for i, s in enumerate([[[0.1, 0.5], [0.2, 0.3], [0.1, 0.1]], [[0.3, 0.7], [0.1, 0.2], [0.1, 0.0]]])]
    average = average_trace(pd.DataFrame(rows), form="rome", by="position")
    from blip_trace_widgets.sweeps.plots import plot_average_heatmaps

    ax = plot_trace(average, top="range", tiny=None)
    assert _mesh(ax).get_clim() == pytest.approx((np.nanmin(average.scores), np.nanmax(average.scores)))
    assert "range" in ax.figure.axes[-1].get_ylabel().replace("\n", " ")
    figure = plot_average_heatmaps(pd.DataFrame(rows), form="rome")
    assert "2 questions" in figure.axes[0].get_title(loc="left")


@lengthy
def test_vision_overlay_is_transparent_where_nothing_is_restored(tracer):
    result = tracer.trace(block="vision_encoder", regions=2, samples=3, corruption=GaussianNoise(3.0, region=Box(0, 0, 0.5, 0.5)))
    picture = np.asarray(overlay_image(result, layer=0), dtype=float) / 255
    grey = np.asarray(result.image.convert("L"), dtype=float)[..., None] / 255
    base = 0.55 + 0.45 * grey
    values = result.normalized()[1:, 0]
    field = effect_map(result, 0, result.image.size)
    untouched = (field <= 0) | np.isnan(field)
    if untouched.any():  # no effect: the faint grey image, uncoloured
        np.testing.assert_allclose(picture[untouched], np.broadcast_to(base, picture.shape)[untouched], atol=1 / 255 + 1e-9)
    assert (values > 0).any()
    figure = plot_on_image(result)
    assert "total effect" in figure._suptitle.get_text()
    boxes = [p for ax in figure.axes for p in ax.patches]
    assert len(boxes) == result.num_layers  # the corrupted box, outlined on every layer's panel


@pytest.mark.slow
def test_readme_snippet_shows_a_png_in_a_kernel(tmp_path):
    """The README's Python example, run in a kernel: `result.plot()` as a cell's value shows the figure."""
    from pathlib import Path

    import nbformat
    from nbclient import NotebookClient

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = re.search(r"In Python:\n\n```python\n(.*?)```", text, re.S).group(1)
    lines = [line.split("#")[0].rstrip() for line in snippet.strip().splitlines()]
    plot_at = next(i for i, line in enumerate(lines) if line.endswith(".plot()"))
    cells = [nbformat.v4.new_code_cell("\n".join(lines[:plot_at])), nbformat.v4.new_code_cell(lines[plot_at])]
    notebook = nbformat.v4.new_notebook(cells=cells)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = notebook.cells[1].outputs
    assert any("image/png" in o.get("data", {}) for o in outputs), outputs


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_the_explorers_renderer_draws_what_heatmap_png_draws(tracer, demo_bundle):
    """Reusing a layout must not change a pixel: other settings of one question, then another shape of map."""
    import io

    from PIL import Image

    from blip_trace_widgets.causal_trace.plots import HeatmapRenderer, heatmap_png

    renderer = HeatmapRenderer()
    config = default_config(demo_bundle, samples=3)
    results = [tracer.trace(config, kind="mlp", window=3, seed=seed) for seed in (0, 1)]
    results += [tracer.trace(config, kind="mlp", window=3, method="estimate"), tracer.trace(config, block="answer_decoder")]
    for result in results:
        for normalized in (False, True):
            ours, theirs = (np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
                            for png in (renderer.png(result, normalized=normalized),
                                        heatmap_png(result, normalized=normalized)))
            assert ours.shape == theirs.shape and np.array_equal(ours, theirs), (result.kind, result.block, normalized)
    assert renderer.layouts < 2 * len(results)  # some redraws reused a layout


@pytest.mark.parametrize("normalized", [False, True])
def test_an_image_overlay_of_a_negative_total_effect_colours_what_brings_clean_back(normalized):
    """Corrupted 0.6, clean 0.1: the left region brings the clean score back and is painted in the effect's
    colour, never in the blue kept for effects against the direction; the right region restores nothing."""
    from PIL import Image

    result = TraceResult(np.array([[0.6], [0.12], [0.6]]), 0.6, 0.1, "no", ["CLS", "left", "right"],
                         "vision_encoder", "hidden", 1,
                         config={"metric": "prob", "grid": {"boxes": [None, [0, 0, 0.5, 1], [0.5, 0, 1, 1]]}})
    picture = np.asarray(overlay_image(result, Image.new("RGB", (40, 20), "white"), layer=0, normalized=normalized),
                         dtype=float) / 255
    left, right = picture[:, :20].reshape(-1, 3).mean(0), picture[:, 20:].reshape(-1, 3).mean(0)
    assert np.allclose(right, right[0], atol=0.01)  # grey: nothing restored, transparent
    assert left[0] > left[2] + 0.2  # YlOrRd, not blue
