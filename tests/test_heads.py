"""Captioning and image-text matching: the engine against a per-cell loop of the model's own forward pass.

The loop uses the models' own modules (``text_decoder``, ``text_encoder``, ``itm_head``, and the whole
``model(...)`` for image-side traces) with hooks written here, with module paths spelled out, so it shares
no code with the engine beyond the corruption.
"""
from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import pytest
import torch
from fast_subset import lengthy, lengthy_except
from tiny_blip import tiny_captioner, tiny_matcher, tiny_processor
from tolerance import assert_close, within_rounding

from blip_trace_widgets import GaussianNoise, TraceConfig, Tracer, load_model
from blip_trace_widgets.core.errors import BlipTraceError

TEXT = {"caption_decoder": "text_decoder.bert.encoder.layer", "itm_encoder": "text_encoder.encoder.layer",
        "vision_encoder": "vision_model.encoder.layers"}
SUFFIX = {"hidden": "", "self_attn": ".attention.output.dense", "cross_attn": ".crossattention.output.dense",
          "mlp": ".output.dense", "post_self_attn": ".attention", "post_cross_attn": ".crossattention"}
VISION_SUFFIX = {"hidden": "", "self_attn": ".self_attn", "mlp": ".mlp"}


def _tensor(out):
    return out[0] if isinstance(out, tuple) else out


