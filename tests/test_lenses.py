"""Lenses: the last layer's lens is the model's own output distribution, and every layer's is its hidden state
through the head, each checked against the model's own forward pass (transformers' modules called here, with
output_hidden_states and the head applied in the test); one forward pass per lens; results round-trip."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fast_subset import lengthy, lengthy_except
from tiny_blip import (
    BLIP2_VOCAB,
    tiny_blip2_config,
    tiny_blip2_processor,
    tiny_blip2_t5,
    tiny_instructblip,
    tiny_instructblip_processor,
    tiny_t5_text_config,
)
from tolerance import assert_close

from blip_trace_widgets import BlipTraceError, load_model
from blip_trace_widgets.lenses import LensResult, TunedLens, lens, query_words, train_tuned_lens
from blip_trace_widgets.lenses.core import lens_log_probs
from blip_trace_widgets.lenses.reading import read

QUESTION = "what color is the shape?"
QUERIES = 4


def _pixels(bundle, image):
    return bundle.processor.image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]


def _blip_reference(bundle, image, text):
    """BLIP's VQA or captioning decoder: (per-layer log p [L, T, V] through cls, the decoder's own logits)."""
    model = bundle.model
    bos = model.config.text_config.bos_token_id
    with torch.no_grad():
        embeds = model.vision_model(pixel_values=_pixels(bundle, image))[0]
        if bundle.head == "caption":
            ids = bundle.tokenizer(text)["input_ids"][:-1]
            ids[0] = bos
            out = model.text_decoder(input_ids=torch.tensor([ids]), encoder_hidden_states=embeds,
                                     output_hidden_states=True)
        else:
            question = model.text_encoder(input_ids=torch.tensor([bundle.tokenizer(text)["input_ids"]]),
                                          encoder_hidden_states=embeds)[0]
            out = model.text_decoder(input_ids=torch.tensor([[bos]]), encoder_hidden_states=question,
                                     output_hidden_states=True)
        layers = [model.text_decoder.cls(h)[0] for h in out.hidden_states[1:]]
    return torch.log_softmax(torch.stack(layers), -1), torch.log_softmax(out.logits[0], -1)


def _blip2_inputs(bundle, text):
    model, tokenizer = bundle.model, bundle.tokenizer
    image_ids = [model.config.image_token_index] * model.config.num_query_tokens
    t5 = model.config.text_config.model_type == "t5"
    instruct = model.config.model_type == "instructblip"
    prompt = text if instruct else f"Question: {text} Answer:"
    if t5:
        ids = tokenizer(prompt)["input_ids"]
    else:
        ids = [model.config.text_config.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    inputs = {"input_ids": torch.tensor([image_ids + ids])}
    if instruct:
        inputs["qformer_input_ids"] = torch.tensor([bundle.processor.qformer_tokenizer(text)["input_ids"]])
    if t5:
        inputs["decoder_input_ids"] = torch.tensor([[model.config.text_config.decoder_start_token_id]])
    return inputs


def _blip2_reference(bundle, image, text):
    """BLIP-2's language model: per-layer log p through its final norm and head, and the model's own logits."""
    model = bundle.model
    lm = model.language_model
    kind = model.config.text_config.model_type
    with torch.no_grad():
        out = model(pixel_values=_pixels(bundle, image), output_hidden_states=True, **_blip2_inputs(bundle, text))
        outputs = out.language_model_outputs
        if kind == "t5":
            config = model.config.text_config  # transformers 5 says scale_decoder_outputs; 4.x scales a tied head
            scaled = getattr(config, "scale_decoder_outputs", config.tie_word_embeddings)
            scale = config.d_model ** -0.5 if scaled else 1.0
            hidden = outputs.decoder_hidden_states
            head = lambda h: lm.lm_head(lm.decoder.final_layer_norm(h) * scale)  # noqa: E731
        else:
            hidden = outputs.hidden_states
            norm = lm.model.decoder.final_layer_norm if kind == "opt" else lm.model.norm
            head = lambda h: lm.lm_head(norm(h))  # noqa: E731
        layers = [head(h)[0] for h in hidden[1:-1]]  # the last hidden state is already normed
    logits = torch.log_softmax(out.logits[0], -1)
    return torch.log_softmax(torch.stack(layers), -1), logits


def _tied_t5():
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    base = tiny_blip2_config(queries=QUERIES)
    config = Blip2Config(vision_config=base.vision_config.to_dict(), qformer_config=base.qformer_config.to_dict(),
                         text_config={**tiny_t5_text_config(), "tie_word_embeddings": True}, num_query_tokens=QUERIES,
                         image_token_index=BLIP2_VOCAB["<image>"], initializer_range=0.3)
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.query_tokens.normal_(0, 1)
    assert getattr(config.text_config, "scale_decoder_outputs", True)  # the head's input is scaled
    return model


MODELS = {
    "answer_decoder": lambda: (load_model("demo", device="cpu"), "what is the color of the triangle?"),
    "caption_decoder": lambda: (load_model("demo-caption", device="cpu"), "a"),
    "opt": lambda: (load_model("demo-blip2", device="cpu"), "what is the color of the triangle?"),
    "llama": lambda: (load_model((tiny_instructblip(language="llama", queries=QUERIES),
                                  tiny_instructblip_processor(queries=QUERIES)), device="cpu"), QUESTION),
    "t5": lambda: (load_model((tiny_blip2_t5(queries=QUERIES), tiny_blip2_processor(queries=QUERIES)), device="cpu"),
                   QUESTION),
    "t5_tied": lambda: (load_model((_tied_t5(), tiny_blip2_processor(queries=QUERIES)), device="cpu"), QUESTION),
}


@pytest.fixture(scope="module")
def sample():
    from blip_trace_widgets import demo_samples

    return demo_samples()[0]


@pytest.mark.parametrize("family", lengthy_except(list(MODELS), "t5"))
def test_every_layers_lens_is_its_state_through_the_head_and_the_last_is_the_models_output(family, sample):
    bundle, text = MODELS[family]()
    image = sample[0]
    reference = _blip_reference if family.endswith("decoder") else _blip2_reference
    layers, own = reference(bundle, image, text)
    ours = lens_log_probs(bundle, read(bundle, image, text))
    assert ours.shape[0] == layers.shape[0] + (0 if family.endswith("decoder") else 1)
    # the last layer's lens is the model's own output distribution
    assert float((ours[-1] - own).abs().max()) < 1e-5
    # every layer's (intermediate ones included) is that layer's hidden state through the head, computed here
    for layer in range(layers.shape[0] - (1 if family.endswith("decoder") else 0)):
        assert_close(ours[layer], layers[layer], err_msg=f"layer {layer}")
    result = lens(bundle, image, text)
    answer = int(own[-1].argmax())
    assert result.answer_rank[-1, -1] == 1
    assert result.answer_prob[-1, -1] == pytest.approx(float(own[-1, answer].exp()), abs=1e-6)
    assert result.kl[:, -1] == pytest.approx(0, abs=1e-6)


@lengthy
def test_a_lens_costs_one_forward_pass(sample):
    for name, block in (("demo", "text_decoder"), ("demo-blip2", "language_model")):
        bundle = load_model(name, device="cpu")
        calls = {"vision": 0, "block": 0}

        def count(part, calls=calls):
            return lambda *_: calls.__setitem__(part, calls[part] + 1)

        hooks = [bundle.model.vision_model.register_forward_hook(count("vision")),
                 bundle.model.get_submodule(block).register_forward_hook(count("block"))]
        try:
            result = lens(bundle, sample[0], sample[1])
        finally:
            for hook in hooks:
                hook.remove()
        assert calls == {"vision": 1, "block": 1}, name
        assert result.shape[1] == bundle.num_layers(result.block)


@lengthy
def test_image_queries_are_positions_of_the_language_model(sample):
    result = lens(load_model("demo-blip2", device="cpu"), sample[0], sample[1], top=3)
    assert result.labels[:9] == [f"q{q}" for q in range(8)] + ["[CLS]"]
    assert result.queries == 8
    assert np.asarray(result.top_probs).shape == (len(result.labels), 6, 3)
    assert (np.diff(result.top_probs, axis=-1) <= 0).all()


@lengthy
def test_an_answer_named_is_followed_and_its_rank_counts_the_tokens_above(sample):
    bundle = load_model("demo", device="cpu")
    result = lens(bundle, sample[0], sample[1], answer="blue")
    assert result.answer == "blue"
    logp = lens_log_probs(bundle, read(bundle, sample[0], sample[1]))
    blue = bundle.tokenizer.convert_tokens_to_ids("blue")
    for layer in range(4):
        assert result.answer_rank[0, layer] == int((logp[layer, 0] > logp[layer, 0, blue]).sum()) + 1
        assert result.answer_prob[0, layer] == pytest.approx(float(logp[layer, 0, blue].exp()), rel=1e-6)


@lengthy
def test_the_result_round_trips_strict_json_and_reads_as_a_table(sample):
    result = lens(load_model("demo-instructblip", device="cpu"), sample[0], sample[1])
    text = result.to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    again = LensResult.from_json(text)
    assert again == result and again.to_json() == text
    table = result.to_dataframe()
    assert len(table) == result.shape[0] * result.shape[1]
    assert table.groupby("position").size().eq(result.shape[1]).all()
    assert "language model" in repr(result) and "demo-instructblip" in repr(result)


@pytest.mark.slow
def test_blocks_without_a_vocabulary_are_refused_naming_why(sample):
    t5 = load_model((tiny_blip2_t5(queries=QUERIES), tiny_blip2_processor(queries=QUERIES)), device="cpu")
    with pytest.raises(BlipTraceError, match="T5's encoder ends in no vocabulary.*lm_decoder"):
        lens(t5, sample[0], QUESTION, block="lm_encoder")
    with pytest.raises(BlipTraceError, match="p\\(match\\)"):
        lens(load_model("demo-itm", device="cpu"), sample[0], "a red triangle")
    with pytest.raises(BlipTraceError, match="does not end in a vocabulary"):
        lens(load_model("demo", device="cpu"), sample[0], sample[1], block="question_encoder")
    with pytest.raises(BlipTraceError, match="lens kind"):
        lens(load_model("demo", device="cpu"), sample[0], sample[1], kind="bent")
    with pytest.raises(BlipTraceError, match="top="):
        lens(load_model("demo", device="cpu"), sample[0], sample[1], top=0)


@lengthy
def test_query_words_are_the_nearest_input_embeddings_by_cosine(sample):
    bundle = load_model("demo-blip2", device="cpu")
    table = query_words(bundle, sample[0], top=3)
    model = bundle.model
    with torch.no_grad():
        embeds = model.vision_model(pixel_values=_pixels(bundle, sample[0]))[0]
        out = model.qformer(query_embeds=model.query_tokens, encoder_hidden_states=embeds)[0]
        projected = model.language_projection(out)[0]
        emb = model.language_model.get_input_embeddings().weight
        cosine = torch.nn.functional.cosine_similarity(projected[:, None], emb[None], dim=-1)
    best = cosine.topk(3, -1)
    assert list(table.index) == [f"q{q}" for q in range(8)]
    for q in range(8):
        assert list(table.iloc[q][["word1", "word2", "word3"]]) == bundle.tokenizer.convert_ids_to_tokens(best.indices[q])
        assert_close(table.iloc[q][["cosine1", "cosine2", "cosine3"]].to_numpy(float), best.values[q])
    with pytest.raises(BlipTraceError, match="no Q-Former"):
        query_words(load_model("demo", device="cpu"), sample[0])
    with pytest.raises(BlipTraceError, match="question="):
        query_words(load_model("demo-instructblip", device="cpu"), sample[0])


# ----- the tuned lens ---------------------------------------------------------------------------------------
@lengthy
def test_a_fresh_tuned_lens_is_the_logit_lens_and_its_last_layer_the_models_output(sample):
    bundle = load_model("demo-blip2", device="cpu")
    reading = read(bundle, sample[0], sample[1])
    fresh = TunedLens(reading.block, reading.states.shape[0], reading.states.shape[-1])
    logit = lens_log_probs(bundle, reading)
    assert torch.equal(lens_log_probs(bundle, reading, "tuned", fresh), logit)
    shipped = lens_log_probs(bundle, reading, "tuned")
    assert torch.equal(shipped[-1], logit[-1])
    assert not torch.allclose(shipped[0], logit[0], atol=1e-3)


@pytest.mark.slow
def test_the_shipped_tuned_lens_says_the_final_answer_earlier_than_the_logit_lens(sample):
    for name in ("demo", "demo-caption", "demo-blip2", "demo-instructblip"):
        bundle = load_model(name, device="cpu")
        text = "a" if name == "demo-caption" else sample[1]
        logit, tuned = (lens(bundle, sample[0], text, kind=kind) for kind in ("logit", "tuned"))
        middle = (logit.layers - 1) // 2
        assert tuned.kl[-1, middle] < logit.kl[-1, middle] / 2, name
        assert tuned.kind == "tuned" and "tuned lens" in repr(tuned)


@lengthy
def test_training_is_seeded_lowers_the_kl_and_saves_and_loads_exactly(sample, tmp_path):
    bundle = load_model("demo", device="cpu")
    items = [(sample[0], sample[1]), (sample[0], "what is the red shape?")]
    seen = []
    first = train_tuned_lens(bundle, items, steps=15, progress=lambda done, total: seen.append((done, total)))
    again = train_tuned_lens(bundle, items, steps=15, progress=False)
    assert seen[-1] == (len(items) + 15, len(items) + 15)
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    before = lens(bundle, sample[0], sample[1], kind="logit").kl[0, :-1].sum()
    after = lens(bundle, sample[0], sample[1], kind="tuned", tuned=first).kl[0, :-1].sum()
    assert after < before
    path = first.save(tmp_path / "lens.safetensors")
    loaded = TunedLens.load(path)
    assert loaded.config == first.config and loaded.block == "answer_decoder"
    for a, b in zip(first.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with open(path, "rb") as handle:
        assert b"pickle" not in handle.read()[:200]


def test_a_model_without_translators_is_told_to_train_one_and_how_long(sample, tiny_bundle, question, image):
    with pytest.raises(BlipTraceError, match=r"train_tuned_lens\(bundle.*about \d+ (s|min)"):
        lens(tiny_bundle, image, question, kind="tuned")
    with pytest.raises(BlipTraceError, match="no tuned lens at"):
        TunedLens.load("/nonexistent/lens.safetensors")
    with pytest.raises(BlipTraceError, match="steps="):
        train_tuned_lens(tiny_bundle, [(image, question)], steps=0)
    wrong = TunedLens("answer_decoder", 2, 16)
    with pytest.raises(BlipTraceError, match="2 layers of width 16"):
        lens(tiny_bundle, image, question, kind="tuned", tuned=wrong)


# ----- figures, internal confidence, the command line ---------------------------------------------------------
@pytest.mark.slow
def test_figures_name_the_model_block_kind_and_answer(sample):
    from blip_trace_widgets.lenses.plots import lens_png, plot_lens, plot_queries, plot_rank

    result = lens(load_model("demo-blip2", device="cpu"), sample[0], sample[1], kind="tuned")
    for plot in (plot_lens, plot_rank, plot_queries):
        ax = plot(result)
        title = ax.get_title(loc="left")
        assert "tuned lens" in title and "language model" in title and "demo-blip2" in title and "'red'" in title
    grid = plot_lens(result)
    texts = [t.get_text() for t in grid.texts]
    assert len(texts) == result.shape[0] * result.shape[1]
    assert texts[-1] == result.top_token()[-1][-1]
    assert plot_rank(result).get_yscale() == "log"
    assert lens_png(result, "queries")[:4] == b"\x89PNG"
    decoder = lens(load_model("demo", device="cpu"), sample[0], sample[1])
    with pytest.raises(BlipTraceError, match="no image queries"):
        plot_queries(decoder)
    with pytest.raises(BlipTraceError, match="unknown lens figure"):
        lens_png(decoder, "pie")


@lengthy
def test_internal_confidence_is_the_largest_logit_lens_probability_over_layers(sample):
    from blip_trace_widgets.lenses import confidence, image_confidence
    from blip_trace_widgets.lenses.confidence import auroc

    bundle = load_model("demo-blip2", device="cpu")
    table = confidence(bundle, sample[0], ["red", "blue"])
    logp = lens_log_probs(bundle, read(bundle, sample[0], "what is the color of the shape?"))
    red = bundle.tokenizer.convert_tokens_to_ids("red")
    assert_close(table.loc["red"].to_numpy(float), logp[:, :8, red].exp().amax(0))
    assert list(table.columns) == [f"q{q}" for q in range(8)]
    assert image_confidence(bundle, sample[0], ["red", "blue"])["red"] == table.loc["red"].max()
    assert auroc([3, 2], [1, 0]) == 1.0 and auroc([0], [1]) == 0.0 and auroc([1], [1]) == 0.5
    with pytest.raises(BlipTraceError, match="BLIP-2 or InstructBLIP"):
        confidence(load_model("demo", device="cpu"), sample[0], ["red"])
    with pytest.raises(BlipTraceError, match="list of words"):
        confidence(bundle, sample[0], "red")


@pytest.mark.slow
def test_the_lens_command_writes_png_json_and_csv(sample, tmp_path, capsys):
    import pandas as pd

    from blip_trace_widgets.cli import main

    path = tmp_path / "shape.png"
    sample[0].save(path)
    out = tmp_path / "out"
    code = main(["lens", "--model", "demo-blip2", "--image", str(path), "--question", sample[1],
                 "--block", "language_model", "--kind", "tuned", "--answer", "blue", "--out", str(out)])
    assert code == 0
    stem = out / "lens-tuned-language_model"
    result = LensResult.from_json((out / "lens-tuned-language_model.json").read_text())
    assert result.answer == "blue" and result.kind == "tuned"
    assert result == lens(load_model("demo-blip2"), sample[0], sample[1], kind="tuned", answer="blue")
    table = pd.read_csv(f"{stem}.csv")
    assert len(table) == result.shape[0] * result.shape[1]
    for suffix in ("", "-rank", "-queries"):
        assert (out / f"lens-tuned-language_model{suffix}.png").read_bytes()[:4] == b"\x89PNG"
    assert "tuned lens of the language model" in capsys.readouterr().out
    assert main(["lens", "--image", str(tmp_path / "none.png"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["lens", "--model", "demo-itm", "--image", str(path), "--question", "a red", "--out", str(out)]) == 2
    assert "no vocabulary" in capsys.readouterr().err


# ----- the explorer -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_lens_explorer_follows_its_controls_and_shows_errors_inside(sample, monkeypatch, tiny_bundle, image):
    import blip_trace_widgets.widgets.lens as lens_widget
    from blip_trace_widgets.widgets.lens import LensExplorer

    bundle = load_model("demo-blip2", device="cpu")
    explorer = LensExplorer(bundle, sample[0], sample[1])
    first = explorer.grid.value
    assert first[:4] == b"\x89PNG" and explorer.result == lens(bundle, sample[0], sample[1])
    explorer.kind.value = "tuned"
    assert explorer.result == lens(bundle, sample[0], sample[1], kind="tuned") and explorer.grid.value != first
    explorer.top.value = 3
    assert explorer.result.top_probs.shape[-1] == 3
    explorer.answer.value = "blue"
    assert explorer.result.answer == "blue" and explorer.error.value == ""
    explorer.answer.value = "zebra"  # not in the vocabulary: said inside, the last grid kept
    assert "vocabulary" in explorer.error.value and explorer.result.answer == "blue"
    explorer.answer.value = ""
    assert explorer.result.answer == "red" and explorer.error.value == ""
    explorer.position.value, explorer.layer.value = 0, 2
    logp = lens_log_probs(bundle, read(bundle, sample[0], sample[1]), "tuned")
    expected = bundle.tokenizer.convert_ids_to_tokens(logp[2, 0].topk(10).indices.tolist())
    assert [token for token, _ in explorer.cell_tokens(0, 2)] == expected
    assert explorer.cell.value.count("<tr>") == 10 and "q0" in explorer.cell.value
    monkeypatch.setattr(lens_widget, "read", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    explorer.kind.value = "logit"
    assert "unexpected RuntimeError: boom" in explorer.error.value and explorer.result.kind == "tuned"
    monkeypatch.undo()
    tiny = LensExplorer(tiny_bundle, image, QUESTION, kind="tuned")  # no translators: said inside, no grid
    assert "train_tuned_lens" in tiny.error.value and tiny.result is None
    tiny.kind.value = "logit"
    assert tiny.result is not None and tiny.error.value == ""


@lengthy
def test_a_long_training_is_warned_about_before_the_rest_runs(sample, monkeypatch):
    import blip_trace_widgets.lenses.tuned as tuned
    from blip_trace_widgets.causal_trace.cost import LongTraceWarning

    bundle = load_model("demo", device="cpu")
    priced = []
    monkeypatch.setattr(tuned, "training_seconds", lambda *a, **k: priced.append(k["per_item"]) or 100.0)
    seen = []
    with pytest.warns(LongTraceWarning, match="about 2 min"):
        tuned.train_tuned_lens(bundle, [(sample[0], sample[1])] * 3, steps=2,
                               progress=lambda done, total: seen.append(done))
    assert len(priced) == 1 and priced[0] > 0 and seen[0] == 1  # priced on the first item, before the others ran


@lengthy
def test_low_rank_translators_start_at_the_logit_lens_learn_and_round_trip(sample, tmp_path):
    bundle = load_model("demo", device="cpu")
    reading = read(bundle, sample[0], sample[1])
    fresh = TunedLens("answer_decoder", 4, 128, rank=4)
    assert torch.equal(lens_log_probs(bundle, reading, "tuned", fresh), lens_log_probs(bundle, reading))
    assert sum(p.numel() for p in fresh.parameters()) == 3 * (128 * 4 + 4 * 128 + 128)
    items = [(sample[0], sample[1]), (sample[0], "what is the red shape?")]
    low = train_tuned_lens(bundle, items, steps=15, rank=4, progress=False)
    assert lens(bundle, *sample[:2], kind="tuned", tuned=low).kl[0, :-1].sum() < lens(bundle, *sample[:2]).kl[0, :-1].sum()
    loaded = TunedLens.load(low.save(tmp_path / "low.safetensors"))
    assert loaded.rank == 4 and "rank 4" in repr(loaded)
    assert torch.equal(lens_log_probs(bundle, reading, "tuned", loaded), lens_log_probs(bundle, reading, "tuned", low))
    with pytest.raises(BlipTraceError, match="rank=0"):
        TunedLens("answer_decoder", 4, 128, rank=0)


def test_a_lens_sweep_is_each_questions_own_lens_and_its_average(demo_bundle):
    """The sweep's rows are each question's lens at its last position, and the average's mean and interval are
    those of the rows, computed here with numpy."""
    from blip_trace_widgets import demo_samples
    from blip_trace_widgets.lenses import lens, lens_average, lens_sweep

    samples = demo_samples(per_type=1)
    table = lens_sweep(demo_bundle, samples, scored="expected")
    for index, (image, question, answer) in enumerate(samples):
        own = lens(demo_bundle, image, question, answer=answer)
        rows = table[table["question"] == index].sort_values("layer")
        np.testing.assert_allclose(rows["p_answer"], own.answer_prob[-1])
        assert list(rows["rank"]) == list(own.answer_rank[-1]) and set(rows["answer"]) == {own.answer}
    average = lens_average(table)
    last = table[table["layer"] == table["layer"].max()]["p_answer"].to_numpy()
    row = average.iloc[-1]
    half = 4.302653 * last.std(ddof=1) / np.sqrt(len(last))  # Student's t, 2 degrees of freedom, 95%
    assert row["p_answer"] == pytest.approx(last.mean()) and row["p_answer_high"] == pytest.approx(last.mean() + half,
                                                                                                  rel=1e-4)
    with pytest.raises(BlipTraceError, match="scored must be one of"):
        lens_sweep(demo_bundle, samples, scored="mine")


def test_the_lens_command_sweeps_a_dataset(tmp_path, capsys):
    from blip_trace_widgets.cli import main

    assert main(["lens", "--dataset", "easy-vqa-color", "--limit", "2", "--out", str(tmp_path)]) == 0
    import pandas as pd

    average = pd.read_csv(tmp_path / "lens-logit-answer_decoder-easy-vqa-color-average.csv")
    assert list(average["layer"]) == [0, 1, 2, 3] and set(average["questions"]) == {2}
    assert "p_answer" in capsys.readouterr().out
    assert main(["lens", "--dataset", "easy-vqa-color", "--image", "x.png", "--out", str(tmp_path)]) == 2
    assert "not both or neither" in capsys.readouterr().err
