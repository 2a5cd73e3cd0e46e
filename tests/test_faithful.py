"""Procedures that carry a name are exactly that: cache keys, severing, the paper's procedure, the total effect."""
from __future__ import annotations

import random
from dataclasses import fields, replace

import numpy as np
import pandas as pd
import pytest
import torch
from fast_subset import lengthy
from tiny_blip import tiny_model, tiny_processor
from tolerance import assert_close, within_rounding

from blip_trace_widgets import GaussianNoise, MultiplicativeNoise, TraceConfig, Tracer, load_model, trace
from blip_trace_widgets.causal_trace.averages import average_effect, average_trace, sample_effects
from blip_trace_widgets.causal_trace.procedures import PROCEDURES, procedure_config
from blip_trace_widgets.causal_trace.tracer import CACHE_PARTS, cache_key
from blip_trace_widgets.core.regions import Box
from blip_trace_widgets.corruptions.kinds import Blur, Grey, Scale, UniformNoise


@pytest.fixture(scope="module")
def bundle():
    return load_model((tiny_model(seed=3), tiny_processor()), device="cpu")


# ----- one cache-key function ----------------------------------------------------------------

def test_every_config_field_declares_what_it_affects():
    parts = {part for wanted in CACHE_PARTS.values() for part in wanted}
    for f in fields(TraceConfig):
        assert f.metadata.get("affects") in parts, f"TraceConfig.{f.name} does not declare which caches it affects"


@pytest.mark.parametrize("name,value", [
    ("corruption", GaussianNoise(4.0)), ("samples", 3), ("seed", 9), ("corrupt", "patches"),
    ("fresh_noise", True),
])
def test_input_fields_change_the_corrupted_key(name, value):
    base = TraceConfig()
    changed = replace(base, **{name: value})
    assert cache_key(base, "corrupted") != cache_key(changed, "corrupted")
    assert cache_key(base, "decoder") != cache_key(changed, "decoder")


def test_corrupt_tokens_change_the_decoder_key():
    one = TraceConfig(block="answer_decoder", corrupt="question", corrupt_tokens=(1,))
    two = replace(one, corrupt_tokens=(2,))
    assert cache_key(one, "decoder") != cache_key(two, "decoder")


def _random_configs(rng: random.Random, count: int) -> list[TraceConfig]:
    configs = []
    while len(configs) < count:
        block = rng.choice(["question_encoder", "answer_decoder", "vision_encoder"])
        vision = block == "vision_encoder"
        kind = rng.choice(["hidden", "self_attn", "mlp"] if vision else
                          ["hidden", "self_attn", "cross_attn", "mlp", "post_self_attn", "post_cross_attn"])
        stage = rng.choice(["patches", "pixels"] if vision else ["image", "patches", "pixels", "question"])
        corruption = {
            "image": lambda: rng.choice([GaussianNoise(rng.choice([1.0, 3.0])), MultiplicativeNoise(2.0),
                                         UniformNoise(2.0), Scale(0.5)]),
            "patches": lambda: rng.choice([GaussianNoise(3.0), GaussianNoise(3.0, region=Box(0, 0, 0.5, 0.5))]),
            "pixels": lambda: rng.choice([Blur(2.0), Grey(Box(0.5, 0.5, 1, 1)), GaussianNoise(1.0)]),
            "question": lambda: GaussianNoise(rng.choice([2.0, 4.0])),
        }[stage]()
        sever = rng.choice([None, None, "mlp", "self_attn"]) if kind == "hidden" else None
        metric = rng.choice(["prob", "logprob", "logit_diff"])
        configs.append(TraceConfig(
            block=block, kind=kind, window=rng.choice([1, 2] if vision else [1, 2, 3]), corruption=corruption,
            samples=rng.choice([1, 2, 3]),
            seed=rng.choice([0, 1]), answer=rng.choice([None, "red", "red blue"]), metric=metric,
            contrast="green" if metric == "logit_diff" else None, sever=sever,
            sever_at=rng.choice(["restored", "all"]), corrupt=stage,
            corrupt_tokens=rng.choice([None, (1,), (2,), "object"]) if stage == "question" else None,
            regions=rng.choice([None, 1, 2]) if vision else None, fresh_noise=rng.random() < 0.15,
        ))
    return configs


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_one_tracer_gives_what_a_fresh_tracer_gives_for_any_sequence(bundle, image):
    """A random walk through every block, kind, stage, corrupt_tokens, window, sever, answer, metric and
    region setting: a long-lived Tracer (its caches full of earlier runs) must agree with a fresh one."""
    question = "what color is the shape?"
    shared = Tracer(bundle, image, question, corrupted_cache_size=3)
    rng = random.Random(12)
    configs = _random_configs(rng, 36)
    configs += [replace(c, answer=None) for c in configs[:4]]  # revisits, after the caches moved on
    for config in configs:
        got = shared.trace(config)
        want = Tracer(bundle, image, question).trace(config)
        assert got.low_score == within_rounding(want.low_score), config
        assert got.high_score == within_rounding(want.high_score), config
        assert_close(got.scores, want.scores, err_msg=str(config))


