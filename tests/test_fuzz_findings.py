"""Findings of a fuzz run: each input that was traced silently wrong, crashed with a raw exception, ran long without a
word or got a misleading message, now refused (or warned about) with a message that names the cause and the fix."""
from __future__ import annotations

import pytest
from fast_subset import lengthy

from blip_trace_widgets import BlipTraceError, WordSwap, load_model, trace


@pytest.fixture(scope="module")
def captioner():
    return load_model("demo-caption", device="cpu")


# ----- word swaps -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("word", ["zzqxj", "frobnicate"])
@lengthy
def test_a_swap_to_a_word_the_vocabulary_lacks_is_refused_naming_it(demo_bundle, demo_sample, word):
    image, question, _ = demo_sample  # "what is the color of the triangle?"
    with pytest.raises(BlipTraceError, match=rf"swaps in '{word}', which the model's vocabulary lacks.*\[UNK\]"):
        trace(demo_bundle, image, question, corruption=WordSwap({"triangle": word}), samples=1)
    with pytest.raises(BlipTraceError, match=f"'{word}'.*vocabulary lacks"):
        trace(demo_bundle, image, question, corruption=WordSwap(question=f"what is the color of the {word}?"), samples=1)


def test_a_swap_to_a_known_word_still_traces(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    result = trace(demo_bundle, image, question, corruption=WordSwap({"triangle": "circle"}), samples=1)
    assert result.config["corrupted_positions"] == [7]


def test_a_swap_in_a_text_with_its_own_unknown_word_is_not_refused_for_it(demo_bundle, demo_sample):
    image, _, _ = demo_sample
    result = trace(demo_bundle, image, "what is the color of the zzqxj triangle?",
                   corruption=WordSwap({"triangle": "circle"}), samples=1)
    assert result.config["corrupted_positions"] == [8]


@lengthy
def test_a_swap_whose_corrupt_tokens_miss_the_swapped_word_names_corrupt_tokens(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    with pytest.raises(BlipTraceError) as caught:
        trace(demo_bundle, image, question, corruption=WordSwap({"triangle": "circle"}), corrupt_tokens=[1], samples=1)
    message = str(caught.value)
    assert "corrupt_tokens [1]" in message and "7: 'triangle'" in message and "drop corrupt_tokens" in message
    assert "pick a counterfactual" not in message
    # naming the swapped position is fine: the swap acts there
    result = trace(demo_bundle, image, question, corruption=WordSwap({"triangle": "circle"}), corrupt_tokens=[1, 7],
                   samples=1)
    assert result.total_effect > 0


@lengthy
def test_a_swap_of_a_captioners_prompt_calls_it_the_prompt(captioner, demo_sample):
    image = demo_sample.image
    with pytest.raises(BlipTraceError, match="the swap word 'blue' is not in the prompt 'a red'"):
        trace(captioner, image, "a red", corruption=WordSwap({"blue": "green"}), samples=1)
    with pytest.raises(BlipTraceError, match="counterfactual prompt 'a zzqxj'.*vocabulary lacks"):
        trace(captioner, image, "a red", corruption=WordSwap({"red": "zzqxj"}), samples=1)
    with pytest.raises(BlipTraceError, match="outside the prompt's 3 tokens"):
        trace(captioner, image, "a red", corrupt="question", corrupt_tokens=[9], samples=1)
    with pytest.raises(BlipTraceError, match="the prompt has no content word"):
        trace(captioner, image, "", corrupt="question", corrupt_tokens="object", samples=1)


# ----- question sets --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("limit, message", [(0, "1 or more"), (-1, "1 or more"), (1.5, "whole number"),
                                            (True, "whole number"), ("2", "whole number")])
def test_easy_vqa_pairs_refuses_a_limit_that_is_no_count(limit, message):
    from blip_trace_widgets import easy_vqa_pairs

    with pytest.raises(BlipTraceError, match=f"limit must be .*{message}.*got"):
        easy_vqa_pairs(limit=limit)
    assert len(easy_vqa_pairs(limit=2)) == 2


@pytest.mark.parametrize("loader", ["hf_pairs", "hf_samples", "hf_caption_samples", "question_pairs",
                                    "load_vqa_subset"])
def test_every_loader_refuses_a_limit_that_is_no_count(loader):
    from blip_trace_widgets.datasets import subsets

    source = "easy-vqa-color" if loader == "load_vqa_subset" else []
    with pytest.raises(BlipTraceError, match="limit must be 1 or more"):
        getattr(subsets, loader)(source, limit=0)
    with pytest.raises(BlipTraceError, match="limit must be a whole number"):
        getattr(subsets, loader)(source, limit=1.5)


