"""The batched engine against a plain per-cell loop: one forward pass of the model per cell.

The loop below uses the model's own forward methods and hooks written here, with
module paths spelled out as the tracing spec gives them, so it shares no code with
the engine beyond the corruption.
"""
from __future__ import annotations

import itertools
from contextlib import ExitStack

import numpy as np
import pytest
import torch
from fast_subset import lengthy, lengthy_except
from tiny_blip import tiny_model, tiny_processor
from tolerance import assert_close, within_rounding

from blip_trace_widgets import GaussianNoise, MultiplicativeNoise, TraceConfig, Tracer, load_model

#: What a configuration that names no corruption gets on a model folder without trace_defaults.json:
#: ROME's Gaussian noise of 3 standard deviations.
ROME_DEFAULT = GaussianNoise(3.0)

PREFIX = {"question_encoder": "text_encoder.encoder.layer", "answer_decoder": "text_decoder.bert.encoder.layer"}
SUFFIX = {"hidden": "", "self_attn": ".attention.output.dense", "cross_attn": ".crossattention.output.dense",
          "mlp": ".output.dense", "post_self_attn": ".attention", "post_cross_attn": ".crossattention"}


def path(block: str, kind: str, layer: int) -> str:
    return f"{PREFIX[block]}.{layer}{SUFFIX[kind]}"


def _tensor(out):
    return out[0] if isinstance(out, tuple) else out


