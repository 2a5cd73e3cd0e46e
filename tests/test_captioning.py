"""Captioning and image-text matching through the public API: trace_caption, explorers, sweeps, data, demo models."""
from __future__ import annotations

import json

import numpy as np
import pytest
from fast_subset import lengthy
from tolerance import within_rounding

from blip_trace_widgets import GaussianNoise, TraceResult, load_model, sweep, trace, trace_caption
from blip_trace_widgets.core.errors import BlipTraceError
from blip_trace_widgets.datasets.easy_vqa import easy_vqa_captions, image_facts
from blip_trace_widgets.datasets.subsets import hf_caption_samples, load_vqa_subset


@pytest.fixture(scope="module")
def captioner():
    return load_model("demo-caption")


@pytest.fixture(scope="module")
def matcher():
    return load_model("demo-itm")


@lengthy
def test_captions_come_only_from_what_the_questions_settle():
    facts = image_facts([("what color is the circle?", "red"), ("is there not a triangle?", "yes")])
    assert facts.caption == "a red circle" and "triangle" in facts.absent
    assert image_facts([("what color is the shape?", "red")]).caption is None  # no shape: no caption
    assert image_facts([("what shape is present?", "circle"), ("is there a blue shape?", "yes"),
                        ("what color is the shape?", "red")]).caption is None  # two colours: contradiction
    assert image_facts([("is no circle present?", "no"), ("what is the color of the shape?", "teal")]).caption == \
        "a teal circle"
    test = easy_vqa_captions("test")
    assert len(test) == 880 and len({path for path, _ in test}) == 880
    assert all(caption.split()[0] == "a" and len(caption.split()) == 3 for _, caption in test)


@lengthy
def test_trace_caption_traces_every_word_with_one_clean_pass(captioner, demo_sample):
    traced = trace_caption(captioner, demo_sample.image, samples=2, corruption=GaussianNoise(5.0))
    assert traced.words == ["a", "red", "triangle"] and traced.caption == "a red triangle"
    assert [r.config["word"] for r in traced.results] == [0, 1, 2]
    summary = traced.summary()
    assert [row["word"] for row in summary] == traced.words
    red = summary[1]
    assert red["total_effect"] == pytest.approx(traced.results[1].total_effect)
    effect = traced.results[1].indirect_effect()
    assert red["peak_share"] == pytest.approx(effect.max() / red["total_effect"])
    assert json.loads(traced.to_json())["words"] == traced.words
    assert list(traced.to_frame()["word"]) == traced.words
    assert "'red'" in traced.describe()


@lengthy
def test_a_supplied_caption_is_scored_teacher_forced(captioner, demo_sample):
    own = trace(captioner, demo_sample.image, "", word=1, samples=2)
    other = trace(captioner, demo_sample.image, "", answer="a blue triangle", word=1, samples=2)
    assert own.answer == "red" and other.answer == "blue"
    assert own.high_score > 0.5 > other.high_score  # the model says red, not blue
    with pytest.raises(BlipTraceError, match="trace_caption traces every word"):
        trace_caption(captioner, demo_sample.image, word=1)
    with pytest.raises(BlipTraceError, match="needs a captioning model"):
        trace_caption(load_model("demo"), demo_sample.image)


@lengthy
def test_a_captioning_result_records_its_word_and_a_vqa_config_has_none(captioner, demo_sample):
    from blip_trace_widgets import TraceConfig

    assert trace(captioner, demo_sample.image, "", samples=2).config["word"] == 1  # the first content word, "red"
    assert "word" not in TraceConfig().to_json()  # VQA sweeps begun before captioning keep their manifest


@lengthy
def test_a_prompt_is_part_of_the_positions(captioner, demo_sample):
    result = trace(captioner, demo_sample.image, "a", word=0, samples=2)
    assert result.tokens == ["[DEC]", "a"] and result.answer == "red"


def test_restoring_the_caption_decoder_brings_the_colour_back(captioner, demo_sample):
    result = trace(captioner, demo_sample.image, "", word=1, samples=3, corruption=GaussianNoise(5.0))
    assert not result.is_tiny() and result.high_score > 0.9
    assert result.scores[-1, -1] == within_rounding(result.high_score)  # last state at the predicting token


@lengthy
def test_matcher_matches_its_caption_and_not_another(matcher, demo_sample):
    right = trace(matcher, demo_sample.image, "a red triangle", samples=2)
    wrong = trace(matcher, demo_sample.image, "a blue triangle", samples=2)
    assert right.high_score > 0.9 > 0.1 > wrong.high_score
    assert right.answer == "match" and right.config["model_answer"] == "match"


