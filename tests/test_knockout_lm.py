"""A language model's image → text knockout group cuts the text's queries only (Zhang et al.'s Image→Question).

Checked with a partial window, where the rule matters, against the models' own forward passes: a pre-hook on each
cut layer's self-attention adds the dtype's minimum to the model's own attention mask wherever a text position would
read an image position. The hooks spell the module paths out themselves and share nothing with the engine but the
tokens scored. OPT is the bundled ``demo-blip2`` (its figures are the ones docs/reference.md quotes); T5's encoder
is a tiny BLIP-2 in float64.
"""
from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import pytest
import torch
from fast_subset import lengthy
from tiny_blip import BLIP2_VOCAB, tiny_blip2_processor, tiny_blip2_t5

from blip_trace_widgets import Edges, demo_samples, load_model
from blip_trace_widgets.attention_knockout.knockout import Knockout, KnockoutConfig

WINDOW = 3


def _windows(layers: int, window: int) -> list[range]:
    return [range(max(0, layer - window // 2), min(layers, layer - (-window // 2))) for layer in range(layers)]


def _cut_image_for_text(queries: int):
    """A pre-hook (with kwargs) on a self-attention: its additive mask, text rows never reading image columns."""
    def hook(module, args, kwargs, key):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        length = hidden.shape[1]
        low = torch.finfo(hidden.dtype).min
        mask = kwargs.get(key)
        mask = torch.zeros(1, 1, length, length, dtype=hidden.dtype) if mask is None else mask.clone()
        mask[..., queries:, :queries] = low
        return args, {**kwargs, key: mask}
    return hook


@pytest.fixture(scope="module")
def blip2():
    bundle = load_model("demo-blip2", device="cpu")
    for config in (bundle.model.config, bundle.model.language_model.config):
        config._attn_implementation = "eager"  # an additive float mask the hook can edit
    image, question, _ = demo_samples()[0]
    return bundle, image, question


@lengthy
def test_opt_cuts_the_texts_queries_as_the_models_own_masked_forward(blip2):
    bundle, image, question = blip2
    model = bundle.model
    queries = model.config.num_query_tokens
    knock = Knockout.of(bundle, image, question)
    config = KnockoutConfig(edges=(Edges(block="language_model", attention="self", keys="image"),), window=WINDOW)
    result = knock.run(config)
    target = knock.target(config)
    ids = torch.tensor([[model.config.image_token_index] * queries + list(target.inputs)])
    pixels = bundle.processor.image_processor(image, return_tensors="pt")["pixel_values"]
    layers = model.language_model.model.decoder.layers

    def p(cut: range) -> float:
        with ExitStack() as stack, torch.no_grad():
            for j in cut:
                handle = layers[j].self_attn.register_forward_pre_hook(
                    lambda m, a, k: _cut_image_for_text(queries)(m, a, k, "attention_mask"), with_kwargs=True)
                stack.callback(handle.remove)
            logits = model(pixel_values=pixels, input_ids=ids).logits
        logprobs = torch.log_softmax(logits[0].double(), -1)
        return float(sum(logprobs[target.offset + k, t] for k, t in enumerate(target.tokens)).exp())  # (after q0…)

    own = np.array([p(cut) for cut in _windows(len(layers), WINDOW)])
    assert result.clean_score == pytest.approx(p(range(0)), abs=1e-5)
    np.testing.assert_allclose(result.scores[0], own, atol=1e-5)
    text = len(target.inputs)
    assert result.specs[0]["query_positions"] == list(range(queries, queries + text))
    assert result.specs[0]["edges"] == text * queries  # 104 on this question: no edge the causal mask removed
    # every position as a query (the rule before) reads differently where the window is partial: 0.467 against 0.207
    every = knock.run(KnockoutConfig(edges=(Edges(tuple(range(queries + text)), "image", "self", "language_model"),),
                                     window=WINDOW))
    assert own[2] == pytest.approx(0.207, abs=2e-3) and every.scores[0, 2] == pytest.approx(0.467, abs=2e-3)
    assert every.specs[0]["edges"] == result.specs[0]["edges"] + queries * queries  # 28 of them masked already


@lengthy
def test_the_decoder_group_and_each_token_follow_the_same_rule(blip2):
    from blip_trace_widgets.attention_knockout.edges import decoder_edges

    bundle, image, question = blip2
    queries = bundle.model.config.num_query_tokens
    knock = Knockout.of(bundle, image, question)
    decoder = knock.run(KnockoutConfig(edges=(decoder_edges("language_model"),), window=WINDOW))
    plain = knock.run(KnockoutConfig(edges=(Edges(block="language_model", attention="self", keys="image"),),
                                     window=WINDOW))
    np.testing.assert_array_equal(decoder.scores, plain.scores)
    each = knock.run(KnockoutConfig(edges=(Edges("each", "image", "self", "language_model"),), window=1))
    assert [s["query_positions"] for s in each.specs] == [[q] for q in plain.specs[0]["query_positions"]]
    assert not {f"image → q{i} (self-attention)" for i in range(queries)} & set(each.labels)


@lengthy
def test_t5s_encoder_cuts_the_texts_queries_as_the_models_own_masked_forward(image):
    queries = 4
    model = tiny_blip2_t5(seed=1, queries=queries).double()
    for config in (model.config, model.language_model.config, model.language_model.encoder.config):
        config._attn_implementation = "eager"
    bundle = load_model((model, tiny_blip2_processor(queries=queries)), device="cpu")
    question = "what color is the shape?"
    knock = Knockout.of(bundle, image, question)
    config = KnockoutConfig(edges=(Edges(block="lm_encoder", attention="self", keys="image"),), window=1,
                            answer="green")
    result = knock.run(config)
    target = knock.target(config)
    blocks = model.language_model.encoder.block
    inputs = {"input_ids": torch.tensor([[BLIP2_VOCAB["<image>"]] * queries + list(knock.tracer.question_ids)]),
              "decoder_input_ids": torch.tensor([[model.config.text_config.decoder_start_token_id]]),
              "pixel_values": bundle.processor.image_processor(image, return_tensors="pt")["pixel_values"].double()}

    def p(cut: range) -> float:
        with ExitStack() as stack, torch.no_grad():
            for j in cut:
                handle = blocks[j].layer[0].SelfAttention.register_forward_pre_hook(
                    lambda m, a, k: _cut_image_for_text(queries)(m, a, k, "mask"), with_kwargs=True)
                stack.callback(handle.remove)
            logits = model(**inputs).logits
        return float(torch.softmax(logits[0, 0], -1)[target.tokens[0]])

    own = np.array([p(cut) for cut in _windows(len(blocks), 1)])
    assert result.clean_score == pytest.approx(p(range(0)), rel=1e-6)
    np.testing.assert_allclose(result.scores[0], own, rtol=1e-6)
    every = knock.run(KnockoutConfig(edges=(Edges(tuple(range(len(knock.tracer.question_ids) + queries)), "image",
                                                  "self", "lm_encoder"),), window=1, answer="green"))
    assert np.abs(every.scores - result.scores).max() > 1e-4  # the rules differ on this model: the check means something
