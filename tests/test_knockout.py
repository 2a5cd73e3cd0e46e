"""Attention knockout, against a loop of the model's own forward pass, one pass per row.

The loop cuts edges with forward hooks on each attention's probability dropout (``.self.dropout``, the module
BLIP applies to the softmax's output): the cut edges' probabilities are zeroed and the rest renormalised, and a
query with nothing left reads nothing. It spells the module paths out itself and shares nothing with the engine
but the resolved edge groups (whose resolution is checked on its own below) and the tokens scored.
"""
from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import pytest
import torch
from fast_subset import lengthy, lengthy_except
from tiny_blip import tiny_captioner, tiny_matcher, tiny_model, tiny_processor
from tolerance import assert_close, within_rounding

from blip_trace_widgets import BlipTraceError, load_model
from blip_trace_widgets.attention_knockout.edges import Edges
from blip_trace_widgets.attention_knockout.knockout import Knockout, KnockoutConfig, knockout
from blip_trace_widgets.attention_knockout.result import KnockoutResult
from blip_trace_widgets.core.regions import Box, Outside

LAYERS = {"question_encoder": "text_encoder.encoder.layer", "answer_decoder": "text_decoder.bert.encoder.layer",
          "caption_decoder": "text_decoder.bert.encoder.layer", "itm_encoder": "text_encoder.encoder.layer"}
ATTENTION = {"cross": "crossattention", "self": "attention"}
TEXTS = {"vqa": "what color is the shape?", "caption": "", "itm": "a red circle"}


@pytest.fixture(scope="module")
def bundles():
    return {"vqa": load_model((tiny_model(seed=1, layers=4), tiny_processor()), device="cpu"),
            "caption": load_model((tiny_captioner(seed=2, layers=4), tiny_processor()), device="cpu"),
            "itm": load_model((tiny_matcher(seed=3, layers=4), tiny_processor()), device="cpu")}