@lengthy
def test_the_reported_stale_decoder_runs_are_gone(demo_bundle, demo_sample):
    """The two cases seen on the demo model: a decoder trace after another corruption stage or token."""
    image, question, _ = demo_sample
    tracer = Tracer(demo_bundle, image, question)
    tracer.trace(block="answer_decoder", corrupt="image", samples=3)
    after = tracer.trace(block="answer_decoder", corrupt="patches", samples=3)
    fresh = Tracer(demo_bundle, image, question).trace(block="answer_decoder", corrupt="patches", samples=3)
    assert after.low_score == within_rounding(fresh.low_score)
    tracer.trace(block="answer_decoder", corrupt="question", corrupt_tokens=(1,), samples=3)
    after = tracer.trace(block="answer_decoder", corrupt="question", corrupt_tokens=(2,), samples=3)
    fresh = Tracer(demo_bundle, image, question).trace(block="answer_decoder", corrupt="question",
                                                       corrupt_tokens=(2,), samples=3)
    assert_close(after.scores, fresh.scores)


# ----- severing ------------------------------------------------------------------------------

@lengthy
def test_severing_at_the_restored_token_differs_from_severing_everywhere(bundle, image, question):
    tracer = Tracer(bundle, image, question)
    base = dict(kind="hidden", sever="mlp", samples=3, corruption=GaussianNoise(3.0))
    rome = tracer.trace(**base, sever_at="restored")
    everywhere = tracer.trace(**base, sever_at="all")
    assert np.abs(rome.scores - everywhere.scores).max() > 1e-3
    assert rome.config["sever_at"] == "restored" and TraceConfig(sever="mlp").sever_at == "restored"


# ----- the paper's procedure ------------------------------------------------------------------

class PaperLoop:
    """The paper's notebook, step by step: for the low score and then for every (token, layer), make the inputs
    afresh, multiply the vision encoder's output by a new draw of N(1, 5²), run the model with a hook that puts the
    clean row's layer output back at that token, and read p(answer) at [DEC]. The draws come from one generator,
    in the notebook's order, instead of torch's global one."""

    def __init__(self, bundle, image, question, seed):
        self.model = bundle.model
        proc = bundle.processor
        self.pixels = proc.image_processor(image, return_tensors="pt")["pixel_values"]
        self.ids = torch.tensor([proc.tokenizer(question)["input_ids"]])
        self.generator = torch.Generator().manual_seed(seed)
        self.bos = self.model.config.text_config.bos_token_id

    def _run(self, embeds, hook_layer=None, token=None, block="text_encoder"):
        model = self.model
        handles = []
        if hook_layer is not None:
            stack = model.text_encoder.encoder.layer if block == "text_encoder" else model.text_decoder.bert.encoder.layer

            def patch(m, i, o):
                h = o[0] if isinstance(o, tuple) else o
                h = h.clone()
                h[1:, token] = h[0, token]
                return (h, *o[1:]) if isinstance(o, tuple) else h

            handles.append(stack[hook_layer].register_forward_hook(patch))
        try:
            with torch.no_grad():
                n = embeds.shape[0]
                question = model.text_encoder(input_ids=self.ids.expand(n, -1), encoder_hidden_states=embeds)[0]
                bos = torch.full((n, 1), self.bos)
                logits = model.text_decoder(input_ids=bos, encoder_hidden_states=question).logits
        finally:
            for h in handles:
                h.remove()
        return torch.softmax(logits[:, -1], dim=1)

    def clean(self):
        with torch.no_grad():
            return self.model.vision_model(pixel_values=self.pixels)[0]

    def inputs(self):
        clean = self.clean()
        noisy = clean * (1 + 5.0 * torch.randn(clean.shape, generator=self.generator))  # torch.normal(1, 5)
        return torch.cat([clean, noisy])

    def flow(self, block="text_encoder", positions=None, layers=None):
        clean_probs = self._run(self.clean())  # the clean prediction draws no noise
        answer = int(clean_probs[0].argmax())
        low = float(self._run(self.inputs())[1:, answer].mean())
        positions = positions if positions is not None else self.ids.shape[1]
        table = [[float(self._run(self.inputs(), layer, t, block)[1:, answer].mean()) for layer in range(layers)]
                 for t in range(positions)]
        return np.array(table), low, float(clean_probs[0, answer])


