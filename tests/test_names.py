"""One word per idea: a caption's word is ``word`` with one default everywhere, the model's text is ``text``; the old
names still work, with a DeprecationWarning, for one release."""
from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest
from fast_subset import lengthy

from blip_trace_widgets import (
    CaptionTrace,
    TraceConfig,
    TraceExplorer,
    Tracer,
    knockout,
    load_model,
    sweep,
    trace,
    trace_caption,
)
from blip_trace_widgets.attention_knockout.knockout import KnockoutConfig
from blip_trace_widgets.core.errors import BlipTraceError


@pytest.fixture(scope="module")
def captioner():
    return load_model("demo-caption")


def test_target_is_the_old_name_of_word():
    with pytest.warns(DeprecationWarning, match="target= is now word="):
        assert TraceConfig(block="caption_decoder", target=2).word == 2
    with pytest.warns(DeprecationWarning, match="target= is now word="):
        assert KnockoutConfig(target=1).word == 1
    with pytest.raises(BlipTraceError, match="pass word= alone"):
        TraceConfig(block="caption_decoder", target=2, word=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TraceConfig(block="caption_decoder", word=2).to_json()["word"] == 2
        assert "target" not in TraceConfig(block="caption_decoder", word=2).to_json()


@pytest.mark.slow  # the command line, a sweep and an explorer: the full suite runs it
def test_every_entry_point_scores_the_first_content_word_by_default(captioner, demo_sample, tmp_path):
    """'a red triangle': word 1, "red", from trace(), Tracer.trace, knockout(), the CLI and a sweep alike."""
    from blip_trace_widgets import cli, load_sweep

    image = demo_sample.image
    assert trace(captioner, image, "", samples=1).config["word"] == 1
    assert Tracer(captioner, image, "").trace(samples=1).answer == "red"
    assert knockout(captioner, image, "").answer == "red"
    image.save(tmp_path / "image.png")
    assert cli.main(["trace", "--model", "demo-caption", "--image", str(tmp_path / "image.png"), "--samples", "1",
                     "--out", str(tmp_path / "cli")]) == 0
    [written] = (tmp_path / "cli").glob("*.json")
    assert json.loads(written.read_text())["config"]["word"] == 1
    table = sweep(captioner, [(image, "", "a red triangle")], configs=TraceConfig(block="caption_decoder", samples=1),
                  out=tmp_path / "sweep", progress=False)
    assert list(table["word"]) == [1] and list(load_sweep(tmp_path / "sweep")["word"]) == [1]
    explorer = TraceExplorer(captioner, image, "", background=False)
    assert explorer.result.answer == "red" and explorer.config.word == 1


@lengthy
def test_word_all_is_a_caption_trace_from_trace_itself(captioner, demo_sample):
    every = trace(captioner, demo_sample.image, "", word="all", samples=1)
    assert isinstance(every, CaptionTrace) and every.words == ["a", "red", "triangle"]
    same = trace_caption(captioner, demo_sample.image, samples=1)
    assert [r.to_json() for r in every.results] == [r.to_json() for r in same.results]
    assert [r.config["word"] for r in every.results] == [0, 1, 2]
    with pytest.raises(BlipTraceError, match='word="all" traces every word of a caption'):
        trace(load_model("demo"), demo_sample.image, demo_sample.question, word="all")


@lengthy
def test_question_is_the_old_name_of_text(demo_sample):
    bundle = load_model("demo")
    with pytest.warns(DeprecationWarning, match="question= is now text="):
        old = trace(bundle, demo_sample.image, question=demo_sample.question, samples=1)
    assert old.to_json() == trace(bundle, demo_sample.image, text=demo_sample.question, samples=1).to_json()
    with pytest.warns(DeprecationWarning, match="question= is now text="):
        assert Tracer(bundle, demo_sample.image, question=demo_sample.question).question == demo_sample.question
    with pytest.warns(DeprecationWarning, match="question= is now text="):
        explorer = TraceExplorer(bundle, demo_sample.image, question=demo_sample.question, background=False)
    assert explorer.question_box.value == demo_sample.question
    with pytest.raises(BlipTraceError, match="pass text= alone"):
        Tracer(bundle, demo_sample.image, "a", question="b")


@lengthy
def test_an_old_caption_sweep_named_target_resumes(captioner, demo_sample, tmp_path):
    """A caption sweep written when the word was ``target`` (manifest, parts and table) resumes without retracing."""
    from blip_trace_widgets.sweeps.sweep import load_sweep

    out, items = tmp_path / "old", [(demo_sample.image, "", "a red triangle")]
    configs = TraceConfig(block="caption_decoder", samples=1, word=2)
    new = sweep(captioner, items, configs=configs, out=out, progress=False)
    manifest = json.loads((out / "sweep.json").read_text())
    for config in manifest["configs"]:
        config["target"] = config.pop("word")
    (out / "sweep.json").write_text(json.dumps(manifest))
    parts = list((out / "parts").glob("*.parquet"))
    for path in [*parts, out / "sweep.parquet"]:  # as an earlier release wrote them
        pd.read_parquet(path).rename(columns={"word": "target"}).to_parquet(path, index=False)
    written = {path: path.stat().st_mtime_ns for path in parts}
    again = sweep(captioner, items, configs=configs, out=out, progress=False)
    assert {path: path.stat().st_mtime_ns for path in parts} == written  # nothing traced again
    assert list(again["word"]) == list(new["word"]) == [2] and list(load_sweep(out)["word"]) == [2]
    assert list(again.scores.map(lambda s: json.dumps([list(r) for r in s]))) == \
        list(new.scores.map(lambda s: json.dumps([list(r) for r in s])))
