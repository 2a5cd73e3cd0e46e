"""Counterfactual pairs: easy-VQA image pairs, a pair's own contrast, ImageSwap at every image stage,
and the command line's --counterfactual-image and --swap."""
from __future__ import annotations

import numpy as np
import pytest
from fast_subset import lengthy
from tolerance import assert_close, within_rounding

from blip_trace_widgets import BlipTraceError, ImageSwap, Tracer, WordSwap, load_model, trace
from blip_trace_widgets.datasets.easy_vqa import COLORS, SHAPES, easy_vqa_pairs, easy_vqa_questions, image_facts


@pytest.mark.parametrize("kind", ["color", "shape"])
@lengthy
def test_pairs_differ_in_one_attribute_and_take_both_answers_from_the_dataset(kind):
    pairs = easy_vqa_pairs(kind, limit=25)
    assert len(pairs) == 25
    asked: dict[str, dict[str, str]] = {}
    for path, question, answer in easy_vqa_questions("test"):
        asked.setdefault(path, {})[question] = answer
    used = [p for pair in pairs for p in pair.sources]
    assert len(used) == len(set(used))  # each image once
    for pair in pairs:
        first, second = (image_facts(list(asked[p].items())) for p in pair.sources)
        changed, kept = ("colors", "shapes") if kind == "color" else ("shapes", "colors")
        assert getattr(first, kept) == getattr(second, kept) and len(getattr(first, kept)) == 1
        assert getattr(first, changed) != getattr(second, changed)
        assert asked[pair.sources[0]][pair.question] == pair.answer  # the dataset's own answers, never guessed
        assert asked[pair.sources[1]][pair.question] == pair.counterfactual_answer
        assert pair.answer != pair.counterfactual_answer and pair.answer in (COLORS if kind == "color" else SHAPES)
        assert pair.image.size == pair.counterfactual_image.size
    with pytest.raises(ValueError, match="unknown pair kind"):
        easy_vqa_pairs("size")


@pytest.mark.parametrize("stage", ["image", "patches", "pixels"])
@lengthy
def test_image_swap_at_every_stage_runs_the_counterfactual_image(demo_bundle, stage):
    """With nothing restored, a swap is the counterfactual image's own run; with the last layer restored, the clean."""
    from blip_trace_widgets.causal_trace.procedures import resolve_config

    pair = easy_vqa_pairs("color", limit=1)[0]
    block = "question_encoder" if stage == "image" else "vision_encoder"
    tracer = Tracer(demo_bundle, pair.image, pair.question)
    config = resolve_config(demo_bundle, corruption=ImageSwap(pair.counterfactual_image), corrupt=stage, block=block,
                            samples=1, answer=pair.answer)
    result = tracer.trace(config)
    other = Tracer(demo_bundle, pair.counterfactual_image, pair.question)
    own = other.baselines(resolve_config(demo_bundle, answer=pair.answer, samples=1))[1]
    assert result.low_score == within_rounding(own)
    layers, positions = result.num_layers, len(result.tokens) if block != "vision_encoder" else \
        int(tracer.clean.image_embeds.shape[1])
    everything, _ = tracer.restore([tuple((layers - 1, p) for p in range(positions))], config)
    assert everything[0] == within_rounding(result.high_score)  # every last-layer state restored: clean
    assert result.high_score - result.low_score > 0.1  # the pair changes the answer: the check could fail


@lengthy
def test_a_pair_supplies_its_own_contrast(demo_bundle):
    pair = easy_vqa_pairs("color", limit=1)[0]
    swapped = trace(demo_bundle, pair.image, pair.question, corruption=ImageSwap(pair.counterfactual_image),
                    metric="logit_diff", samples=1)
    other = Tracer(demo_bundle, pair.counterfactual_image, pair.question).model_answer
    assert swapped.config["contrast_answer"] == swapped.config["counterfactual_answer"] == other.split()[0]
    assert swapped.high_score > 0 > swapped.low_score  # the model prefers each image's own answer
    normalized = (swapped.scores - swapped.low_score) / (swapped.high_score - swapped.low_score)
    np.testing.assert_allclose(swapped.normalized(), normalized)  # (LD_patched - LD_corrupted) / (LD_clean - LD_corrupted)
    assert pair.question == "what is the color of the triangle?"
    with pytest.raises(BlipTraceError, match="on the counterfactual too"):  # the demo says 'red' for either question
        trace(demo_bundle, pair.image, pair.question, corruption=WordSwap({"triangle": "circle"}), corrupt="question",
              metric="logit_diff", samples=1)
    with pytest.raises(BlipTraceError, match="needs contrast"):
        trace(demo_bundle, pair.image, pair.question, metric="logit_diff", samples=1)