@pytest.mark.parametrize("block", ["question_encoder", "answer_decoder"])
@lengthy
def test_paper_procedure_matches_the_papers_loop(bundle, image, question, block):
    result = trace(bundle, image, question, procedure="paper", block=block, seed=7)
    assert result.config["samples"] == 1 and result.config["fresh_noise"] is True
    assert result.config["corruption"] == {"type": "multiplicative", "std": 5.0}
    layers = result.num_layers
    loop = PaperLoop(bundle, image, question, seed=7)
    scores, low, high = loop.flow("text_encoder" if block == "question_encoder" else "text_decoder",
                                  positions=None if block == "question_encoder" else 1, layers=layers)
    assert_close(result.scores, scores, ulps=1024)
    assert result.low_score == within_rounding(low)
    assert result.high_score == within_rounding(high)


@lengthy
def test_fresh_noise_draws_a_new_corruption_for_every_cell(bundle, image, question):
    shared = trace(bundle, image, question, procedure="paper", fresh_noise=False, seed=7)
    fresh = trace(bundle, image, question, procedure="paper", seed=7)
    assert shared.low_score == pytest.approx(fresh.low_score)  # the low score is the seed's first draw in both
    assert np.abs(shared.scores - fresh.scores).max() > 1e-3


def test_paper_attention_preset(bundle, image, question):
    config = procedure_config("paper_attention")
    assert isinstance(config.corruption, Scale) and config.corruption.factor == 0.7691
    assert (config.window, config.kind, config.samples) == (3, "post_self_attn", 1)
    result = trace(bundle, image, question, procedure="paper_attention", kind="post_cross_attn")
    assert result.kind == "post_cross_attn" and np.isfinite(result.scores).all()
    assert set(PROCEDURES) == {"rome", "paper", "paper_attention"}


def _table(rows):
    return pd.DataFrame.from_records([
        {"sample": i, "config": 0, "block": "question_encoder", "kind": "hidden", "window": 1, "corruption": "{}",
         "tokens": ["[CLS]", "a", "[SEP]"], "scores": s, "low_score": low, "high_score": high, "num_layers": 2, "correct": True}
        for i, (s, low, high) in enumerate(rows)])


def test_the_papers_dataset_average_is_undivided():
    rows = [([[0.2, 0.4], [0.3, 0.5], [0.1, 0.1]], 0.1, 0.9), ([[0.6, 0.2], [0.2, 0.8], [0.3, 0.3]], 0.2, 0.5)]
    average = average_trace(_table(rows), form="rome", by="position")
    scores = np.mean([np.array(s) for s, _, _ in rows], axis=0)
    lows = np.mean([low for _, low, _ in rows])
    np.testing.assert_allclose(average.scores, scores - lows)  # avg(score) − avg(low), as the paper's notebook
    assert average.high_score == pytest.approx(np.mean([h - low for _, low, h in rows]))  # ROME's average total effect


def test_normalised_averages_leave_out_tiny_total_effects_and_count_them():
    rows = [([[0.5, 0.9], [0.5, 0.5], [0.5, 0.5]], 0.1, 0.9), ([[0.9, 0.9], [0.9, 0.9], [0.9, 0.9]], 0.899, 0.9)]
    effects = sample_effects(_table(rows), form="normalized", by="position")
    assert effects.attrs["left_out"] == 1 and set(effects["sample"]) == {0}
    averaged = average_effect(_table(rows), form="normalized", by="position")
    assert set(averaged["left_out"]) == {1} and set(averaged["n"]) == {1}
    kept = sample_effects(_table(rows), form="rome", by="position")
    assert kept.attrs["left_out"] == 0  # the undivided form divides by nothing
    with pytest.raises(ValueError, match="every question was left out"):
        sample_effects(_table(rows[1:]), form="normalized")


@lengthy
def test_total_effect_and_tiny_flag(bundle, image, question):
    result = trace(bundle, image, question, samples=2)
    assert result.total_effect == pytest.approx(result.high_score - result.low_score)
    barely = trace(bundle, image, question, samples=2, corruption=GaussianNoise(1e-4))
    strong = trace(bundle, image, question, samples=2, corruption=GaussianNoise(50.0))
    assert barely.is_tiny() and abs(strong.total_effect) > 100 * abs(barely.total_effect)
    # the rule: under 0.1 of the clean score, or under the metric's floor (a random tiny model's p is small)
    rule = abs(strong.total_effect) < max(0.1 * abs(strong.high_score), strong.floor)
    assert strong.is_tiny() == rule


@lengthy
def test_standard_error_over_noise_samples(bundle, image, question):
    result = trace(bundle, image, question, samples=4, seed=2)
    assert result.stderr is not None and result.stderr.shape == result.scores.shape
    assert np.nanmax(result.stderr) > 0
    single = trace(bundle, image, question, samples=1)
    assert np.isnan(single.stderr).all()  # one sample: no spread to estimate
