"""Images of every PIL mode are traced as BLIP's processor sees them: the clean caption or answer is generate()'s."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from blip_trace_widgets import Tracer, load_model


def _cutout(image: Image.Image) -> Image.Image:
    """The image with its white background made transparent over black: alpha 0 where the pixel is near white."""
    rgb = np.asarray(image.convert("RGB")).copy()
    background = rgb.min(-1) > 230
    rgb[background] = 0
    alpha = np.where(background, 0, 255).astype(np.uint8)
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def _modes(image: Image.Image) -> dict[str, Image.Image]:
    rgba = _cutout(image)
    grey = np.asarray(image.convert("L")).astype(np.float64)
    palette = rgba.convert("RGB").quantize(16)
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])  # the corner's colour, the background
    return {
        "RGBA": rgba,
        "LA": rgba.convert("LA"),
        "P with transparency": palette,
        "I;16": Image.fromarray((grey * 257).astype(np.uint16)),
        "F": Image.fromarray((grey / 255).astype(np.float32)),
    }


def _said(bundle, image, text):
    inputs = bundle.processor(images=image, text=text or None, return_tensors="pt")
    out = bundle.model.generate(**inputs, max_new_tokens=20)
    return bundle.tokenizer.decode(out[0], skip_special_tokens=True).strip()


@pytest.mark.slow
def test_clean_caption_and_answer_are_generates_on_every_mode(demo_sample):
    captioner, vqa = load_model("demo-caption"), load_model("demo")
    image, question, _ = demo_sample
    modes = _modes(image)
    assert modes["I;16"].mode == "I;16" and modes["F"].mode == "F" and modes["P with transparency"].mode == "P"
    said = set()
    for name, picture in modes.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            caption, answer = Tracer(captioner, picture, "").model_answer, Tracer(vqa, picture, question).model_answer
            assert caption == _said(captioner, picture, ""), name
            assert answer == _said(vqa, picture, question), name
        said.add(caption)
    assert len(said) > 1  # the modes do give the model different images: the check could fail


def test_transparency_is_composited_as_the_processor_does(demo_sample):
    from blip_trace_widgets.core.inputs import processor_rgb, to_rgb_image

    rgba = _cutout(demo_sample[0])
    ours = np.asarray(to_rgb_image(rgba))
    assert np.array_equal(ours, np.asarray(processor_rgb(rgba)))
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:  # transformers 5 puts transparency on white
        assert ours[0, 0].tolist() == [255, 255, 255]