class KnockLoop:
    """p(answer) from the model's own forward pass with edges cut by hooks."""

    def __init__(self, knock: Knockout, config: KnockoutConfig):
        self.tracer, self.model = knock.tracer, knock.tracer.model
        self.target = knock.target(config)
        self.groups = knock.groups(config, self.target)
        pixels = self.tracer.bundle.processor.image_processor(self.tracer.image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            self.embeds = self.model.vision_model(pixel_values=pixels)[0]
        self.question = torch.tensor([list(self.tracer.question_ids)])

    def forward(self) -> float:
        model, target, head = self.model, self.target, self.tracer.head
        with torch.no_grad():
            if head == "itm":
                states = model.text_encoder(input_ids=self.question, encoder_hidden_states=self.embeds)[0]
                return float(torch.softmax(model.itm_head(states[:, 0]).double(), -1)[0, 1])
            states = self.embeds
            if head == "vqa":
                states = model.text_encoder(input_ids=self.question, encoder_hidden_states=self.embeds)[0]
            logits = model.text_decoder(input_ids=torch.tensor([list(target.inputs)]), encoder_hidden_states=states).logits
            logprobs = torch.log_softmax(logits.double(), -1)
            return float(sum(logprobs[0, target.offset + k, t] for k, t in enumerate(target.tokens)).exp())

    def cut(self, group, layers, empty: str = "zero") -> float:
        with ExitStack() as stack:
            for j in layers:
                name = f"{LAYERS[group.block]}.{j}.{ATTENTION[group.attention]}.self.dropout"

                def hook(module, inputs, probs, edges=group.edges):
                    kept = probs * ~edges
                    total = kept.sum(-1, keepdim=True)
                    emptied = torch.zeros_like(kept)
                    if empty == "mean":  # the uniform average over the cut keys the model's own mask let it see
                        seen = (edges & (probs > 0)).to(probs.dtype)
                        emptied = seen / seen.sum(-1, keepdim=True)
                    return torch.where(total > 0, kept / total.clamp_min(1e-30), emptied)

                stack.callback(self.model.get_submodule(name).register_forward_hook(hook).remove)
            return self.forward()

    def grid(self, window: int, empty: str = "zero") -> np.ndarray:
        layers = len(self.model.get_submodule(LAYERS[self.groups[0].block]))
        return np.array([[self.cut(g, range(max(0, layer - window // 2), min(layers, layer - (-window // 2))), empty)
                          for layer in range(layers)] for g in self.groups])


CASES = [
    ("vqa", Edges()), ("vqa", Edges(keys="cls")), ("vqa", Edges(keys=Box(0.0, 0.0, 0.5, 0.5))),
    ("vqa", Edges(keys=Outside(Box(0.0, 0.0, 0.5, 0.5)), queries=(0, 2))), ("vqa", Edges(queries="each")),
    ("vqa", Edges(attention="self", keys=0)), ("vqa", Edges(attention="self", queries=3, keys=(1, 2))),
    ("vqa", Edges(block="answer_decoder")), ("vqa", Edges(block="answer_decoder", keys=(1, 2))),
    ("vqa", Edges(block="answer_decoder", attention="self", keys=0)),
    ("caption", Edges()), ("caption", Edges(keys=Box(0.5, 0.5, 1.0, 1.0))), ("caption", Edges(attention="self", keys=0)),
    ("itm", Edges()), ("itm", Edges(queries=0, keys="cls")), ("itm", Edges(attention="self", keys=(1, 2))),
]


@pytest.mark.parametrize("head,edges", lengthy_except(CASES, ("itm", Edges(queries=0, keys="cls"))),
                         ids=[f"{h}-{e.describe()}" for h, e in CASES])
@pytest.mark.parametrize("window", lengthy_except([1, 3], 1))
def test_knockout_matches_a_loop_of_the_model_forward(bundles, image, head, edges, window):
    answer = {"caption": "red blue circle", "vqa": "red blue"}.get(head)
    knock = Knockout.of(bundles[head], image, TEXTS[head])
    config = KnockoutConfig(edges=(edges,), window=window, answer=answer, word=1 if head == "caption" else None)
    result = knock.run(config)
    loop = KnockLoop(knock, config)
    assert_close(result.scores, loop.grid(window))
    assert result.clean_score == within_rounding(loop.forward())
    if edges == Edges():  # cutting the whole image does something: the comparison could fail
        assert np.abs(result.changes).max() > 0.01  # 0.04 at window 1 under transformers 4.40's random init


def test_groups_resolve_to_the_edges_they_name(bundles, image):
    knock = Knockout.of(bundles["vqa"], image, TEXTS["vqa"])
    config = KnockoutConfig(edges=(Edges(keys=Box(0.0, 0.0, 0.5, 0.5)), Edges(keys=Outside(Box(0.0, 0.0, 0.5, 0.5))),
                                   Edges(keys="cls", queries="object"), Edges(block="answer_decoder", keys=1)))
    groups = knock.groups(config, knock.target(config))
    tokens = list(bundles["vqa"].tokenizer.convert_ids_to_tokens(list(knock.tracer.question_ids)))
    # a 32-pixel image in 8-pixel patches: 4 x 4 patches after [CLS]; the top-left quarter is patches 1, 2, 5, 6
    assert groups[0].edges.shape == (len(tokens), 17)
    assert groups[0].edges.all(0).nonzero().flatten().tolist() == [1, 2, 5, 6]
    assert groups[1].edges.all(0).nonzero().flatten().tolist() == [3, 4, 7, 8, *range(9, 17)]
    assert groups[2].edges.any(1).nonzero().flatten().tolist() == [tokens.index("shape")]
    assert groups[2].edges.any(0).nonzero().flatten().tolist() == [0]
    assert groups[3].edges.shape[1] == len(tokens) and groups[3].edges.all(0).nonzero().flatten().tolist() == [1]
    assert [g.label for g in groups] == ["box (0, 0, 0.5, 0.5) → question", "outside box (0, 0, 0.5, 0.5) → question",
                                         "image [CLS] → object", "token 1 → answer in the answer decoder"]


def test_cutting_nothing_is_the_clean_run_exactly(bundles, image):
    from blip_trace_widgets.models.attention import Cut
    from blip_trace_widgets.models.runs import cut_staircase

    knock = Knockout.of(bundles["vqa"], image, TEXTS["vqa"])
    tracer = knock.tracer
    block = tracer.blocks.reader
    clean = block.clean_run(tracer.clean_pass, knock.target(KnockoutConfig()))
    cross = block.clean_cross(tracer.clean_pass, None)
    t, n = clean.inputs[0].shape[1], tracer.clean.image_embeds.shape[1]
    none = torch.zeros(1, t, n, dtype=torch.bool)
    final = cut_staircase(block.stack, clean, cross, [0], lambda j, rows: (None, Cut(none)))
    assert torch.equal(final[0, 0], clean.output[0])


def test_a_query_that_reads_nothing_gets_a_zero_context(bundles, image):
    """Every image token cut at a layer: that layer's cross-attention adds only its output bias (a zero context),
    not the projection of the uniform average of the image's values."""
    from blip_trace_widgets.models.attention import Cut, attention_weights

    tracer = Knockout.of(bundles["vqa"], image, TEXTS["vqa"]).tracer
    stack = tracer.blocks.reader.stack
    clean = tracer.clean.text
    keys, values = stack.cross_kv(0, tracer.clean.image_embeds)
    t, n = clean.inputs[0].shape[1], keys.shape[2]
    every = torch.ones(1, t, n, dtype=torch.bool)
    h1 = stack.layers[0].self_norm(stack.layers[0].self_out(torch.zeros(1, t, keys.shape[1] * keys.shape[-1]))
                                   + clean.inputs[0])
    q = stack._split(stack.layers[0].cross_query(h1))
    assert torch.count_nonzero(attention_weights(q, keys, None, Cut(every))) == 0
    seen = {}

    def edit(kind, x):
        seen[kind] = x
        return x

    edit.kinds = frozenset({"cross_attn"})
    stack.layer(0, clean.inputs[0][:, None], (keys[:, None], values[:, None]), None, edit, cuts=(None, Cut(every)))
    bias = stack.layers[0].cross_out.bias
    torch.testing.assert_close(seen["cross_attn"][0, 0], bias.expand(t, -1))
    uniform = stack.layers[0].cross_out(values.mean(2).transpose(0, 1).reshape(1, -1))
    assert (uniform - bias).abs().max() > 1e-3  # the uniform average would differ


@pytest.mark.parametrize("edges, window, message", [
    (Edges(keys=Outside(Box(0.0, 0.0, 1.0, 1.0))), 1, "no image patch"),
    (Edges(), 9, "wider than the 4 layers of the question encoder"),
    (Edges(queries="verb"), 1, "role"),
    (Edges(keys="middle"), 1, "keys='middle'"),
    (Edges(block="caption_decoder"), 1, "caption"),
])
def test_bad_edges_get_one_clear_error(bundles, image, edges, window, message):
    with pytest.raises(BlipTraceError, match=message):
        knockout(bundles["vqa"], image, TEXTS["vqa"], edges=edges, window=window)


def test_bad_settings_are_refused_before_running():
    with pytest.raises(BlipTraceError, match="empty group"):
        Edges(queries=())
    with pytest.raises(BlipTraceError, match="unknown attention"):
        Edges(attention="mlp")
    with pytest.raises(BlipTraceError, match="text block"):
        Edges(block="vision_encoder")
    with pytest.raises(BlipTraceError, match="at least 1 layer"):
        KnockoutConfig(window=0)
    with pytest.raises(BlipTraceError, match="at least one group"):
        KnockoutConfig(edges=())
    with pytest.raises(BlipTraceError, match="an image region can only be keys"):
        Edges(queries=Box(0, 0, 1, 1))


@pytest.mark.parametrize("group_edges,empty", [(Edges(keys=Box(0.0, 0.0, 0.5, 0.5)), "zero"), (Edges(), "mean")])
@lengthy
def test_dial_at_zero_is_the_cut_and_its_gradient_is_the_estimate(bundles, image, group_edges, empty):
    """The estimate's multiplier: at 0 it gives the knockout's weights; its gradient matches a finite difference."""
    from blip_trace_widgets.models.attention import Cut, Dial

    torch.manual_seed(0)
    scores = torch.randn(2, 3, 4, 5)
    edges = torch.zeros(4, 5, dtype=torch.bool)
    edges[0] = True
    edges[1, 2:] = True
    dialled = Dial(edges[None], torch.tensor([0.0])).apply(scores)
    torch.testing.assert_close(dialled, Cut(edges[None]).apply(scores), atol=1e-6, rtol=0)
    torch.testing.assert_close(Dial(edges[None], torch.tensor([1.0])).apply(scores), torch.softmax(scores, -1))

    knock = Knockout.of(bundles["vqa"], image, TEXTS["vqa"])
    config = KnockoutConfig(edges=(group_edges,), window=1, answer="red blue", empty=empty)
    estimate = knock.run(KnockoutConfig(config.edges, 1, "red blue", None, "estimate", empty=empty))
    exact = knock.run(config)
    assert estimate.is_estimate and not exact.is_estimate
    slope = (exact.clean_score - estimate.scores)  # = Σ ∂p/∂scale over the window (one layer)
    eps = 1e-3
    group = knock.groups(config, knock.target(config))[0]
    block = knock.tracer.blocks.reader
    target = knock.target(config)
    for layer in range(4):
        clean = block.clean_run(knock.tracer.clean_pass, target)
        h = clean.inputs[0][:, None]
        cross = block.clean_cross(knock.tracer.clean_pass, target)
        with torch.no_grad():
            for j in range(4):
                dial = Dial(group.edges[None], torch.tensor([1.0 - eps if j == layer else 1.0]), empty)
                h = block.stack.layer(j, h, cross[j], None, cuts=(None, dial))
            logits = block.logits(knock.tracer.clean_pass, h, target)
        from blip_trace_widgets.core.scoring import score_rows

        p = float(score_rows(logits.reshape(-1, *logits.shape[2:]), target, "prob")[0])
        assert abs((exact.clean_score - p) / eps - slope[0, layer]) < 1e-3 * max(1.0, abs(slope[0, layer])) + 1e-4


@lengthy
def test_results_round_trip_and_refuse_what_is_not_one(bundles, image, tmp_path):
    result = knockout(bundles["vqa"], image, TEXTS["vqa"], edges=[Edges(), Edges(queries="each")], window=3)
    path = result.save(tmp_path / "k.json")
    again = KnockoutResult.load(path)
    assert again == result and np.array_equal(again.changes, result.changes)
    frame = result.to_dataframe()
    assert len(frame) == len(result.labels) * result.num_layers
    assert set(frame.columns) >= {"group", "layer", "p", "change", "tiny"}
    (tmp_path / "bad.json").write_bytes(b"\x89PNG\x00\xff")
    with pytest.raises(BlipTraceError, match="not"):
        KnockoutResult.load(tmp_path / "bad.json")
    for broken in ({"kind": "knockout", "format": True}, {"kind": "trace"}, {**result.to_dict(), "window": 0},
                   {**result.to_dict(), "scores": [["x"]]}):
        with pytest.raises(BlipTraceError):
            KnockoutResult.from_dict(broken)


@lengthy
def test_plots_flag_groups_without_effect(bundles, image):
    result = KnockoutResult(["a", "b"], np.array([[0.2, 0.5], [0.8995, 0.9]]), 0.9, window=1, answer="red")
    assert result.tiny().tolist() == [False, True]
    ax = result.plot()
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels[:2] == ["a", "b (no effect)"]
    title = ax.get_title().replace("\n", " ")
    assert "1 group moves p by < 0.01" in title and "clean p = 0.9" in title
    rising = KnockoutResult(["up"], np.array([[0.95, 0.9]]), 0.5, window=1, answer="red")
    assert rising.plot().get_ylim()[1] >= 90  # a rise stays visible
    per_token = knockout(bundles["vqa"], image, TEXTS["vqa"], edges=Edges(queries="each"))
    ax = per_token.plot_tokens()
    assert [t.get_text() for t in ax.get_yticklabels()] == per_token.labels


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_the_command_line_writes_a_plot_and_a_result(tmp_path, demo_sample, capsys):
    from blip_trace_widgets.cli import main

    image, question, _ = demo_sample
    image.save(tmp_path / "shape.png")
    args = ["knockout", "--image", str(tmp_path / "shape.png"), "--question", question, "--out", str(tmp_path / "out")]
    assert main([*args, "--edges", "image", "--edges", "object", "--edges", "decoder"]) == 0
    assert main([*args, "--queries", "each"]) == 0
    saved = sorted((tmp_path / "out").glob("*.json"))
    assert len(saved) == 2 and len(list((tmp_path / "out").glob("*.png"))) == 2
    results = [KnockoutResult.load(path) for path in saved]
    assert sorted(len(r.labels) for r in results) == [3, 2 * len(results[0].config["tokens"])]
    printed = capsys.readouterr().out
    assert "image → question: strongest at layer" in printed
    assert main([*args, "--window", "99"]) == 2
    assert main([*args, "--edges", "box:1,2"]) == 2
    assert main(["knockout", "--out", str(tmp_path / "out")]) == 2  # neither --image nor --dataset
    assert "give --image" in capsys.readouterr().err


@lengthy
def test_a_sweep_averages_groups_with_intervals(demo_bundle, tmp_path):
    from blip_trace_widgets import demo_samples
    from blip_trace_widgets.attention_knockout.sweep import knockout_average, knockout_sweep, plot_knockout_average
    from blip_trace_widgets.cli import main

    samples = demo_samples(per_type=1)
    table = knockout_sweep(demo_bundle, samples, edges=["image", "object", Edges(keys="cls")], window=1)
    assert len(table) == len(samples) * 3 * table["layer"].nunique()
    averages = knockout_average(table)
    first = averages[(averages.group == "image → question") & (averages.layer == 1)].iloc[0]
    rows = table[(table.group == "image → question") & (table.layer == 1)]
    assert first.change == pytest.approx(rows.change.mean()) and first.low <= first.change <= first.high
    assert first.questions == len(samples)
    changes = rows.groupby("sample").change.mean().to_numpy()  # a one-sample t over the questions, by hand
    t = changes.mean() / (changes.std(ddof=1) / np.sqrt(len(changes)))
    from blip_trace_widgets.core.significance import t_two_sided

    assert first.p_value == pytest.approx(t_two_sided(t, len(changes) - 1))
    assert (averages.q_value >= averages.p_value - 1e-12).all() and averages.significant.dtype == bool
    ax = plot_knockout_average(averages)
    assert len(ax.get_lines()) >= 3 and "significant (q < 0.05" in ax.get_title().replace("\n", " ")
    with pytest.raises(BlipTraceError, match="each"):
        knockout_sweep(demo_bundle, samples, edges=[Edges(queries="each")])
    assert main(["knockout", "--dataset", "easy-vqa-color", "--limit", "2", "--edges", "image",
                 "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"knockout_sweep.csv", "knockout_average.csv",
                                                    "knockout_average.png"}


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_the_explorer_follows_its_controls_and_shows_errors_inside(demo_bundle):
    from blip_trace_widgets.widgets import KnockoutExplorer

    explorer = KnockoutExplorer(demo_bundle, background=False)
    assert explorer.result.labels == ["image → question", "box (0, 0, 0.5, 0.5) → question",
                                      "outside box (0, 0, 0.5, 0.5) → question"]
    assert explorer.plot.value[:4] == b"\x89PNG" and "clean p(" in explorer.status.value
    side = explorer.columns.max
    explorer.columns.value, explorer.rows.value = (side // 2, side), (side // 2, side)
    assert explorer.result.labels[1] == "box (0.5, 0.5, 1, 1) → question"
    explorer.window.value = 1
    assert explorer.result.window == 1
    explorer.groups.value = ("image", "decoder")
    assert explorer.result.labels[1] == "question → answer in the answer decoder"
    explorer.queries.value = "each"
    tokens = len(explorer.queries.options) - 2  # less "every token" and "each token"
    assert len(explorer.result.labels) == tokens + 1  # each token reading the image, and the decoder's group
    explorer.queries.value = "every"
    explorer.method.value = "estimate"
    assert explorer.result.is_estimate
    explorer.groups.value = ("region",)
    explorer.columns.value = (1, 1)  # an empty region: one clear error inside the explorer, the plot hidden
    assert "region is empty" in explorer.error.value and explorer.plot.layout.visibility == "hidden"
    explorer.columns.value = (0, 2)
    assert explorer.error.value == "" and explorer.plot.layout.visibility == "visible"
    explorer.question_box.value = "what shape is in the image?"
    assert explorer.result.question == "what shape is in the image?"


MEAN_CASES = [
    ("vqa", Edges()), ("vqa", Edges(block="answer_decoder")), ("vqa", Edges(keys=Box(0.0, 0.0, 0.5, 0.5))),
    ("vqa", Edges(block="answer_decoder", attention="self", keys=(0, 1))),  # causal: row 0 never reads key 1
    ("caption", Edges()), ("caption", Edges(attention="self", keys=(0, 1))), ("itm", Edges(queries=(0, 1))),
]


@pytest.mark.parametrize("head,edges", lengthy_except(MEAN_CASES, ("itm", Edges(queries=(0, 1)))),
                         ids=[f"{h}-{e.describe()}" for h, e in MEAN_CASES])
@pytest.mark.parametrize("window", lengthy_except([1, 3], 1))
def test_empty_mean_matches_the_model_forward_with_emptied_rows_read_uniformly(bundles, image, head, edges, window):
    """empty="mean": a query with every key cut reads the uniform average of the cut keys its own mask let it see,
    as the hook in this file computes it from the model's own probabilities; "zero" reads nothing."""
    answer = {"caption": "red blue circle", "vqa": "red blue"}.get(head)
    knock = Knockout.of(bundles[head], image, TEXTS[head])
    word = 1 if head == "caption" else None
    mean = knock.run(KnockoutConfig(edges=(edges,), window=window, answer=answer, word=word, empty="mean"))
    zero = knock.run(KnockoutConfig(edges=(edges,), window=window, answer=answer, word=word))
    loop = KnockLoop(knock, KnockoutConfig(edges=(edges,), window=window, answer=answer, word=word))
    assert_close(mean.scores, loop.grid(window, "mean"))
    assert mean.empty == "mean" and zero.empty == "zero"
    if edges.keys is None and edges.queries is None:  # every row emptied: the two rules must differ here, by far
        assert np.abs(mean.changes - zero.changes).max() > 1e-3  # more than rounding (0.03 to 0.6 on the tiny models)
    if isinstance(edges.keys, Box):  # every query keeps a key: the rule never applies
        assert_close(mean.scores, zero.scores)


@pytest.mark.parametrize("empty", ["zero", "mean"])
def test_dial_at_zero_is_the_cut_under_both_empty_rules(empty):
    from blip_trace_widgets.models.attention import Cut, Dial

    torch.manual_seed(1)
    scores = torch.randn(2, 3, 4, 5)
    scores[..., 0, 1:] = torch.finfo(scores.dtype).min  # a causal-like row: only key 0 visible
    edges = torch.zeros(4, 5, dtype=torch.bool)
    edges[0] = True  # row 0 loses its only visible key
    edges[1] = True  # row 1 loses every key
    edges[2, 2:] = True
    for scale in (0.0, 1.0):
        dialled = Dial(edges[None], torch.tensor([scale]), empty).apply(scores)
        expected = Cut(edges[None], empty).apply(scores) if scale == 0 else torch.softmax(scores, -1)
        torch.testing.assert_close(dialled, expected, atol=1e-6, rtol=0)
    cut = Cut(edges[None], empty).apply(scores)
    if empty == "mean":
        torch.testing.assert_close(cut[..., 0, :], torch.tensor([1.0, 0, 0, 0, 0]).expand(2, 3, 5))  # not the future
        torch.testing.assert_close(cut[..., 1, :], torch.full((2, 3, 5), 0.2))
    else:
        assert torch.count_nonzero(cut[..., :2, :]) == 0


@lengthy
def test_a_whole_image_cut_on_the_demo_under_both_rules(demo_bundle, demo_sample):
    """The figures docs/reference.md quotes: the whole image cut at window 3 around layer 2."""
    image, question, _ = demo_sample
    zero = knockout(demo_bundle, image, question, edges="image", window=3)
    mean = knockout(demo_bundle, image, question, edges="image", window=3, empty="mean")
    assert zero.scores[0, 2] == pytest.approx(0.0004, abs=5e-5) and mean.scores[0, 2] == pytest.approx(0.64, abs=5e-3)
    for result, rule in ((zero, "reads zero"), (mean, "reads their mean")):
        ax = result.plot()
        title = ax.get_title().replace("\n", " ")
        assert rule in title and "deterministic" in title
        assert rule in ax.get_legend().get_title().get_text()
    again = KnockoutResult.from_json(mean.to_json())
    assert again.empty == "mean" and again == mean
    with pytest.raises(BlipTraceError, match="empty='half'.*'zero', 'mean'"):
        KnockoutConfig(empty="half")


@lengthy
def test_a_caption_word_or_a_matchers_answer_is_refused_as_trace_refuses_it(bundles, image, tmp_path):
    with pytest.raises(BlipTraceError, match="word picks a word of a caption"):
        knockout(bundles["vqa"], image, TEXTS["vqa"], word=1)
    with pytest.raises(BlipTraceError, match="no answer"):
        knockout(bundles["itm"], image, TEXTS["itm"], answer="a blue square")
    from blip_trace_widgets.cli import main

    bundles["vqa"].model.save_pretrained(tmp_path / "vqa")
    bundles["vqa"].processor.save_pretrained(tmp_path / "vqa")
    image.save(tmp_path / "image.png")
    code = main(["knockout", "--model", str(tmp_path / "vqa"), "--image", str(tmp_path / "image.png"),
                 "--question", TEXTS["vqa"], "--word", "1", "--window", "1", "--out", str(tmp_path / "out")])
    assert code == 2 and not (tmp_path / "out").exists()


@lengthy
def test_edges_by_name_and_clear_errors_for_what_is_not_a_group(bundles, image):
    named = knockout(bundles["vqa"], image, TEXTS["vqa"], edges="image", window=1)
    listed = knockout(bundles["vqa"], image, TEXTS["vqa"], edges=["image", Edges(keys="cls")], window=1)
    assert named.labels == ["image → question"] and listed.labels == ["image → question", "image [CLS] → question"]
    np.testing.assert_array_equal(named.scores[0], listed.scores[0])
    with pytest.raises(BlipTraceError, match="edges=None names no group.*image"):
        knockout(bundles["vqa"], image, TEXTS["vqa"], edges=None)
    with pytest.raises(BlipTraceError, match="unknown edges 'imgae'"):
        knockout(bundles["vqa"], image, TEXTS["vqa"], edges="imgae")
    with pytest.raises(BlipTraceError, match="KnockoutConfig takes Edges.*parse_edges"):
        KnockoutConfig(edges="image")
    with pytest.raises(BlipTraceError, match="the image's \\[CLS\\], but self-attention reads the block's own "
                                             "positions.*Edges\\(keys='cls'\\)"):
        Edges(attention="self", keys="cls")
    with pytest.raises(BlipTraceError, match="an image region, but the answer decoder's cross-attention"):
        Edges(block="answer_decoder", keys=Box(0, 0, 1, 1))


def test_loading_what_is_not_a_saved_knockout_says_so(bundles, image, tmp_path):
    with pytest.raises(BlipTraceError, match="no such file"):
        KnockoutResult.load(tmp_path / "missing.json")
    with pytest.raises(BlipTraceError, match="is a folder"):
        KnockoutResult.load(tmp_path)
    result = knockout(bundles["vqa"], image, TEXTS["vqa"], window=1)
    for field, value, message in (("head", "gpt", "unknown head 'gpt'"), ("method", "guess", "unknown knockout method"),
                                  ("empty", "half", "empty='half'")):
        path = tmp_path / f"{field}.json"
        path.write_text(result.to_json().replace(f'"{field}": "{getattr(result, field)}"', f'"{field}": "{value}"'))
        with pytest.raises(BlipTraceError, match=message):
            KnockoutResult.load(path)
    old = result.to_dict()
    del old["empty"]  # saved before the rule was a choice: cut with "zero"
    assert KnockoutResult.from_dict(old).empty == "zero"


def test_the_command_lines_help_is_clean_and_complete():
    import argparse

    from blip_trace_widgets.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    knockout_help = " ".join(commands["knockout"].format_help().split())
    assert "95% intervals" in knockout_help and "%%" not in knockout_help
    assert "--empty {zero,mean}" in knockout_help
    for command in ("knockout", "sweep"):
        helps = {option: action.help for action in commands[command]._actions for option in action.option_strings}
        for option in ("--dtype", "--device"):
            assert helps[option] and "default" in helps[option], (command, option)


@pytest.mark.slow  # an explorer round trip: the full suite runs it
def test_the_explorer_shows_its_defaults_and_refuses_a_window_it_cannot_hold(demo_bundle):
    from blip_trace_widgets.widgets import KnockoutExplorer

    explorer = KnockoutExplorer(demo_bundle, background=False)
    assert explorer.queries.label == "every token" and explorer.queries.index == 0  # not a blank dropdown
    assert explorer.config.edges[0].queries is None
    assert explorer.empty.value == "zero" and explorer.result.empty == "zero"
    explorer.empty.value = "mean"
    assert explorer.result.empty == "mean" and explorer.error.value == ""
    assert KnockoutExplorer(demo_bundle, background=False, empty="mean", window=1).result.window == 1
    layers = explorer.window.max
    for window in (layers + 1, 99, 0, -1, 2.5):
        with pytest.raises(BlipTraceError, match=f"window={window!r}: this explorer cuts 1 to {layers} layers"):
            KnockoutExplorer(demo_bundle, background=False, window=window)
    with pytest.raises(BlipTraceError, match="empty='half'"):
        KnockoutExplorer(demo_bundle, background=False, empty="half")


@lengthy
def test_a_sweep_of_a_matcher_scoring_expected_answers_scores_the_match(bundles, image):
    """A matcher scores the match of each item's caption, as trace sweeps do: its expected answer is that caption,
    never an answer to score (which a knockout of a matcher refuses)."""
    from blip_trace_widgets.attention_knockout.sweep import knockout_sweep

    items = [(image, "", "a red circle")]
    expected = knockout_sweep(bundles["itm"], items, edges=["image"], window=1, scored="expected")
    model = knockout_sweep(bundles["itm"], items, edges=["image"], window=1)
    assert expected["p"].tolist() == model["p"].tolist() and set(expected["empty"]) == {"zero"}
    import pandas as pd

    from blip_trace_widgets.attention_knockout.sweep import knockout_average, plot_knockout_average

    mean = knockout_sweep(bundles["itm"], items, edges=["image"], window=1, empty="mean")
    assert "reads their mean" in plot_knockout_average(knockout_average(mean)).get_title()
    with pytest.raises(BlipTraceError, match="mixes knockouts with empty='mean' and 'zero'"):
        knockout_average(pd.concat([model, mean]))


def test_strongest_skips_groups_with_no_change_and_refuses_a_result_with_none():
    mixed = KnockoutResult(["cut", "beyond"], np.array([[0.2, 0.5], [np.nan, np.nan]]), 0.9, window=1, answer="red")
    assert [label for label, _, _ in mixed.strongest()] == ["cut"]
    empty = KnockoutResult(["beyond"], np.array([[np.nan, np.nan]]), 0.9, window=1, answer="red")
    with pytest.raises(BlipTraceError, match="every entry is NaN"):
        empty.strongest()