@pytest.mark.slow  # a few seconds; the fast subset stays under a minute
def test_explorers_with_a_captioner_and_a_matcher(captioner, matcher):
    from blip_trace_widgets.widgets import TraceExplorer, VisionTraceExplorer

    explorer = TraceExplorer(captioner, background=False)
    assert explorer.question_box.description == "prompt" and "model's caption" in explorer.answer_view.value
    assert explorer.result.answer == "red" and explorer.word.value == 1
    explorer.word.value = 2
    assert explorer.result.answer == "triangle" and explorer.result.tokens == ["[DEC]", "a", "red"]
    explorer.caption_box.value = "a blue circle"
    assert [label for label, _ in explorer.word.options] == ["0: a", "1: blue", "2: circle"]
    assert explorer.result.answer == "circle"
    explorer.caption_box.value = "a zzqxj circle"
    assert "cannot encode the caption" in explorer.error.value
    explorer.caption_box.value = ""
    assert explorer.error.value == "" and explorer.result.answer == "triangle"
    explorer.view.value = "compare"
    assert set(explorer.results) == {"hidden", "mlp", "self_attn", "cross_attn"}
    matching = TraceExplorer(matcher, background=False)
    assert matching.question_box.description == "text" and matching.word.layout.display == "none"
    assert [b for _, b in matching.block.options] == ["itm_encoder"] and "p(match)" in matching.answer_view.value
    matching.question_box.value = "a blue circle"
    assert "no match" in matching.answer_view.value
    vision = VisionTraceExplorer(captioner, background=False, regions=2)
    assert vision.result.block == "vision_encoder" and vision.result.answer == "red"
    assert vision.metric.layout.display == "none"
    similarity = VisionTraceExplorer(matcher, background=False, regions=2)
    similarity.metric.value = "itc"
    assert similarity.result.metric == "itc" and "ITC similarity with &#x27;a red triangle&#x27;" in similarity.status.value


@pytest.mark.slow  # a few seconds; the fast subset stays under a minute
def test_a_caption_sweep_and_a_matching_sweep(captioner, matcher, tmp_path):
    samples = load_vqa_subset("easy-vqa-captions", limit=2)
    assert samples[0].question == "" and samples[0].answer == "a red triangle"
    from blip_trace_widgets import TraceConfig

    configs = [TraceConfig(block="caption_decoder", kind="mlp", window=3, samples=2, word=k) for k in (1, 2)]
    table = sweep(captioner, samples, configs=configs, out=tmp_path / "c", scored="expected", progress=False)
    assert len(table) == 4 and set(table["word"]) == {1, 2} and set(table["head"]) == {"caption"}
    assert list(table["answer"][:2]) == ["red", "triangle"] and table["correct"].all()
    single = trace(captioner, samples[0].image.open(), "", answer="a red triangle", word=1, kind="mlp", window=3,
                   samples=2, corruption=configs[0].corruption)  # trace() alone starts at the model's own level
    np.testing.assert_allclose(np.asarray([list(r) for r in table["scores"][0]]), single.scores)
    itm = sweep(matcher, samples, configs=[TraceConfig(block="itm_encoder", samples=2)], out=tmp_path / "i",
                progress=False)
    assert list(itm["question"]) == ["a red triangle", samples[1].answer] and itm["correct"].all()
    from blip_trace_widgets.causal_trace.averages import average_trace

    averaged = average_trace(table, config=0, form="rome")
    assert averaged.head == "caption" and averaged.scored.startswith("average of") and averaged.config["word"] == 1
    assert averaged.tokens == ["[DEC]", "last (predicting)"]
    from blip_trace_widgets import plot_average_heatmaps, plot_effect_by_layer

    titles = [t for ax in plot_average_heatmaps(table, form="rome").axes for t in (ax.get_title(loc="left"), ax.get_title()) if t]
    assert titles[0].startswith("MLP outputs, window 3, caption word 1") and titles[0].endswith("2 captions")
    legend = plot_effect_by_layer(table, form="rome").axes[-1].get_legend()
    assert {t.get_text() for t in legend.get_texts()} == {"MLP outputs (w3), word 1", "MLP outputs (w3), word 2"}


def test_captioning_rows_of_any_datasets_dataset():
    rows = [{"img": "x.png", "sentences": ["a cat", "a dog"]}, {"img": "y.png", "sentences": {"raw": "a bird"}}]
    samples = list(hf_caption_samples(rows, image="img", caption="sentences", prompt="a picture of"))
    assert [(s.image, s.question, s.answer) for s in samples] == [("x.png", "a picture of", "a cat"),
                                                                 ("y.png", "a picture of", "a bird")]
    with pytest.raises(ValueError, match="have no column .image., .caption.*name its columns"):
        list(hf_caption_samples(rows))


@lengthy
def test_results_say_what_they_score(captioner, matcher, demo_sample, tmp_path):
    from blip_trace_widgets.causal_trace.plots import trace_title

    result = trace(captioner, demo_sample.image, "", word=1, samples=2)
    assert "caption word 'red'" in trace_title(result)
    saved = TraceResult.load(result.save(tmp_path / "r.json"))
    assert saved.head == "caption" and saved.scored == "caption word 'red'"
    match = trace(matcher, demo_sample.image, "a red triangle", samples=2)
    assert "match with 'a red triangle'" in trace_title(match)
    assert match.plot().get_figure().axes[-1].get_ylabel().startswith("p(match)")


@pytest.mark.slow  # a few seconds; the fast subset stays under a minute
def test_the_command_line_sweeps_captions(tmp_path, capsys):
    from blip_trace_widgets import cli, load_sweep

    code = cli.main(["sweep", "--model", "demo-caption", "--dataset", "easy-vqa-captions", "--limit", "2", "--targets",
                     "1,2", "--kinds", "hidden", "--samples", "2", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    table = load_sweep(tmp_path)
    assert sorted(set(table["word"])) == [1, 2] and set(table["block"]) == {"caption_decoder"}
    assert (tmp_path / "average_heatmaps.png").is_file() and (tmp_path / "effect_by_layer.png").is_file()
