"""Facts of causal tracing that hold for any model, checked on a tiny BLIP."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from fast_subset import lengthy
from PIL import Image
from tolerance import assert_close, within_rounding

from blip_trace_widgets import (
    GaussianNoise,
    ImageSwap,
    MultiplicativeNoise,
    TraceConfig,
    Tracer,
    TraceResult,
    UniformNoise,
    trace,
)


@lengthy
def test_restoring_all_of_last_layer_gives_high_score(tiny_bundle, image, question):
    tracer = Tracer(tiny_bundle, image, question)
    config = TraceConfig(samples=4)
    last = len(tracer.blocks["question_encoder"].stack) - 1
    everything = tuple((last, p) for p in range(len(tracer.question_ids)))
    low, high = tracer.baselines(config)
    (restored, nothing), _ = tracer.restore([everything, ()], config)
    assert low < high
    assert restored == within_rounding(high)  # float32, two summation orders
    assert nothing == within_rounding(low)


def test_restoring_all_of_decoder_last_layer_gives_high_score(tiny_bundle, image, question):
    tracer = Tracer(tiny_bundle, image, question)
    config = TraceConfig(block="answer_decoder", samples=3, answer="red blue")
    last = len(tracer.blocks["answer_decoder"].stack) - 1
    low, high = tracer.baselines(config)
    (restored, nothing), _ = tracer.restore([((last, 0), (last, 1)), ()], config)
    assert restored == pytest.approx(high, rel=1e-6)
    assert nothing == pytest.approx(low, rel=1e-6)


@lengthy
def test_seeds_reproduce_and_differ(tiny_bundle, image, question):
    a = trace(tiny_bundle, image, question, samples=3, seed=11)
    b = trace(tiny_bundle, image, question, samples=3, seed=11)
    c = trace(tiny_bundle, image, question, samples=3, seed=12)
    assert np.array_equal(a.scores, b.scores) and a.low_score == b.low_score
    assert not np.array_equal(a.scores, c.scores)


def test_result_fields_and_round_trip(tiny_bundle, image, question, tmp_path):
    result = trace(tiny_bundle, image, question, kind="mlp", window=3, samples=2,
                   corruption=MultiplicativeNoise(std=5.0))
    assert result.tokens == ["[CLS]", "what", "color", "is", "the", "shape", "?", "[SEP]"]
    assert result.scores.shape == (8, 3)
    assert result.config["corruption"] == {"type": "multiplicative", "std": 5.0}
    assert result.config["question"] == question
    path = result.save(tmp_path / "r.json")
    loaded = TraceResult.load(path)
    assert loaded == result
    assert np.array_equal(loaded.scores, result.scores) and loaded.scores.dtype == np.float64
    assert loaded.low_score == result.low_score and loaded.high_score == result.high_score
    frame = result.to_dataframe()
    assert len(frame) == 8 * 3
    assert set(frame.columns) >= {"token", "layer", "score", "normalized", "kind", "block"}
    norm = result.normalized()
    np.testing.assert_allclose(norm, (result.scores - result.low_score) / (result.high_score - result.low_score))


@lengthy
def test_image_forms_agree(tiny_bundle, image, question, tmp_path):
    path = tmp_path / "image.png"
    image.save(path)
    by_pil = trace(tiny_bundle, image, question, samples=2).scores
    by_path = trace(tiny_bundle, str(path), question, samples=2).scores
    by_array = trace(tiny_bundle, np.asarray(image), question, samples=2).scores
    by_rgba = trace(tiny_bundle, image.convert("RGBA"), question, samples=2).scores
    assert np.array_equal(by_pil, by_path) and np.array_equal(by_pil, by_array) and np.array_equal(by_pil, by_rgba)
    grey = trace(tiny_bundle, image.convert("L"), question, samples=2)
    assert grey.scores.shape == by_pil.shape


@lengthy
def test_image_swap_with_same_image_changes_nothing(tiny_bundle, image, question):
    result = trace(tiny_bundle, image, question, samples=2, corruption=ImageSwap(image))
    assert result.low_score == pytest.approx(result.high_score, rel=1e-5)
    assert_close(result.scores, result.high_score)


@lengthy
def test_image_swap_with_other_image_corrupts(tiny_bundle, image, question):
    other = Image.new("RGB", (32, 32), (10, 200, 30))
    result = trace(tiny_bundle, image, question, samples=2, corruption=ImageSwap(other))
    assert abs(result.low_score - result.high_score) > 1e-4
    assert ImageSwap(other) == ImageSwap(other.copy()) and hash(ImageSwap(other)) == hash(ImageSwap(other.copy()))


@lengthy
def test_custom_callable_corruption(tiny_bundle, image, question):
    def zero_out(clean, samples, generator):
        return torch.zeros(samples, *clean.shape[1:])

    result = trace(tiny_bundle, image, question, samples=2, corruption=zero_out)
    assert result.config["corruption"]["type"] == "custom"

    def wrong_shape(clean, samples, generator):
        return clean

    with pytest.raises(ValueError, match="shape"):
        trace(tiny_bundle, image, question, samples=2, corruption=wrong_shape)


@pytest.mark.parametrize("corruption", [GaussianNoise(3.0), UniformNoise(3.0), MultiplicativeNoise(5.0)])
def test_corruptions_shape_and_scale(corruption):
    clean = torch.randn(1, 50, 16) * 2
    out = corruption(clean, 6, torch.Generator().manual_seed(0))
    again = corruption(clean, 6, torch.Generator().manual_seed(0))
    assert out.shape == (6, 50, 16) and torch.equal(out, again)
    noise = out - clean
    sigma = float(clean.std())
    if isinstance(corruption, GaussianNoise):
        assert float(noise.std()) == pytest.approx(3.0 * sigma, rel=0.1)
    elif isinstance(corruption, UniformNoise):
        assert float(noise.abs().max()) <= 3.0 * sigma + 1e-5
        assert float(noise.std()) == pytest.approx(3.0 * sigma / 3**0.5, rel=0.1)
    else:
        ratio = out / clean
        assert float(ratio.mean()) == pytest.approx(1.0, abs=0.3) and float(ratio.std()) == pytest.approx(5.0, rel=0.1)


@lengthy
def test_heatmap_plot(tiny_bundle, image, question):
    from blip_trace_widgets.causal_trace.plots import heatmap_png

    result = trace(tiny_bundle, image, question, samples=2, kind="cross_attn", window=3)
    ax = result.plot()
    assert [t.get_text() for t in ax.get_yticklabels()] == result.tokens
    assert ax.figure.axes[-1].get_ylabel().startswith("p(answer)")
    assert heatmap_png(result).startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "attention"}, "unknown kind"),
        ({"block": "vision"}, "unknown block"),
        ({"window": 0}, "window must be"),
        ({"samples": 0}, "samples must be"),
        ({"metric": "accuracy"}, "unknown metric"),
        ({"metric": "logit_diff"}, "contrast"),
        ({"sever": "mlp", "kind": "mlp"}, "kind='hidden'"),
        ({"sever": "hidden"}, "unknown sever"),
        ({"answer": "zebra"}, "cannot encode"),
        ({"answer": "  "}, "empty"),
        ({"corruption": 3.0}, "corruption must be"),
    ],
)
def test_bad_trace_arguments(tiny_bundle, image, question, kwargs, message):
    with pytest.raises(ValueError, match=message):
        trace(tiny_bundle, image, question, **{"samples": 1, **kwargs})


@pytest.mark.parametrize(
    "bad_image, message",
    [
        ([1, 2, 3], "unsupported image type"),
        (np.zeros((4, 4), dtype=np.uint8), "HxWx3 uint8"),
        (np.zeros((4, 4, 3), dtype=np.float32), "HxWx3 uint8"),
        ("/no/such/file.png", "not found"),
    ],
)
def test_bad_images(tiny_bundle, question, bad_image, message):
    with pytest.raises(ValueError, match=message):
        trace(tiny_bundle, bad_image, question, samples=1)


def test_unreadable_image_file(tiny_bundle, question, tmp_path):
    path = tmp_path / "fake.png"
    path.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read"):
        trace(tiny_bundle, path, question, samples=1)


@pytest.mark.parametrize("bad_question, message", [("", "empty"), ("   ", "empty"), (None, "string"),
                                                    ("what " * 40, "maximum")])
def test_bad_questions(tiny_bundle, image, bad_question, message):
    with pytest.raises(ValueError, match=message):
        trace(tiny_bundle, image, bad_question, samples=1)


def test_non_blip_model_rejected(tiny_bundle, image, question):
    from blip_trace_widgets import load_model

    with pytest.raises(ValueError, match="BlipForQuestionAnswering"):
        load_model((torch.nn.Linear(2, 2), tiny_bundle.processor))
    with pytest.raises(ValueError, match="load_model"):
        trace(tiny_bundle.model, image, question)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@lengthy
def test_half_precision_follows_float32(dtype):
    from blip_trace_widgets import demo_samples, load_model

    image, question, _ = demo_samples()[0]
    full = load_model("demo", device="cpu")
    half = load_model("demo", device="cpu", dtype=dtype)
    assert half.dtype == getattr(torch, dtype)
    kwargs = dict(kind="mlp", window=3, samples=5, corruption=GaussianNoise(10.0))
    a = trace(full, image, question, **kwargs)
    b = trace(half, image, question, **kwargs)
    assert b.config["dtype"] == dtype and b.answer == a.answer
    assert np.isfinite(b.scores).all()
    np.testing.assert_allclose(b.scores, a.scores, atol=0.03)
    assert abs(b.high_score - a.high_score) < 0.02 and abs(b.low_score - a.low_score) < 0.03


@lengthy
def test_progress_reports_every_chunk(tiny_bundle, image, question):
    seen = []
    tracer = Tracer(tiny_bundle, image, question, max_batch_rows=6)
    tracer.trace(samples=3, progress=lambda done, total: seen.append((done, total)))
    cells = len(tracer.question_ids) * 3
    assert seen[-1] == (cells, cells) and len(seen) == -(-cells // 2)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


@lengthy
def test_max_batch_rows_does_not_change_results(tiny_bundle, image, question):
    one = Tracer(tiny_bundle, image, question, max_batch_rows=2).trace(samples=2, kind="self_attn", window=3)
    many = Tracer(tiny_bundle, image, question).trace(samples=2, kind="self_attn", window=3)
    assert_close(one.scores, many.scores)
    with pytest.raises(ValueError, match="max_batch_rows"):
        Tracer(tiny_bundle, image, question, max_batch_rows=0).trace(samples=1)


@lengthy
def test_blocks_read_a_frozen_context_never_the_tracer(demo_bundle, demo_sample, monkeypatch):
    """Every block method of a trace (exact, estimated, verified, image-side) gets the clean pass's frozen Context."""
    import dataclasses

    from blip_trace_widgets.causal_trace.blocks.base import Context
    from blip_trace_widgets.causal_trace.blocks.blip import AnswerDecoder, QuestionEncoder
    from blip_trace_widgets.causal_trace.blocks.vision import VisionEncoder
    from blip_trace_widgets.causal_trace.tracer import Tracer

    seen = []
    for cls in (QuestionEncoder, AnswerDecoder, VisionEncoder):
        for name in ("layout", "clean_run", "corrupted_run", "clean_cross", "rows_per_chunk", "logits"):
            original = getattr(cls, name)

            def spy(self, context, *args, _original=original, **kwargs):
                seen.append(type(context))
                return _original(self, context, *args, **kwargs)

            monkeypatch.setattr(cls, name, spy)
    tracer = Tracer(demo_bundle, demo_sample.image, demo_sample.question)
    for method in ("exact", "estimate", "verified"):
        tracer.trace(samples=2, method=method)
        tracer.trace(samples=2, method=method, block="answer_decoder")
    tracer.trace(samples=1, block="vision_encoder", regions=2)
    assert seen and set(seen) == {Context}
    with pytest.raises(dataclasses.FrozenInstanceError):
        tracer.clean_pass.context.question_ids = (1,)