@pytest.mark.parametrize("dataset, message", [
    (42, "takes a datasets.Dataset, an iterable of rows .* got int 42"),
    (None, "takes a datasets.Dataset"),
    ({"train": [], "test": []}, r"has splits \['test', 'train'\]: pass one, e.g. ds\['train'\]"),
    ([1, 2], "row 0 of the dataset is int 1, not a row of named columns"),
])
@pytest.mark.parametrize("loader", ["hf_pairs", "hf_samples", "hf_caption_samples"])
def test_a_dataset_that_is_no_table_is_a_clear_error(loader, dataset, message):
    from blip_trace_widgets.datasets import subsets

    with pytest.raises(BlipTraceError, match=message):
        list(getattr(subsets, loader)(dataset))


PAIR_ROW = dict(image="a.png", counterfactual_image="b.png", question="what color is it?", answer="red",
                counterfactual_answer="blue")


@pytest.mark.parametrize("column", ["question", "answer", "counterfactual_answer", "image", "counterfactual_image"])
@pytest.mark.parametrize("missing", [None, "  "])
def test_hf_pairs_refuses_a_row_without_a_value_naming_it(column, missing):
    from blip_trace_widgets.datasets.subsets import hf_pairs

    rows = [PAIR_ROW, {**PAIR_ROW, column: missing}]
    with pytest.raises(BlipTraceError, match=f"row 1 has no '{column}'"):
        list(hf_pairs(rows))
    assert list(hf_pairs([PAIR_ROW]))[0].question == "what color is it?"


def test_hf_samples_and_captions_refuse_a_row_without_its_text():
    from blip_trace_widgets.datasets.subsets import hf_caption_samples, hf_samples

    with pytest.raises(BlipTraceError, match="row 0 has no 'question'"):
        list(hf_samples([{"image": "a.png", "question": None, "answer": "red"}]))
    with pytest.raises(BlipTraceError, match="row 0 has no 'caption'"):
        list(hf_caption_samples([{"image": "a.png", "caption": None}]))
    assert list(hf_samples([{"image": "a.png", "question": "what?", "answer": None}]))[0].answer is None


# ----- attention patterns ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [1.5, 1.0, True, "1"])
def test_an_attention_pattern_of_a_layer_that_is_no_index_is_a_clear_error(demo_bundle, demo_sample, layer):
    import numpy as np

    from blip_trace_widgets import Tracer
    from blip_trace_widgets.causal_trace.patterns import attention_pattern

    tracer = Tracer(demo_bundle, demo_sample.image, demo_sample.question)
    with pytest.raises(BlipTraceError, match="layer must be a whole layer index from 0 to 3, got"):
        attention_pattern(tracer, "question_encoder", "cross_attn_head", layer)
    assert attention_pattern(tracer, "question_encoder", "cross_attn_head", np.int64(1)).shape[0] == 4


# ----- what is scored -------------------------------------------------------------------------------------------

