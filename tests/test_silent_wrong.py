"""Nothing silently wrong: noise never drawn as a finding, negative effects visible, huge noise refused,
long answers in float64, infinite scores round-tripped, saved files checked."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from fast_subset import lengthy

from blip_trace_widgets import BlipTraceError, GaussianNoise, MultiplicativeNoise, TraceResult, trace
from blip_trace_widgets.causal_trace.plots import _effect_limits, negative_text, plot_trace, trace_title
from blip_trace_widgets.core.names import TINY_ABSOLUTE


def _result(scores, low, high, metric="prob", stderr=None, **config):
    scores = np.asarray(scores, dtype=np.float64)
    return TraceResult(scores, low, high, "red", [f"t{i}" for i in range(scores.shape[0])], "question_encoder",
                       "hidden", 1, config={"metric": metric, "samples": 4, **config}, stderr=stderr)


@pytest.mark.parametrize("metric", list(TINY_ABSOLUTE))
def test_an_effect_under_the_metric_floor_is_tiny_whatever_the_clean_score(metric):
    floor = TINY_ABSOLUTE[metric]
    small = _result(np.full((2, 3), 1e-6), 0.0, 0.5 * floor, metric=metric)  # 100% of a tiny clean score
    assert small.is_tiny() and "floor" in small.tiny_reason()
    large = _result(np.full((2, 3), 0.0), 0.0, 3 * floor, metric=metric)
    assert not large.is_tiny() and large.tiny_reason() is None


def test_a_clean_probability_below_the_floor_names_logprob():
    result = _result(np.full((2, 3), 1e-6), 1e-6, 2e-4)
    assert "metric='logprob'" in result.tiny_reason()


def test_a_colour_scale_never_spans_less_than_the_floor():
    # float noise of 1e-6 on a map whose clean score is 1e-3: drawn grey (tiny), on a scale of at least the floor
    rng = np.random.default_rng(0)
    result = _result(2e-4 + 1e-6 * rng.standard_normal((3, 4)), 2e-4, 1e-3)
    ax = plot_trace(result)
    low, high = ax.collections[0].get_clim()
    assert high - low >= TINY_ABSOLUTE["prob"] - 1e-12
    assert "widened to the floor" in ax.figure.axes[-1].get_ylabel().replace("\n", " ")
    assert ax.collections[0].get_cmap().name == "Greys"  # flagged, never in full colour
    ax = plot_trace(result, tiny=None)  # not flagged: the floor still keeps the noise pale
    mesh = ax.collections[0]
    assert mesh.to_rgba(mesh.get_array())[..., :3].min() > 0.9


def test_negative_effects_get_a_diverging_scale_and_are_counted():
    scores = np.array([[0.5, 0.9], [0.1, 0.52]])  # one cell far below the corrupted score 0.5
    stderr = np.full(scores.shape, 0.01)
    result = _result(scores, 0.5, 1.0, stderr=stderr)
    assert result.negative_cells().tolist() == [[False, False], [True, False]]
    assert negative_text(result) == "1 cell below the corrupted score"
    assert "1 cell below the corrupted score" in trace_title(result, width=200)
    ax = plot_trace(result)
    mesh = ax.collections[0]
    assert mesh.to_rgba([0.5])[0][:3].min() > 0.93  # white at the corrupted score
    assert mesh.norm.vmin == pytest.approx(0.1) and mesh.norm.vmax == pytest.approx(1.0)  # ends at the data
    rgba = mesh.to_rgba(mesh.get_array()).reshape(-1, 4)
    assert rgba[2, 2] > rgba[2, 0] + 0.3  # the negative cell is blue
    # within noise, nothing is called negative: no diverging scale
    quiet = _result(np.array([[0.49, 0.9]]), 0.5, 1.0, stderr=np.full((1, 2), 0.02))
    assert not quiet.negative_cells().any() and negative_text(quiet) == ""


def test_negative_regions_stay_visible_on_the_image():
    from PIL import Image

    from blip_trace_widgets.causal_trace.plots import overlay_image

    scores = np.array([[0.5], [1.0], [0.0]])  # CLS, a region that brings the answer back, one that pushes it away
    result = TraceResult(scores, 0.5, 1.0, "red", ["[CLS]", "r0c0", "r0c1"], "vision_encoder", "hidden", 1,
                         config={"metric": "prob", "grid": {"boxes": [None, [0, 0, 0.5, 1], [0.5, 0, 1, 1]]}},
                         stderr=np.full((3, 1), 0.01))
    low, high = _effect_limits(result, normalized=True)
    assert low == pytest.approx(-1.0) and high == pytest.approx(1.0)
    picture = np.asarray(overlay_image(result, Image.new("RGB", (20, 10), "white"), layer=0)).astype(int)
    left, right = picture[5, 2], picture[5, 17]
    assert right[2] > right[0] + 40  # blue where the effect is negative, not transparent
    assert left[0] > left[2] + 40  # red where it is positive


@pytest.mark.parametrize("fields", [
    {"corruption": GaussianNoise(1e30)},
    {"corruption": MultiplicativeNoise(1e30)},
    {"corruption": GaussianNoise(1e30), "method": "estimate"},
    {"corruption": lambda clean, samples, generator: clean.expand(samples, -1, -1) * 1e30},
], ids=["gaussian", "multiplicative", "estimate", "callable"])
def test_huge_finite_noise_is_refused_naming_the_level(tiny_bundle, image, question, fields):
    with pytest.raises(BlipTraceError, match="not finite.*Lower its level"):
        trace(tiny_bundle, image, question, samples=2, **fields)


@lengthy
def test_huge_noise_exits_non_zero_in_the_cli(tmp_path, capsys):
    from blip_trace_widgets import demo_samples
    from blip_trace_widgets.cli import main

    sample = demo_samples()[0]
    sample.image.save(tmp_path / "image.png")
    code = main(["trace", "--model", "demo", "--image", str(tmp_path / "image.png"), "--question", sample.question,
                 "--noise", "gaussian", "--scale", "1e30", "--samples", "2", "--out", str(tmp_path / "out")])
    assert code == 2 and "not finite" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.json")) if (tmp_path / "out").exists() else True


@lengthy
def test_a_long_answer_keeps_its_probability_in_float64(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    answer = " ".join(["red circle"] * 10)  # 20 tokens
    result = trace(demo_bundle, image, question, answer=answer, samples=1, block="answer_decoder")
    logprob = trace(demo_bundle, image, question, answer=answer, samples=1, metric="logprob", block="answer_decoder")
    assert result.high_score > 0 and math.log(result.high_score) == pytest.approx(logprob.high_score, rel=1e-6)
    assert logprob.high_score < math.log(1e-38)  # below float32's normal range: float32 would give 0 or worse
    assert result.is_tiny() and "metric='logprob'" in result.tiny_reason()


def test_infinite_scores_load_back_as_they_were(tmp_path):
    result = _result(np.array([[0.1, np.inf], [-np.inf, np.nan]]), -np.inf, 1.0)
    path = result.save(tmp_path / "r.json")
    json.loads(path.read_text(), parse_constant=lambda token: pytest.fail(f"bare {token}"))
    loaded = TraceResult.load(path)
    assert loaded.scores[0, 1] == np.inf and loaded.scores[1, 0] == -np.inf and np.isnan(loaded.scores[1, 1])
    assert loaded.low_score == -np.inf and loaded == result


def _saved(tmp_path, **changes):
    data = _result(np.zeros((1, 2)), 0.0, 1.0).to_dict()
    data.update(changes)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"format": 0}, "not a version"), ({"format": -1}, "not a version"), ({"format": True}, "not a version"),
    ({"format": 99}, "newer than"), ({"tokens": "t0"}, "'tokens' must be a list"), ({"window": "3"}, "'window'"),
    ({"scores": [["a", 1]]}, "not a number"), ({"scores": 3}, "not a table"), ({"answer": 3}, "'answer' must be text"),
    ({"low_score": "x"}, "'low_score' holds"), ({"config": [1]}, "'config' must be an object"),
])
def test_wrong_saved_fields_are_clear_errors(tmp_path, changes, message):
    with pytest.raises(BlipTraceError, match=message):
        TraceResult.load(_saved(tmp_path, **changes))


def test_a_binary_file_is_a_clear_error(tmp_path):
    path = tmp_path / "r.json"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(BlipTraceError, match="not a text file"):
        TraceResult.load(path)


def test_the_scored_probability_is_float64(tiny_bundle, image, question):
    from blip_trace_widgets.core.scoring import Target, score_rows

    logits = torch.zeros(2, 1, 5)
    assert score_rows(logits, Target(inputs=(0,), tokens=(1,)), "prob").dtype == torch.float64


@pytest.mark.parametrize("setting", [{"samples": 200}, {"corruption": MultiplicativeNoise(100.0)},
                                     {"seed": 2**32 - 1}, {"corruption": GaussianNoise(0.01)}])
@lengthy
def test_the_explorer_shows_exactly_what_trace_takes(demo_bundle, demo_sample, setting):
    from blip_trace_widgets.causal_trace.tracer import default_config
    from blip_trace_widgets.widgets import TraceExplorer

    image, question, _ = demo_sample
    config = default_config(demo_bundle, **setting)
    explorer = TraceExplorer(demo_bundle, image, question, config=config, background=False)
    shown = explorer.config
    assert (shown.samples, shown.seed) == (config.samples, config.seed)
    assert shown.corruption.level == pytest.approx(config.corruption.level, rel=1e-3)
    assert type(shown.corruption) is type(config.corruption)


@pytest.mark.parametrize("kw, message", [({"regions": 0}, "regions must be between 1"),
                                         ({"noise_samples": 1001}, "noise_samples must be between 1 and 1000")])
def test_the_vision_explorer_refuses_what_trace_refuses(demo_bundle, demo_sample, kw, message):
    from blip_trace_widgets.widgets import VisionTraceExplorer

    image, question, _ = demo_sample
    with pytest.raises(BlipTraceError, match=message):
        VisionTraceExplorer(demo_bundle, image, question, background=False, **kw)
    with pytest.raises(BlipTraceError, match="regions must be between 1"):
        trace(demo_bundle, image, question, block="vision_encoder", regions=demo_bundle.patch_grid_side + 1)


@pytest.mark.parametrize("gallery, message", [([], "the gallery is empty"), ([(1,)], "gallery item 0 is"),
                                              ([5], "gallery item 0 is"), ("pictures", "gallery must be"),
                                              ([("image.png", 3)], "question must be a string")])
def test_a_bad_gallery_is_a_clear_error(demo_bundle, gallery, message):
    from blip_trace_widgets.widgets import TraceExplorer

    with pytest.raises(BlipTraceError, match=message):
        TraceExplorer(demo_bundle, gallery=gallery, background=False)


@lengthy
def test_an_explorer_config_for_a_block_the_head_lacks_is_a_clear_error(demo_sample):
    from blip_trace_widgets import TraceConfig, load_model
    from blip_trace_widgets.widgets import TraceExplorer

    captioner = load_model("demo-caption")
    with pytest.raises(BlipTraceError, match="traces the captioning model's caption_decoder, not question_encoder"):
        TraceExplorer(captioner, demo_sample[0], "", config=TraceConfig(block="question_encoder"), background=False)


@lengthy
def test_every_entry_point_resolves_the_same_config(demo_bundle, demo_sample, tmp_path, monkeypatch):
    """trace(), Tracer.trace, the explorer and the CLI start from one resolver: the demo model's 10σ, not 3σ in one
    and 10σ in another."""
    from blip_trace_widgets import Tracer
    from blip_trace_widgets.causal_trace.command import _trace_config
    from blip_trace_widgets.causal_trace.procedures import resolve_config
    from blip_trace_widgets.cli import build_parser
    from blip_trace_widgets.widgets import TraceExplorer

    image, question, _ = demo_sample
    expected = resolve_config(demo_bundle, samples=2)
    assert expected.corruption.level == demo_bundle.noise_scale == 10.0
    via_trace = trace(demo_bundle, image, question, samples=2).config
    via_tracer = Tracer(demo_bundle, image, question).trace(samples=2).config
    explorer = TraceExplorer(demo_bundle, image, question, background=False)
    explorer.noise_samples.value = 2
    args = build_parser().parse_args(["trace", "--image", "x.png", "--samples", "2", "--out", str(tmp_path)])
    via_cli = _trace_config(args, demo_bundle)
    from blip_trace_widgets.sweeps.command import _sweep_configs

    swept = build_parser().parse_args(["sweep", "--dataset", "easy-vqa-color", "--kinds", "hidden", "--samples", "2",
                                       "--out", str(tmp_path)])
    (via_sweep,) = _sweep_configs(swept, demo_bundle)
    for config in (via_trace, via_tracer, explorer.result.config, via_cli.to_json(), via_sweep.to_json()):
        assert {k: config[k] for k in ("block", "corruption", "samples", "seed", "window", "kind", "metric")} == {
            k: expected.to_json()[k] for k in ("block", "corruption", "samples", "seed", "window", "kind", "metric")}


def test_trace_and_sweep_offer_the_shared_options_alike():
    """One option per TraceConfig field, built from the field's own help, choices and default: the same in both."""
    from blip_trace_widgets.causal_trace.command import SHARED_FIELDS, TRACE_FIELDS
    from blip_trace_widgets.cli import build_parser

    parser = build_parser()
    commands = {name: action for action in parser._subparsers._group_actions for name, action in  # noqa: SLF001
                action.choices.items()}

    def options(command):
        return {a.dest: (a.help, a.default, a.choices, a.type) for a in commands[command]._actions}

    trace_options, sweep_options = options("trace"), options("sweep")
    for name in SHARED_FIELDS:
        assert trace_options[name] == sweep_options[name], name
        assert trace_options[name][1] is None  # the configuration's own default, applied by the resolver
    assert set(TRACE_FIELDS) <= set(trace_options) and not set(TRACE_FIELDS) & set(sweep_options) - {"kind"}
    from blip_trace_widgets import TraceConfig

    assert "(default: 1)" in trace_options["window"][0] and TraceConfig().window == 1
    assert trace_options["metric"][2] == sweep_options["metric"][2] and "logit_diff" in trace_options["metric"][2]


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_the_sweeps_answer_mode_is_scored_and_the_old_spelling_warns(tmp_path, capsys):
    from blip_trace_widgets.cli import main

    base = ["sweep", "--dataset", "easy-vqa-color", "--limit", "1", "--kinds", "hidden", "--samples", "1"]
    assert main([*base, "--scored", "expected", "--out", str(tmp_path / "a")]) == 0
    assert "--answer is now --scored" not in capsys.readouterr().err
    assert main([*base, "--answer", "expected", "--out", str(tmp_path / "b")]) == 0
    assert "warning: sweep --answer is now --scored" in capsys.readouterr().err
    import json

    assert json.loads((tmp_path / "b" / "sweep.json").read_text())["answer"] == "expected"