@lengthy
def test_the_command_line_takes_a_counterfactual_image_or_a_swap(tmp_path, capsys):
    from blip_trace_widgets.cli import main

    pair = easy_vqa_pairs("color", limit=1)[0]
    pair.image.save(tmp_path / "a.png")
    pair.counterfactual_image.save(tmp_path / "b.png")
    base = ["trace", "--image", str(tmp_path / "a.png"), "--question", pair.question, "--samples", "1",
            "--out", str(tmp_path / "out")]
    assert main([*base, "--counterfactual-image", str(tmp_path / "b.png"), "--metric", "logit_diff"]) == 0
    from blip_trace_widgets import TraceResult

    saved = TraceResult.load(next((tmp_path / "out").glob("*.json")))
    assert saved.config["corruption"]["type"] == "image_swap" and saved.config["counterfactual_answer"]
    assert main([*base, "--swap", "triangle"]) == 2
    assert main([*base, "--swap", "a=b", "--counterfactual-image", str(tmp_path / "b.png")]) == 2
    assert main([*base, "--counterfactual-image", str(tmp_path / "none.png")]) == 2
    assert "no such file" in capsys.readouterr().err


@lengthy
def test_a_counterfactual_without_effect_is_flagged_naming_the_fix(demo_bundle):
    pair = easy_vqa_pairs("shape", limit=1)[0]
    assert pair.question == "what is the red shape?"
    swapped = trace(demo_bundle, pair.image, pair.question, corruption=WordSwap({"red": "teal"}), corrupt="question",
                    samples=1)
    assert "pick a counterfactual that changes the answer" in swapped.tiny_reason()


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_the_explorer_swaps_in_a_partner_or_a_question_in_either_direction(demo_bundle):
    from blip_trace_widgets.widgets import TraceExplorer

    pairs = easy_vqa_pairs("color", limit=3)
    explorer = TraceExplorer(demo_bundle, gallery=pairs, background=False, mode="exact")
    controls = explorer.counterfactual
    assert explorer.result.config["corruption"]["type"] == "gaussian"
    assert controls.partner.options[0] == ("its pair's partner", -1) and controls.partner.layout.display == "none"
    controls.source.value = "pair"  # the pair's own partner: the map starts at the partner's own p(answer)
    own = Tracer(demo_bundle, pairs[0].counterfactual_image, pairs[0].question)
    from blip_trace_widgets.causal_trace.procedures import resolve_config

    expected = own.baselines(resolve_config(demo_bundle, answer=explorer.result.answer, samples=1))[1]
    assert explorer.result.config["corruption"]["type"] == "image_swap"
    assert explorer.result.low_score == within_rounding(expected)
    assert explorer.noise.disabled and explorer.noise_samples.disabled and controls.partner.layout.display is None
    controls.partner.value = 2  # another gallery image
    assert explorer.result.config["corruption"]["image_sha1"] != own.image_key[:16]
    controls.direction.value = "noise"
    assert explorer.result.direction == "noise" and explorer.error.value == ""
    controls.source.value = "swap"
    assert "type the counterfactual question" in explorer.error.value  # one clear error inside the explorer
    controls.swapped.value = "what is the color of the circle?"
    assert explorer.result.config["corruption"] == {"type": "word_swap", "question": "what is the color of the circle?"}
    controls.swapped.value = "what is the colour of the big circle?"
    assert "must keep the length" in explorer.error.value
    controls.source.value, controls.direction.value = "noise", "denoise"
    assert explorer.result.config["corruption"]["type"] == "gaussian" and not explorer.noise.disabled
    explorer.gallery.value = 1
    assert [v for _, v in controls.partner.options] == [-1, 0, 2]