def _replace(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


class ReferenceLoop:
    """ROME's procedure, cell by cell, with the noise samples as the batch."""

    def __init__(self, bundle, image, question, config: TraceConfig, answer_ids):
        self.model = bundle.model
        self.config = config
        proc = bundle.processor
        pixels = proc.image_processor(image, return_tensors="pt")["pixel_values"]
        self.question_ids = torch.tensor([proc.tokenizer(question)["input_ids"]])
        bos = self.model.config.text_config.bos_token_id
        self.decoder_ids = torch.tensor([[bos, *answer_ids[:-1]]])
        self.answer_ids = list(answer_ids)
        with torch.no_grad():
            self.clean_embeds = clean_embeds = self.model.vision_model(pixel_values=pixels)[0]
            generator = torch.Generator().manual_seed(config.seed)
            self.corrupted = (config.corruption or ROME_DEFAULT)(clean_embeds, config.samples, generator)
            self.clean = self._record(clean_embeds)
            self.corrupted_states = self._record(self.corrupted)

    def _modules(self):
        model = self.model
        for block, kind in itertools.product(PREFIX, SUFFIX):
            layers = model.get_submodule(PREFIX[block])
            for layer in range(len(layers)):
                name = path(block, kind, layer)
                yield name, model.get_submodule(name)

    def _forward(self, embeds):
        n = embeds.shape[0]
        ones = torch.ones(n, self.question_ids.shape[1], dtype=torch.long)
        question = self.model.text_encoder(
            input_ids=self.question_ids.expand(n, -1), attention_mask=ones, encoder_hidden_states=embeds,
            encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
        )[0]
        return self.model.text_decoder(
            input_ids=self.decoder_ids.expand(n, -1), encoder_hidden_states=question, encoder_attention_mask=ones
        ).logits

    def _record(self, embeds):
        seen, handles = {}, []
        for name, module in self._modules():
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, _tensor(o).clone())))
        try:
            self._forward(embeds)
        finally:
            for h in handles:
                h.remove()
        return seen

    def score(self, logits) -> float:
        logprobs = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), -1)
        metric = self.config.metric
        if metric == "logit_diff":
            contrast = self.contrast_id
            return float((logits[:, 0, self.answer_ids[0]] - logits[:, 0, contrast]).mean())
        total = sum(logprobs[:, k, t] for k, t in enumerate(self.answer_ids))
        return float((total if metric == "logprob" else total.exp()).mean())

    def cell(self, restore: list[tuple[int, int]]) -> float:
        cfg = self.config
        with ExitStack() as stack, torch.no_grad():
            for layer, pos in restore:
                name = path(cfg.block, cfg.kind, layer)
                clean = self.clean[name]

                def hook(m, i, o, clean=clean, pos=pos):
                    t = _tensor(o).clone()
                    t[:, pos] = clean[0, pos]
                    return _replace(o, t)

                handle = self.model.get_submodule(name).register_forward_hook(hook)
                stack.callback(handle.remove)
            if cfg.sever:
                # ROME's frozen-MLP notebook: the sublayer at the restored token, every layer, held at its
                # corrupted-run value (sever_at="restored"); or at every position (sever_at="all")
                tokens = sorted({pos for _, pos in restore})
                layers = len(self.model.get_submodule(PREFIX[cfg.block]))
                for layer in range(layers):
                    name = path(cfg.block, cfg.sever, layer)
                    held = self.corrupted_states[name]

                    def freeze(m, i, o, held=held):
                        t = _tensor(o).clone()
                        if cfg.sever_at == "all":
                            t = held.clone()
                        else:
                            t[:, tokens] = held[:, tokens]
                        return _replace(o, t)

                    handle = self.model.get_submodule(name).register_forward_hook(freeze)
                    stack.callback(handle.remove)
            return self.score(self._forward(self.corrupted))

    def grid(self, positions: int, layers: int) -> np.ndarray:
        w = self.config.window
        out = np.zeros((positions, layers))
        for p in range(positions):
            for layer in range(layers):
                window = range(max(0, layer - w // 2), min(layers, layer - (-w // 2)))
                out[p, layer] = self.cell([(j, p) for j in window])
        return out


@pytest.fixture(scope="module")
def bundle():
    return load_model((tiny_model(seed=1), tiny_processor()), device="cpu")


CASES = [
    (block, kind, window, None, "restored")
    for block in PREFIX
    for kind in SUFFIX
    for window in (1, 3)
] + [(block, "hidden", 1, sever, at) for block in PREFIX for sever in ("mlp", "self_attn", "cross_attn")
     for at in ("restored", "all")]


@pytest.mark.parametrize("block,kind,window,sever,sever_at", lengthy_except(
    CASES, ("answer_decoder", "post_self_attn", 1, None, "restored")))
def test_engine_matches_per_cell_loop(bundle, image, question, block, kind, window, sever, sever_at):
    config = TraceConfig(block=block, kind=kind, window=window, sever=sever, sever_at=sever_at, samples=3, seed=5,
                         corruption=GaussianNoise(scale=2.0), metric="logprob")
    tracer = Tracer(bundle, image, question, max_batch_rows=7)  # several chunks, uneven
    result = tracer.trace(config)
    answer_ids = result.config["answer_ids"]
    reference = ReferenceLoop(bundle, image, question, config, answer_ids)
    expected = reference.grid(*result.scores.shape)
    assert np.ptp(expected) > 1e-3, "the reference heatmap is flat: the test could not tell engines apart"
    assert_close(result.scores, expected)
    assert result.low_score == within_rounding(reference.cell([]))


@pytest.mark.parametrize("block,kind", [("question_encoder", "mlp"), ("answer_decoder", "hidden"),
                                        ("answer_decoder", "cross_attn")])
@pytest.mark.parametrize("metric", ["prob", "logprob"])
@lengthy
def test_multi_token_answer_matches_loop(bundle, image, question, block, kind, metric):
    config = TraceConfig(block=block, kind=kind, window=3, samples=2, seed=1, answer="red blue circle",
                         corruption=MultiplicativeNoise(std=2.0), metric=metric)
    result = Tracer(bundle, image, question).trace(config)
    assert len(result.config["answer_ids"]) == 3
    if block == "answer_decoder":
        assert result.tokens == ["[DEC]", "red", "blue"]
    reference = ReferenceLoop(bundle, image, question, config, result.config["answer_ids"])
    expected = reference.grid(*result.scores.shape)
    assert_close(result.scores, expected, ulps=1024)
    with torch.no_grad():
        clean_logits = reference._forward(reference.clean_embeds)
    assert result.high_score == within_rounding(reference.score(clean_logits))


@lengthy
def test_logit_diff_matches_loop(bundle, image, question):
    config = TraceConfig(kind="hidden", samples=2, answer="red", contrast="blue", metric="logit_diff")
    result = Tracer(bundle, image, question).trace(config)
    reference = ReferenceLoop(bundle, image, question, config, result.config["answer_ids"])
    reference.contrast_id = bundle.tokenizer.convert_tokens_to_ids("blue")
    np.testing.assert_allclose(result.scores, reference.grid(*result.scores.shape), atol=1e-4)


@pytest.mark.parametrize("block,kind", [("question_encoder", "mlp"), ("question_encoder", "cross_attn"),
                                        ("answer_decoder", "hidden")])
@lengthy
def test_a_float64_model_matches_its_loop_to_float64_rounding(image, question, block, kind):
    """Scores keep the model's dtype: a float64 model's engine and loop agree to float64 rounding, a tolerance
    about 5e8 times tighter than float32's, which float32 scoring would fail."""
    bundle = load_model((tiny_model(seed=1).double(), tiny_processor()), device="cpu")
    config = TraceConfig(block=block, kind=kind, window=3, samples=3, seed=5, corruption=GaussianNoise(scale=2.0),
                         metric="logprob")
    result = Tracer(bundle, image, question, max_batch_rows=7).trace(config)
    reference = ReferenceLoop(bundle, image, question, config, result.config["answer_ids"])
    expected = reference.grid(*result.scores.shape)
    assert np.ptp(expected) > 1e-3
    assert_close(result.scores, expected, dtype=torch.float64)
    assert result.low_score == within_rounding(reference.cell([]), dtype=torch.float64)