def _replace(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


@pytest.fixture(scope="module")
def captioner():
    return load_model((tiny_captioner(seed=2), tiny_processor()), device="cpu")


@pytest.fixture(scope="module")
def matcher():
    return load_model((tiny_matcher(seed=3), tiny_processor()), device="cpu")


class Loop:
    """One forward pass of the model's own modules per cell; noise samples are the batch."""

    def __init__(self, bundle, image, result, config: TraceConfig, ids: torch.Tensor):
        self.model, self.config, self.head = bundle.model, config, bundle.head
        self.pixels = bundle.processor.image_processor(image, return_tensors="pt")["pixel_values"]
        self.ids = ids
        self.scored = list(result.config["answer_ids"])
        generator = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            if config.corrupt == "patches":
                self.noisy = config.corruption(self.model.vision_model.embeddings(self.pixels), config.samples, generator)
            else:
                clean_embeds = self.model.vision_model(pixel_values=self.pixels)[0]
                self.noisy = config.corruption(clean_embeds, config.samples, generator)
        self.clean = self._record()

    def _names(self):
        block, kind = self.config.block, self.config.kind
        suffix = VISION_SUFFIX if block == "vision_encoder" else SUFFIX
        return [f"{TEXT[block]}.{layer}{suffix[kind]}" for layer in range(len(self.model.get_submodule(TEXT[block])))]

    def _record(self):
        seen, handles = {}, []
        for name in self._names():
            handles.append(self.model.get_submodule(name).register_forward_hook(
                lambda m, i, o, name=name: seen.__setitem__(name, _tensor(o).clone())))
        try:
            with torch.no_grad():
                self.forward(corrupted=False)
        finally:
            for h in handles:
                h.remove()
        return seen

    def forward(self, corrupted: bool) -> torch.Tensor:
        """Scores [n] of the whole model (image-side traces) or of the text block on given image embeddings."""
        model, cfg = self.model, self.config
        n = cfg.samples if corrupted else 1
        ids = self.ids.expand(n, -1)
        if cfg.block == "vision_encoder":
            with ExitStack() as stack:
                if corrupted:
                    handle = model.vision_model.embeddings.register_forward_hook(lambda m, i, o: self.noisy)
                    stack.callback(handle.remove)
                pixels = self.pixels.expand(n, -1, -1, -1)
                if self.head == "caption":
                    return self._score(model(pixel_values=pixels, input_ids=ids).logits)
                if cfg.metric == "itc":
                    return model(pixel_values=pixels, input_ids=ids, use_itm_head=False).itm_score.diagonal()
                return self._score(model(pixel_values=pixels, input_ids=ids).itm_score)
        embeds = self.noisy if corrupted else model.vision_model(pixel_values=self.pixels)[0]
        if self.head == "caption":
            return self._score(model.text_decoder(input_ids=ids, encoder_hidden_states=embeds).logits)
        states = model.text_encoder(input_ids=ids, attention_mask=torch.ones_like(ids), encoder_hidden_states=embeds)[0]
        return self._score(model.itm_head(states[:, 0]))

    def _score(self, outputs):
        metric = self.config.metric
        if self.head == "itm":
            logprob = torch.log_softmax(outputs.float(), -1)[:, 1]
        else:
            offset = outputs.shape[1] - len(self.scored)
            logprobs = torch.log_softmax(outputs.float(), -1)
            logprob = sum(logprobs[:, offset + k, t] for k, t in enumerate(self.scored))
        return logprob if metric == "logprob" else logprob.exp()

    def cell(self, restore) -> float:
        with ExitStack() as stack, torch.no_grad():
            for layer, pos in restore:
                name = self._names()[layer]
                clean = self.clean[name]

                def hook(m, i, o, clean=clean, pos=pos):
                    t = _tensor(o).clone()
                    t[:, pos] = clean[0, pos]
                    return _replace(o, t)

                handle = self.model.get_submodule(name).register_forward_hook(hook)
                stack.callback(handle.remove)
            return float(self.forward(corrupted=True).mean())

    def grid(self, positions: int, layers: int) -> np.ndarray:
        w = self.config.window
        out = np.zeros((positions, layers))
        for p in range(positions):
            for layer in range(layers):
                window = range(max(0, layer - w // 2), min(layers, layer - (-w // 2)))
                out[p, layer] = self.cell([(j, p) for j in window])
        return out


def _check(bundle, image, text, config):
    tracer = Tracer(bundle, image, text, max_batch_rows=5)  # several chunks, uneven
    result = tracer.trace(config)
    if config.block == "vision_encoder":  # the text the model reads, from the tokenizer, not the engine
        prompt = bundle.tokenizer(text)["input_ids"]
        answer = bundle.tokenizer(config.answer, add_special_tokens=False)["input_ids"] if config.answer else []
        start = [bundle.model.config.text_config.bos_token_id, *prompt[1:-1]]
        ids = [*start, *answer[:-1]] if bundle.head == "caption" else prompt
    else:
        ids = bundle.tokenizer.convert_tokens_to_ids(result.tokens)
    loop = Loop(bundle, image, result, config, torch.tensor([ids]))
    expected = loop.grid(*result.scores.shape)
    assert np.ptp(expected) > 1e-4, "the reference heatmap is flat: the test could not tell engines apart"
    assert_close(result.scores, expected)
    assert result.low_score == within_rounding(loop.cell([]))
    assert result.high_score == within_rounding(float(loop.forward(corrupted=False)[0]))
    return tracer, result


TEXT_CASES = [(kind, window) for kind in SUFFIX for window in (1, 3)]


@pytest.mark.parametrize("kind,window", lengthy_except(TEXT_CASES, ("post_self_attn", 1)))
def test_caption_decoder_matches_loop(captioner, image, kind, window):
    config = TraceConfig(block="caption_decoder", kind=kind, window=window, samples=3, seed=4, word=1,
                         answer="a red circle", corruption=GaussianNoise(2.0), metric="logprob")
    _, result = _check(captioner, image, "the", config)
    assert result.tokens == ["[DEC]", "the", "a"] and result.answer == "red"


@pytest.mark.parametrize("kind,window", TEXT_CASES)
@lengthy
def test_itm_encoder_matches_loop(matcher, image, kind, window):
    config = TraceConfig(block="itm_encoder", kind=kind, window=window, samples=3, seed=4,
                         corruption=GaussianNoise(2.0), metric="logprob")
    _, result = _check(matcher, image, "a red circle", config)
    assert result.tokens == ["[CLS]", "a", "red", "circle", "[SEP]"] and result.answer == "match"


@pytest.mark.parametrize("head,metric", [("caption", "prob"), ("itm", "prob"), ("itm", "itc")])
@pytest.mark.parametrize("kind,window", [(kind, window) for kind in VISION_SUFFIX for window in (1, 2)])
@lengthy
def test_vision_encoder_matches_loop(captioner, matcher, image, head, metric, kind, window):
    bundle, text = (captioner, "") if head == "caption" else (matcher, "a red circle")
    config = TraceConfig(block="vision_encoder", kind=kind, window=window, samples=2, seed=1, metric=metric,
                         corruption=GaussianNoise(1.0), corrupt="patches",
                         **({"answer": "a red", "target": 1} if head == "caption" else {}))
    _check(bundle, image, text, config)


@pytest.mark.parametrize("head,block", [("caption", "caption_decoder"), ("caption", "vision_encoder"),
                                        ("itm", "itm_encoder"), ("itm", "vision_encoder")])
def test_restoring_everything_gives_clean_and_nothing_gives_low(captioner, matcher, image, head, block):
    bundle, text = (captioner, "a") if head == "caption" else (matcher, "a blue circle")
    extra = {"corrupt": "patches"} if block == "vision_encoder" else {}
    config = TraceConfig(block=block, samples=3, corruption=GaussianNoise(3.0), **extra)
    tracer = Tracer(bundle, image, text)
    result = tracer.trace(config)
    layers, positions = result.num_layers, len(result.tokens) if block != "vision_encoder" else result.scores.shape[0]
    if block == "vision_encoder":
        positions = int(tracer.clean.image_embeds.shape[1])
    everything = tuple((layer, pos) for layer in range(layers) for pos in range(positions))
    mean, _ = tracer.restore([everything, ()], config)
    assert mean[0] == within_rounding(result.high_score)
    assert mean[1] == within_rounding(result.low_score)
    assert abs(result.high_score - result.low_score) > 1e-3


@lengthy
def test_greedy_caption_is_generate(captioner, image):
    from tiny_blip import tiny_captioner

    bundle = load_model((tiny_captioner(seed=5, positions=40), tiny_processor()), device="cpu")
    for prompt in ("", "the shape"):
        tracer = Tracer(bundle, image, prompt)
        inputs = bundle.processor(images=image, text=prompt or None, return_tensors="pt")
        out = bundle.model.generate(**inputs, max_new_tokens=20)
        start = len(tracer.question_ids)
        assert tracer.clean.greedy_ids == out[0, start:].tolist()[: len(tracer.clean.greedy_ids)]
        assert len(out[0]) - start in (len(tracer.clean.greedy_ids), len(tracer.clean.greedy_ids) + 1)  # + [SEP]


@lengthy
def test_demo_caption_is_generate_with_and_without_prompt(demo_sample):
    bundle = load_model("demo-caption")
    image = demo_sample[0]
    for prompt in ("", "a"):
        tracer = Tracer(bundle, image, prompt)
        inputs = bundle.processor(images=image, text=prompt or None, return_tensors="pt")
        out = bundle.model.generate(**inputs, max_new_tokens=20)
        said = bundle.tokenizer.decode(out[0], skip_special_tokens=True).strip()
        assert (prompt + " " + tracer.model_answer).strip() == said
    assert tracer.question_ids[0] == bundle.model.config.text_config.bos_token_id


def test_caption_words_and_targets(captioner, image):
    tracer = Tracer(captioner, image, "")
    assert tracer.caption_words("a red circle") == ["a", "red", "circle"]
    results = [tracer.trace(block="caption_decoder", answer="a red circle", word=k, samples=2) for k in range(3)]
    assert [r.answer for r in results] == ["a", "red", "circle"]
    assert [r.tokens for r in results] == [["[DEC]"], ["[DEC]", "a"], ["[DEC]", "a", "red"]]
    with pytest.raises(BlipTraceError, match="has 3 words: use 0 to 2"):
        tracer.trace(block="caption_decoder", answer="a red circle", word=3)


@pytest.mark.parametrize("head,fields,message", [
    ("caption", {"block": "question_encoder"}, "has no question encoder"),
    ("caption", {"metric": "itc", "block": "vision_encoder", "corrupt": "patches"}, "does not apply to a captioning"),
    ("caption", {"metric": "itc"}, "does not apply to a captioning model"),
    ("itm", {"answer": "red"}, "no answer"),
    ("itm", {"target": 1}, "with a captioning model"),
    ("itm", {"metric": "itc"}, "cannot change it"),
    ("itm", {"metric": "logit_diff", "contrast": "blue"}, "does not apply to an image-text matching"),
    ("vqa", {"target": 0}, "with a captioning model"),
    ("vqa", {"block": "caption_decoder"}, "has no caption decoder"),
])
def test_settings_that_mean_nothing_for_a_head_are_refused(captioner, matcher, tiny_bundle, image, head, fields, message):
    bundle = {"caption": captioner, "itm": matcher, "vqa": tiny_bundle}[head]
    text = {"caption": "", "itm": "a red circle", "vqa": "what color is the shape?"}[head]
    with pytest.raises(BlipTraceError, match=message):
        Tracer(bundle, image, text).trace(samples=2, **fields)


def test_itm_text_must_not_be_empty(matcher, image):
    with pytest.raises(BlipTraceError, match="the text is empty"):
        Tracer(matcher, image, "  ")


def test_itc_matches_the_models_own_similarity(matcher, image):
    tracer = Tracer(matcher, image, "a red circle")
    result = tracer.trace(block="vision_encoder", metric="itc", corrupt="patches", samples=2)
    inputs = matcher.processor(images=image, text="a red circle", return_tensors="pt")
    with torch.no_grad():
        expected = float(matcher.model(**inputs, use_itm_head=False).itm_score[0, 0])
        p_match = float(torch.softmax(matcher.model(**inputs).itm_score, -1)[0, 1])
    assert result.high_score == within_rounding(expected)
    assert tracer.match_probability == within_rounding(p_match)


@pytest.mark.parametrize("head,block,metric", [("caption", "caption_decoder", "prob"), ("itm", "itm_encoder", "prob"),
                                               ("itm", "vision_encoder", "itc")])
@pytest.mark.parametrize("kind", ["hidden", "mlp"])
@lengthy
def test_estimates_of_the_new_heads_tend_to_the_exact_map(captioner, matcher, image, head, block, metric, kind):
    bundle, text, extra = ((captioner, "the", {"answer": "a red circle", "target": 2}) if head == "caption"
                           else (matcher, "a red circle", {"corrupt": "patches"} if block == "vision_encoder" else {}))
    tracer = Tracer(bundle, image, text)
    config = TraceConfig(block=block, kind=kind, samples=3, corruption=GaussianNoise(1.0), metric=metric, **extra)
    exact = tracer.trace(config).scores
    errors = [np.abs(tracer.trace(config, method="estimate", steps=steps).scores - exact).max() for steps in (1, 32)]
    assert errors[0] > 1e-4 and errors[1] < 0.3 * errors[0], errors