@lengthy
def test_a_pair_sweep_records_both_answers_and_direction_and_averages_over_pairs(demo_bundle, tmp_path):
    from blip_trace_widgets import TraceConfig, average_effect, sweep
    from blip_trace_widgets.causal_trace.averages import sample_effects

    pairs = easy_vqa_pairs("color", limit=3)
    from blip_trace_widgets import PairSwap

    configs = [TraceConfig(kind="mlp", window=3, metric="logit_diff", corruption=PairSwap()),
               TraceConfig(kind="hidden", direction="noise", corruption=PairSwap())]
    table = sweep(demo_bundle, pairs, configs=configs, out=tmp_path / "s", progress=False)
    assert len(table) == 2 * len(pairs)
    first = table[table.config == 0]
    assert list(first.counterfactual_answer) == [p.counterfactual_answer for p in pairs]
    assert list(first.contrast) == list(first.counterfactual_answer)  # each pair's own counterfactual answer
    assert set(table.corruption) == {'{"type": "image_pair"}'} and table.partner_image.notna().all()
    assert set(table.direction) == {"denoise", "noise"} and set(table.noise_samples) == {1}
    averages = average_effect(table)
    assert set(averages.n) == {len(pairs)}  # pairs with different partners average together
    noised = table[table.config == 1].iloc[0]
    effects = sample_effects(table[table.config == 1], by="position")
    row = effects[(effects["sample"] == noised["sample"]) & (effects.position == "0") & (effects.layer == 0)].iloc[0]
    # noising: what the cell takes away
    expected = (noised.high_score - noised.scores[0][0]) / (noised.high_score - noised.low_score)
    assert row.effect == pytest.approx(expected)


def test_a_pair_swap_alone_is_refused_by_name(demo_bundle, demo_sample):
    from blip_trace_widgets import PairSwap

    image, question, _ = demo_sample
    with pytest.raises(BlipTraceError, match="trace one pair with corruption=ImageSwap"):
        trace(demo_bundle, image, question, corruption=PairSwap(), samples=1)


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_the_command_line_sweeps_pairs_in_either_direction(tmp_path, capsys):
    from blip_trace_widgets.cli import main

    base = ["sweep", "--limit", "2", "--kinds", "mlp", "--model", "demo"]
    assert main([*base, "--pairs", "shape", "--direction", "noise", "--out", str(tmp_path / "a")]) == 0
    assert "easy-VQA shape pairs" in capsys.readouterr().out
    import pandas as pd

    table = pd.read_parquet(tmp_path / "a" / "sweep.parquet")
    assert set(table.direction) == {"noise"} and table.counterfactual_answer.notna().all()
    assert main([*base, "--pairs", "color", "--metric", "logit_diff", "--out", str(tmp_path / "d")]) == 0
    table = pd.read_parquet(tmp_path / "d" / "sweep.parquet")
    assert list(table.contrast) == list(table.counterfactual_answer) and (table.high_score > 0).all()
    assert main([*base, "--out", str(tmp_path / "b")]) == 2  # neither --dataset nor --pairs
    assert main([*base, "--pairs", "color", "--dataset", "easy-vqa-color", "--out", str(tmp_path / "c")]) == 2
    assert "one of them" in capsys.readouterr().err


@pytest.mark.parametrize("stage,block,kind", [("image", "question_encoder", "cross_attn_head"),
                                              ("image", "question_encoder", "self_attn_head"),
                                              ("patches", "vision_encoder", "attn_head"),
                                              ("pixels", "vision_encoder", "attn_head")])
@pytest.mark.parametrize("window", [1, 2])
@lengthy
def test_image_swap_cells_match_a_per_cell_loop(image, question, stage, block, kind, window):
    """ImageSwap at each stage, against test_attention_heads' loop of the model's own forward pass with hooks."""
    from test_attention_heads import HeadLoop
    from tiny_blip import tiny_model, tiny_processor

    from blip_trace_widgets import TraceConfig, load_model

    bundle = load_model((tiny_model(seed=4), tiny_processor()), device="cpu")
    other = image.transpose(0)  # the same picture mirrored: a counterfactual of the same size
    tracer = Tracer(bundle, image, question)
    config = TraceConfig(block=block, kind=kind, window=window, corruption=ImageSwap(other), corrupt=stage,
                         samples=1, metric="logprob")
    result = tracer.trace(config)
    loop = HeadLoop(tracer, config)
    expected = loop.grid(result.config["restored_positions"])
    assert_close(result.scores, expected)
    assert np.abs(expected - result.low_score).max() > 1e-4  # the swap does something: the check could fail


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_the_vision_explorer_swaps_in_a_partners_patches_in_either_direction(demo_bundle):
    from blip_trace_widgets.widgets import VisionTraceExplorer

    pairs = easy_vqa_pairs("color", limit=2)
    explorer = VisionTraceExplorer(demo_bundle, gallery=pairs, regions=2, noise_samples=2, background=False)
    controls = explorer.counterfactual
    assert [v for _, v in controls.source.options] == ["noise", "pair"]  # a word swap acts after the vision encoder
    controls.source.value = "pair"
    result = explorer.result
    assert result.config["corruption"]["type"] == "image_swap" and result.config["corrupt"] == "patches"
    assert explorer.corruption.disabled and explorer.area.disabled and explorer.level.disabled
    own = Tracer(demo_bundle, pairs[0].counterfactual_image, pairs[0].question)
    from blip_trace_widgets.causal_trace.procedures import resolve_config

    assert result.low_score == within_rounding(
        own.baselines(resolve_config(demo_bundle, answer=result.answer, samples=1))[1])
    controls.direction.value = "noise"
    assert explorer.result.direction == "noise" and explorer.error.value == ""
    assert explorer.overlay.value[:4] == b"\x89PNG"


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_the_explorer_estimates_and_verifies_noising_too(demo_bundle):
    from blip_trace_widgets.widgets import TraceExplorer

    explorer = TraceExplorer(demo_bundle, background=False, mode="verified")
    explorer.counterfactual.direction.value = "noise"
    result = explorer.result
    assert explorer.error.value == "" and result.direction == "noise"
    assert result.config["method"] == "verified" and int(result.exact_cells.sum()) == result.config["verify"]


