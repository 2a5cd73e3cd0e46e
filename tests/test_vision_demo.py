"""Image-side tracing on the demo model: the shape's region, overlays, and the VisionTraceExplorer."""
from __future__ import annotations

import numpy as np
import pytest
from fast_subset import lengthy
from PIL import Image

from blip_trace_widgets import GaussianNoise, TraceConfig, Tracer, TraceResult
from blip_trace_widgets.causal_trace.plots import effect_map, overlay_image
from blip_trace_widgets.core.regions import same_size_elsewhere
from blip_trace_widgets.datasets.easy_vqa import shape_box
from blip_trace_widgets.datasets.subsets import load_vqa_subset, open_image


def _colour_images(count):
    seen, out = set(), []
    for sample in load_vqa_subset("easy-vqa-color", limit=200):
        if sample.image.path not in seen:
            seen.add(sample.image.path)
            out.append(sample)
        if len(out) == count:
            return out
    return out


def test_shape_box_is_found_from_pixels():
    image = Image.new("RGB", (64, 64), (10, 200, 30))
    image.paste((200, 0, 0), (16, 8, 32, 40))
    box = shape_box(image)
    assert (box.left, box.top, box.right, box.bottom) == (0.25, 0.125, 0.5, 0.625)
    with pytest.raises(ValueError, match="no shape"):
        shape_box(Image.new("RGB", (8, 8), "white"))


@lengthy
def test_noise_on_the_shape_destroys_the_answer_more_than_noise_elsewhere(demo_bundle):
    """3σ patch noise on the shape's box against a same-size box elsewhere, on 8 easy-VQA colour images."""
    on_shape, elsewhere = [], []
    for sample in _colour_images(12):
        image = open_image(sample.image)
        tracer = Tracer(demo_bundle, image, sample.question)
        assert tracer.model_answer == sample.answer
        box = shape_box(image)
        control = same_size_elsewhere(box, tracer.clean.image_embeds.shape[1])
        if control is None:  # a shape too large to leave room for a same-size box
            continue
        assert not (control.token_mask(65) & box.token_mask(65)).any()
        if len(on_shape) == 8:
            break
        for region, out in ((box, on_shape), (control, elsewhere)):
            low, high = tracer.baselines(TraceConfig(block="vision_encoder", samples=10,
                                                     corruption=GaussianNoise(3.0, region=region)))
            out.append(low / high)
    on_shape, elsewhere = np.array(on_shape), np.array(elsewhere)
    assert len(on_shape) == 8
    assert on_shape.mean() < 0.4, on_shape  # the answer is mostly gone
    assert elsewhere.mean() > 0.6, elsewhere  # the answer mostly stays
    assert (on_shape < elsewhere).sum() >= 6, (on_shape, elsewhere)


@pytest.fixture(scope="module")
def vision_result(demo_bundle, demo_sample):
    return Tracer(demo_bundle, demo_sample.image, demo_sample.question).trace(
        block="vision_encoder", regions=4, samples=4, corruption=GaussianNoise(3.0))


@lengthy
def test_overlay_is_the_size_of_the_input(vision_result, demo_sample):
    overlay = overlay_image(vision_result, layer=1)
    assert overlay.size == demo_sample.image.size
    big = demo_sample.image.resize((200, 150))
    assert overlay_image(vision_result, big, layer=0).size == (200, 150)
    painted = np.asarray(overlay, dtype=float) - np.asarray(demo_sample.image, dtype=float)
    assert np.abs(painted).mean() > 1  # the colour map shows
    values = effect_map(vision_result, 1, (64, 64))
    normalized = vision_result.normalized()
    assert values[0, 0] == pytest.approx(normalized[1, 1]) and values[63, 63] == pytest.approx(normalized[16, 1])


@lengthy
def test_plot_on_image_small_multiples_and_loaded_results(vision_result, demo_sample, tmp_path):
    figure = vision_result.plot_on_image()
    assert len(figure.axes) == vision_result.num_layers + 1  # one panel per layer and the colour bar
    assert len(vision_result.plot_on_image(layer=2).axes) == 2
    loaded = TraceResult.load(vision_result.save(tmp_path / "v.json"))
    with pytest.raises(ValueError, match="pass image="):
        loaded.plot_on_image()
    assert loaded.plot_on_image(demo_sample.image, layer=0)._repr_png_()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="layer must be between"):
        overlay_image(vision_result, layer=9)


@lengthy
def test_plot_on_image_refuses_text_traces(demo_bundle, demo_sample):
    text = Tracer(demo_bundle, demo_sample.image, demo_sample.question).trace(samples=2)
    with pytest.raises(ValueError, match="block='vision_encoder'"):
        overlay_image(text, demo_sample.image, layer=0)


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_vision_explorer_follows_its_controls(demo_bundle):
    from blip_trace_widgets.widgets import VisionTraceExplorer

    explorer = VisionTraceExplorer(demo_bundle, background=False, regions=4, noise_samples=2)
    first = explorer.result
    assert first is not None and first.block == "vision_encoder" and len(first.tokens) == 17
    assert explorer.overlay.value[:4] == b"\x89PNG" and explorer.error.value == ""
    assert explorer.window.disabled and explorer.box_x.disabled
    explorer.layer.value = 2  # redraws only
    assert explorer.result is first
    explorer.area.value = "inside"
    explorer.box_x.value, explorer.box_y.value = (0, 50), (50, 100)
    assert explorer.result.config["corruption"]["region"] == {"box": [0.0, 0.5, 0.5, 1.0]}
    explorer.corruption.value = "grey"
    assert explorer.level.disabled and explorer.result.config["corruption"]["type"] == "grey"
    explorer.kind.value = "mlp"
    assert not explorer.window.disabled and explorer.result.kind == "mlp"
    explorer.box_x.value = (40, 40)  # an empty box: the error shows inside, the widget carries on
    assert "left &lt; right" in explorer.error.value
    explorer.box_x.value = (10, 60)
    assert explorer.error.value == ""
    explorer.gallery.value = 1
    assert explorer.result.config["question"] == explorer.gallery_items[1][1]
    explorer.all_layers.value = True
    assert explorer.layer.disabled


@lengthy
def test_vision_explorer_in_the_background(demo_bundle):
    from blip_trace_widgets.widgets import VisionTraceExplorer

    explorer = VisionTraceExplorer(demo_bundle, regions=2, noise_samples=2)
    explorer.regions.value = 4
    explorer.wait()
    assert explorer.result is not None and len(explorer.result.tokens) == 17
    explorer.question_box.value = "   "
    explorer.wait()
    assert "question is empty" in explorer.error.value


@lengthy
def test_vision_explorer_estimates_every_patch_at_every_layer(demo_bundle):
    from blip_trace_widgets.widgets import VisionTraceExplorer

    explorer = VisionTraceExplorer(demo_bundle, background=False, regions=2, noise_samples=2)
    explorer.method.value = "estimate"
    explorer.regions.value = demo_bundle.patch_grid_side  # every patch its own region
    result = explorer.result
    assert result.is_estimate and "ESTIMATE" in explorer.status.value
    assert result.scores.shape == (demo_bundle.patch_grid_side ** 2 + 1, demo_bundle.num_layers("vision_encoder"))
    assert np.isfinite(result.scores).all()