def test_an_unknown_contrast_is_called_the_contrast_and_named(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    with pytest.raises(BlipTraceError) as caught:
        trace(demo_bundle, image, question, metric="logit_diff", contrast="zzqxj", samples=1)
    message = str(caught.value)
    assert "the contrast 'zzqxj'" in message and "lacks this word" in message and "pick a contrast" in message
    assert "answer" not in message


@lengthy
def test_an_unknown_word_of_a_caption_is_named(captioner, demo_sample):
    with pytest.raises(BlipTraceError, match="caption 'a zzqxj circle': the model's vocabulary lacks the word 'zzqxj', "
                                             r"which becomes \[UNK\]; pick a caption"):
        trace(captioner, demo_sample.image, "", answer="a zzqxj circle", word=1, samples=1)
    with pytest.raises(BlipTraceError, match="lacks the words 'zzqxj', 'qqq', which become"):
        trace(captioner, demo_sample.image, "", answer="a zzqxj qqq circle", word=1, samples=1)
    with pytest.raises(BlipTraceError, match="the contrast 'zzqxj'"):
        trace(captioner, demo_sample.image, "", answer="a red circle", metric="logit_diff", contrast="zzqxj",
              word=1, samples=1)


# ----- the command line -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shape_png(tmp_path_factory):
    from blip_trace_widgets import demo_samples

    path = tmp_path_factory.mktemp("cli") / "shape.png"
    demo_samples()[0].image.save(path)
    return path


def _cli(capsys, *argv):
    from blip_trace_widgets import cli

    try:
        code = cli.main(list(argv))
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr()


@lengthy
def test_a_counterfactual_image_that_is_a_folder_is_called_a_folder(shape_png, tmp_path, capsys):
    code, out = _cli(capsys, "trace", "--image", str(shape_png), "--question", "what is the color of the triangle?",
                     "--counterfactual-image", str(tmp_path), "--out", str(tmp_path / "out"))
    assert code == 2 and "is a folder: name an image file in it" in out.err and "no such file" not in out.err


def test_every_swap_option_is_kept():
    from blip_trace_widgets import cli
    from blip_trace_widgets.causal_trace.command import _counterfactual
    from blip_trace_widgets.core.command_line import UsageError

    def swap(*argv):
        args = cli.build_parser().parse_args(["trace", "--image", "x.png", "--out", "o", *argv])
        return _counterfactual(args)

    assert dict(swap("--swap", "red=blue", "--swap", "circle=square").swap) == {"red": "blue", "circle": "square"}
    assert dict(swap("--swap", "red=blue,circle=square").swap) == {"red": "blue", "circle": "square"}
    assert dict(swap("--swap", "red=blue", "--swap", "red=blue").swap) == {"red": "blue"}
    with pytest.raises(UsageError, match="swaps 'red' twice, for 'blue' and 'green'"):
        swap("--swap", "red=blue", "--swap", "red=green")


@lengthy
def test_two_swap_options_trace_both_swaps(shape_png, tmp_path, capsys):
    code, out = _cli(capsys, "trace", "--image", str(shape_png), "--question", "what is the color of the triangle?",
                     "--swap", "triangle=circle", "--swap", "color=shape", "--samples", "1", "--kind", "mlp",
                     "--out", str(tmp_path))
    assert code == 0, out.err
    import json

    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert saved["config"]["corruption"]["swap"] == {"triangle": "circle", "color": "shape"}
    assert saved["config"]["corrupted_positions"] == [4, 7]


def test_an_image_text_matching_model_takes_an():
    from blip_trace_widgets.models import heads
    from blip_trace_widgets.models.anatomy import check_head_block

    assert heads.of("itm").a_model == "an image-text matching model"
    assert heads.of("vqa").a_model == "a visual question answering model"
    assert heads.of("instructblip").a_model.startswith("an InstructBLIP")
    with pytest.raises(BlipTraceError, match="^an image-text matching model has no answer decoder"):
        check_head_block("itm", "answer_decoder")


# ----- head sweeps ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def head_sweep(tmp_path_factory):
    """A command-line sweep of cross-attention head maps and hidden states, and one of head maps alone."""
    from blip_trace_widgets import cli

    out = {}
    for name, kinds in [("heads", "cross_attn_head"), ("mixed", "hidden,cross_attn_head")]:
        folder = tmp_path_factory.mktemp(name)
        code = cli.main(["sweep", "--dataset", "easy-vqa-color", "--limit", "2", "--kinds", kinds, "--samples", "2",
                         "--out", str(folder)])
        out[name] = (code, folder)
    return out


@pytest.mark.parametrize("name", ["heads", "mixed"])
@lengthy
def test_a_head_sweep_writes_its_averages_and_ranks_the_heads(head_sweep, name):
    import pandas as pd

    code, folder = head_sweep[name]
    assert code == 0
    for written in ("average_effect.csv", "average_heatmaps.png", "effect_by_layer.png", "top_heads.csv"):
        assert (folder / written).is_file(), written
    ranked = pd.read_csv(folder / "top_heads.csv")
    assert len(ranked) == 10 and set(ranked["kind"]) == {"cross_attn_head"}
    assert ranked["mean"].is_monotonic_decreasing


@lengthy
def test_effect_by_layer_draws_one_line_per_head(head_sweep):
    import pandas as pd

    from blip_trace_widgets.sweeps.plots import plot_effect_by_layer

    heads_only = plot_effect_by_layer(pd.read_parquet(head_sweep["heads"][1] / "sweep.parquet"))
    panel = heads_only.axes[0]
    assert len(heads_only.axes) == 1 and "each head" in panel.get_title()
    assert [t.get_text() for t in panel.get_legend().get_texts()] == ["h0", "h1", "h2", "h3"]
    mixed = plot_effect_by_layer(pd.read_parquet(head_sweep["mixed"][1] / "sweep.parquet"))
    assert [ax.get_title() for ax in mixed.axes][-1].endswith("each head") and len(mixed.axes) == 5


@lengthy
def test_a_vqa_sweep_says_its_direction(head_sweep, capsys):
    from blip_trace_widgets import cli

    code = cli.main(["sweep", "--dataset", "easy-vqa-color", "--limit", "1", "--samples", "1", "--kinds", "hidden",
                     "--out", str(head_sweep["heads"][1] / "again")])
    assert code == 0 and ", denoise;" in capsys.readouterr().out


# ----- long traces ----------------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


def test_a_long_python_trace_is_warned_about_before_it_starts(demo_bundle, demo_sample, monkeypatch):
    import warnings

    from blip_trace_widgets import Tracer
    from blip_trace_widgets.causal_trace.cost import WARN_SECONDS, LongTraceWarning, trace_cost

    image, question, _ = demo_sample
    big = dict(block="vision_encoder", kind="mlp", window=3, samples=1000)  # minutes on the demo model
    priced = trace_cost(Tracer(demo_bundle, image, question), **big)
    assert priced.seconds > WARN_SECONDS
    said: list[str] = []

    def started(self, config, **_):  # the trace itself is not run: its start is where the warning must be
        said.extend(str(w.message) for w in caught if issubclass(w.category, LongTraceWarning))
        raise _Stop

    monkeypatch.setattr(Tracer, "trace", started)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(_Stop):
        warnings.simplefilter("always")
        trace(demo_bundle, image, question, **big)
    assert len(said) == 1 and said[0] == priced.warning()
    assert "1000 samples" in said[0] and " min on this machine" in said[0] and "Fewer samples" in said[0]


@lengthy
def test_a_short_python_trace_says_nothing(demo_bundle, demo_sample):
    import warnings

    from blip_trace_widgets.causal_trace.cost import LongTraceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", LongTraceWarning)
        trace(demo_bundle, demo_sample.image, demo_sample.question, samples=2)


@lengthy
def test_every_word_of_a_caption_is_priced_together(captioner, demo_sample, monkeypatch):
    import warnings

    from blip_trace_widgets import Tracer
    from blip_trace_widgets.causal_trace import cost
    from blip_trace_widgets.causal_trace.cost import LongTraceWarning

    image = demo_sample.image
    tracer = Tracer(captioner, image, "")
    words = [cost.trace_cost(tracer, samples=1, word=k, block="caption_decoder").seconds for k in range(3)]
    monkeypatch.setattr(cost, "WARN_SECONDS", (max(words) + sum(words)) / 2)  # any one word under it, all three over
    with warnings.catch_warnings():
        warnings.simplefilter("error", LongTraceWarning)
        for k in range(3):
            trace(captioner, image, "", samples=1, word=k)
    with pytest.warns(LongTraceWarning, match="this trace is large"):
        trace(captioner, image, "", samples=1, word="all")


@pytest.mark.parametrize("seconds, said", [(12.4, "12 s"), (540, "9 min"), (4 * 3600, "4.0 h")])
def test_a_rough_time_is_said_in_its_unit(seconds, said):
    from blip_trace_widgets.causal_trace.cost import duration

    assert duration(seconds) == said


@lengthy
def test_the_command_line_prices_every_word_of_a_caption_too(shape_png, tmp_path, capsys, monkeypatch):
    from blip_trace_widgets.causal_trace import cost

    monkeypatch.setattr(cost, "WARN_SECONDS", 0.0)
    code, out = _cli(capsys, "trace", "--model", "demo-caption", "--image", str(shape_png), "--word", "all",
                     "--samples", "1", "--out", str(tmp_path))
    assert code == 0 and "warning: this trace is large" in out.err


@lengthy
def test_a_caption_sweep_counts_captions_not_questions(tmp_path, capsys):
    code, out = _cli(capsys, "sweep", "--model", "demo-caption", "--dataset", "easy-vqa-captions", "--limit", "1",
                     "--samples", "1", "--kinds", "hidden", "--out", str(tmp_path))
    assert code == 0 and "1 captions from easy-vqa-captions" in out.out and "questions from" not in out.out


@lengthy
def test_a_swap_and_a_counterfactual_image_together_name_the_text(shape_png, tmp_path, capsys):
    code, out = _cli(capsys, "trace", "--model", "demo-caption", "--image", str(shape_png), "--prompt", "a red",
                     "--swap", "red=blue", "--counterfactual-image", str(shape_png), "--out", str(tmp_path))
    assert code == 2 and "--swap the text's words" in out.err