@lengthy
def test_the_explorer_swaps_a_captioners_prompt_words():
    from blip_trace_widgets import demo_samples
    from blip_trace_widgets.widgets import TraceExplorer

    image, _, _ = demo_samples()[0]
    explorer = TraceExplorer(load_model("demo-caption"), image, "a red", background=False, mode="exact")
    controls = explorer.counterfactual
    assert controls.swapped.description == "counterfactual prompt"
    controls.source.value = "swap"
    assert "type the counterfactual prompt" in explorer.error.value
    controls.swapped.value = "a blue"
    result = explorer.result
    assert explorer.error.value == "" and result.config["corruption"] == {"type": "word_swap", "question": "a blue"}
    assert result.config["corrupted_positions"] == [2] and result.total_effect != 0


@lengthy
def test_the_cli_swaps_a_prompts_words_and_names_the_fix_when_nothing_changes(tmp_path, capsys):
    from blip_trace_widgets import demo_samples
    from blip_trace_widgets.cli import main

    demo_samples()[0][0].save(tmp_path / "image.png")
    base = ["trace", "--model", "demo-caption", "--image", str(tmp_path / "image.png"), "--word", "0",
            "--out", str(tmp_path / "out")]
    assert main([*base, "--prompt", "a red", "--swap", "red=blue"]) == 0
    captured = capsys.readouterr()
    assert "prompt: 'a red'" in captured.out
    # the demo captioner's caption word barely moves when the prompt's colour is swapped: the warning names the fix
    assert "pick a counterfactual that changes the answer" in captured.err and "Raise --scale" not in captured.err
    assert main([*base, "--prompt", "a red", "--swap", "red=big blue"]) == 2
    assert "a swap must keep the length" in capsys.readouterr().err


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_question_pairs_pair_a_question_sets_images_by_their_answers(tmp_path, capsys):
    import pandas as pd

    from blip_trace_widgets.cli import main
    from blip_trace_widgets.datasets.subsets import question_pairs

    questions = [(path, q, a) for path, q, a in easy_vqa_questions("test") if q.startswith("what color")][:40]
    pairs = question_pairs(questions)
    assert len(pairs) >= 10
    for pair in pairs:  # the same question, both answers the dataset's own, and different
        asked = {(path, a) for path, q, a in questions if q == pair.question}
        assert {(pair.image, pair.answer), (pair.counterfactual_image, pair.counterfactual_answer)} <= asked
        assert pair.answer != pair.counterfactual_answer
    used = [(p.image, p.question) for p in pairs] + [(p.counterfactual_image, p.question) for p in pairs]
    assert len(used) == len(set(used))  # each item (an image and its question) once
    assert question_pairs(questions, limit=2) == pairs[:2]
    out = tmp_path / "q"
    assert main(["sweep", "--dataset", "easy-vqa-color", "--pairs", "question", "--limit", "2", "--kinds", "mlp",
                 "--metric", "logit_diff", "--out", str(out)]) == 0
    assert "easy-vqa-color, paired by question" in capsys.readouterr().out
    table = pd.read_parquet(out / "sweep.parquet")
    assert len(table) == 2 and list(table.contrast) == list(table.counterfactual_answer)
    assert main(["sweep", "--pairs", "question", "--out", str(tmp_path / "x")]) == 2
    assert "give --dataset too" in capsys.readouterr().err
