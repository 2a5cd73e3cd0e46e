"""BLIP-2 and InstructBLIP with a Flan-T5 language model: the engine against a per-cell loop of the model's own
forward pass (encoder and decoder), with hooks.

The loop spells the module paths out itself (it shares no code with the package's anatomy or engine): it corrupts the
image embeddings (the ViT's final LayerNorm) with a hook, restores each cell's module output (or, for a head, its
slice of the attention's output projection's input) to its clean value, and reads log p(answer) at the decoder's
first position from the model's own logits.
"""
from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import pytest
import torch
from fast_subset import LENGTHY, lengthy, lengthy_except
from tiny_blip import BLIP2_VOCAB, tiny_blip2_processor, tiny_blip2_t5, tiny_instructblip_processor

from blip_trace_widgets import BlipTraceError, GaussianNoise, TraceConfig, Tracer, load_model

pytestmark = LENGTHY  # the T5 models' tests: tests/test_blip2.py keeps the fast subset's BLIP-2 check

#: What a configuration that names no corruption gets on a model folder without trace_defaults.json:
#: ROME's Gaussian noise of 3 standard deviations.
ROME_DEFAULT = GaussianNoise(3.0)

QUESTION = "what color is the shape?"
QUERIES = 4
ENC, DEC = "language_model.encoder.block.{l}", "language_model.decoder.block.{l}"
PATHS = {
    ("lm_encoder", "hidden"): ENC,
    ("lm_encoder", "self_attn"): ENC + ".layer.0.SelfAttention.o",
    ("lm_encoder", "mlp"): ENC + ".layer.1.DenseReluDense",
    ("lm_encoder", "self_attn_head"): ENC + ".layer.0.SelfAttention.o@in",
    ("lm_decoder", "hidden"): DEC,
    ("lm_decoder", "self_attn"): DEC + ".layer.0.SelfAttention.o",
    ("lm_decoder", "cross_attn"): DEC + ".layer.1.EncDecAttention.o",
    ("lm_decoder", "mlp"): DEC + ".layer.2.DenseReluDense",
    ("lm_decoder", "self_attn_head"): DEC + ".layer.0.SelfAttention.o@in",
    ("lm_decoder", "cross_attn_head"): DEC + ".layer.1.EncDecAttention.o@in",
    ("qformer", "hidden"): "qformer.encoder.layer.{l}",
    ("qformer", "self_attn"): "qformer.encoder.layer.{l}.attention.output.dense",
    ("vision_encoder", "hidden"): "vision_model.encoder.layers.{l}",
    ("vision_encoder", "mlp"): "vision_model.encoder.layers.{l}.mlp",
}
#: (head, seed, answer): tiny models (Flan-T5-like initialisation at 1.5) whose answer moves under the noise.
MODELS = {"blip2-t5": (1, "green"), "instructblip-t5": (0, ":")}


def _out(o):
    return o[0] if isinstance(o, tuple) else o


class T5Loop:
    """ROME's procedure, one forward pass of the whole model per cell, noise samples as the batch."""

    def __init__(self, bundle, image, tracer, config: TraceConfig, instruct: bool,
                 stage: str = "vision_model.post_layernorm"):
        self.model, self.config, self.stage = bundle.model, config, stage
        self.answer = tracer.target(config).tokens[0]
        self.inputs = {"input_ids": torch.tensor([[BLIP2_VOCAB["<image>"]] * QUERIES + list(tracer.question_ids)]),
                       "decoder_input_ids": torch.tensor([[self.model.config.text_config.decoder_start_token_id]]),
                       "pixel_values": bundle.processor.image_processor(image, return_tensors="pt")["pixel_values"].double()}
        if instruct:
            self.inputs["qformer_input_ids"] = torch.tensor([bundle.processor.qformer_tokenizer(QUESTION)["input_ids"]])
        seen = {}
        handle = self.model.get_submodule(stage).register_forward_hook(
            lambda m, i, o: seen.setdefault("x", o) if o.ndim == 3 else None)
        self.clean = self._record()
        handle.remove()
        self.noisy = (config.corruption or ROME_DEFAULT)(seen["x"], config.samples, torch.Generator().manual_seed(config.seed))

    def _name(self, layer: int) -> tuple[str, bool]:
        name = PATHS[(self.config.block, self.config.kind)].format(l=layer)
        return name.split("@")[0], name.endswith("@in")

    def _record(self):
        seen, handles = {}, []
        for layer in range(self._layers()):
            name, pre = self._name(layer)
            module = self.model.get_submodule(name)
            handles.append(module.register_forward_pre_hook(lambda m, i, name=name: seen.__setitem__(name, i[0].clone()))
                           if pre else module.register_forward_hook(
                lambda m, i, o, name=name: seen.__setitem__(name, _out(o).clone())))
        try:
            self._logprob(1)
        finally:
            for h in handles:
                h.remove()
        return seen

    def _layers(self) -> int:
        return len(self.model.get_submodule(PATHS[(self.config.block, "hidden")].split(".{l}")[0]))

    def _logprob(self, samples: int) -> float:
        with torch.no_grad():
            inputs = {k: v.expand(samples, *v.shape[1:]) for k, v in self.inputs.items()}
            logits = self.model(**inputs).logits
        return float(torch.log_softmax(logits, -1)[:, 0, self.answer].mean())

    def cell(self, restore: list[tuple[int, int]]) -> float:
        heads = self.config.kind.endswith("_head")
        with ExitStack() as stack:
            handle = self.model.get_submodule(self.stage).register_forward_hook(
                lambda m, i, o: self.noisy if o.ndim == 3 else o)
            stack.callback(handle.remove)
            for layer, unit in restore:
                name, _ = self._name(layer)
                clean, module = self.clean[name], self.model.get_submodule(name)
                if heads:
                    width = clean.shape[-1] // 4

                    def pre(m, i, clean=clean, h=unit, width=width):
                        x = i[0].clone()
                        x[..., h * width:(h + 1) * width] = clean[..., h * width:(h + 1) * width]
                        return (x, *i[1:])

                    handle = module.register_forward_pre_hook(pre)
                else:
                    def hook(m, i, o, clean=clean, pos=unit):
                        t = _out(o).clone()
                        t[:, pos] = clean[0, pos]
                        return (t, *o[1:]) if isinstance(o, tuple) else t

                    handle = module.register_forward_hook(hook)
                stack.callback(handle.remove)
            return self._logprob(self.config.samples)

    def grid(self, units: int) -> np.ndarray:
        layers, w = self._layers(), self.config.window
        return np.array([[self.cell([(j, u) for j in range(max(0, layer - w // 2), min(layers, layer - (-w // 2)))])
                          for layer in range(layers)] for u in range(units)])


def _bundle(head: str):
    seed, _ = MODELS[head]
    instruct = head.startswith("instruct")
    processor = tiny_instructblip_processor(queries=QUERIES) if instruct else tiny_blip2_processor(queries=QUERIES)
    # in float64: T5 amplifies float32 rounding under 3σ noise to 3e-4 in log p (measured), which would hide a bug;
    # in float64 the two agree to 4e-7 (T5's RMSNorm takes its variance in float32 whatever the dtype)
    model = tiny_blip2_t5(seed=seed, queries=QUERIES, instruct=instruct).double()
    return load_model((model, processor), device="cpu")


@pytest.fixture(scope="module", params=list(MODELS))
def traced(request, image):
    bundle = _bundle(request.param)
    return request.param, bundle, Tracer(bundle, image, QUESTION)


CASES = [(block, kind, 1) for (block, kind) in PATHS] + [("lm_encoder", "mlp", 2), ("lm_decoder", "hidden", 2)]


@pytest.mark.parametrize("block,kind,window", CASES)
@lengthy
def test_every_block_kind_and_window_matches_the_models_own_forward(traced, image, block, kind, window):
    head, bundle, tracer = traced
    vision = block == "vision_encoder"  # corrupted before it, on the patch embeddings
    config = TraceConfig(block=block, kind=kind, window=window, samples=3, corrupt="patches" if vision else "image",
                         metric="logprob", answer=MODELS[head][1], corruption=GaussianNoise(scale=3.0))
    result = tracer.trace(config)
    assert bundle.head == head and result.block == block
    loop = T5Loop(bundle, image, tracer, config, head.startswith("instruct"),
                  stage="vision_model.embeddings" if vision else "vision_model.post_layernorm")
    np.testing.assert_allclose(result.scores, loop.grid(result.scores.shape[0]), atol=1e-6, rtol=1e-6)
    assert result.low_score == pytest.approx(loop.cell([]), abs=1e-6)
    assert result.high_score == pytest.approx(loop._logprob(1), abs=1e-6)
    assert abs(result.high_score - result.low_score) > 0.01  # the noise moves the score: the comparison means something


@lengthy
def test_greedy_answer_is_generate_token_for_token(image):
    for head in MODELS:
        for seed in range(3):
            instruct = head.startswith("instruct")
            model = tiny_blip2_t5(seed=seed, queries=QUERIES, instruct=instruct)
            processor = tiny_instructblip_processor(queries=QUERIES) if instruct else tiny_blip2_processor(queries=QUERIES)
            tracer = Tracer(load_model((model, processor), device="cpu"), image, QUESTION)
            inputs = {"input_ids": torch.tensor([[BLIP2_VOCAB["<image>"]] * QUERIES + list(tracer.question_ids)]),
                      "pixel_values": processor.image_processor(image, return_tensors="pt")["pixel_values"]}
            if instruct:
                inputs["qformer_input_ids"] = torch.tensor([processor.qformer_tokenizer(QUESTION)["input_ids"]])
            out = model.generate(**inputs, max_new_tokens=10, do_sample=False, num_beams=1)
            generated = [int(t) for t in out[0, 1:]]  # after the decoder's start token
            eos = model.config.text_config.eos_token_id
            generated = generated[:generated.index(eos)] if eos in generated else generated
            assert tracer.clean.greedy_ids == generated, (head, seed)


def test_the_blocks_labels_and_refusals(traced):
    head, bundle, tracer = traced
    encoder = tracer.trace(TraceConfig(block="lm_encoder", samples=2, corrupt="image"))
    assert encoder.tokens[:QUERIES] == ["q0", "q1", "q2", "q3"] and encoder.tokens[-1] == "[SEP]"  # T5's end token
    decoder = tracer.trace(TraceConfig(block="lm_decoder", samples=2, corrupt="image"))
    assert decoder.tokens[0] == "[PAD]"  # T5's decoder starts from its pad token
    assert [b for b in ("qformer", "lm_encoder", "lm_decoder", "vision_encoder")
            if b in type(tracer.clean_pass.task).blocks] == ["qformer", "lm_encoder", "lm_decoder", "vision_encoder"]
    with pytest.raises(BlipTraceError, match="no language model"):
        tracer.trace(TraceConfig(block="language_model"))
    with pytest.raises(BlipTraceError, match="trace block='lm_encoder' or 'lm_decoder'"):
        tracer.trace(TraceConfig(block="qformer", corrupt="queries"))
    queries = tracer.trace(TraceConfig(block="lm_decoder", kind="cross_attn", samples=2, corrupt="queries"))
    assert np.isfinite(queries.scores).all()


def test_restoring_everything_gives_the_clean_score(traced):
    _, _, tracer = traced
    config = TraceConfig(block="lm_encoder", kind="hidden", samples=3, corrupt="image", corruption=GaussianNoise(10.0))
    result = tracer.trace(config)
    everything = tuple((1, p) for p in range(len(result.tokens)))
    scores = tracer.restore_marked([everything, ()], config)
    assert float(scores.mean[0]) == pytest.approx(result.high_score, abs=1e-6)
    assert float(scores.mean[1]) == pytest.approx(result.low_score, abs=1e-6)


@lengthy
def test_estimates_tend_to_exact_as_the_noise_vanishes(traced):
    """At small noise the estimate is the exact map's linearisation (measured on this image, log p('blue'): blip2-t5
    0.67% at 1e-3σ and 0.25% at 1e-4σ, instructblip-t5 0.27% and 0.60%; the model's own answer is saturated here,
    p = 1 to float64 precision, so its effects vanish and no gradient can see them)."""
    _, _, tracer = traced
    errors = []
    for scale in (0.001, 0.0001):
        config = TraceConfig(block="lm_encoder", kind="mlp", samples=2, corrupt="image", metric="logprob",
                             answer="blue", corruption=GaussianNoise(scale=scale))  # not saturated, as p(answer) is
        exact, estimate = tracer.trace(config), tracer.trace(config, method="estimate")
        errors.append(np.abs(estimate.scores - exact.scores).sum() / np.abs(exact.scores - exact.low_score).sum())
    assert max(errors) < 0.05, errors


@pytest.mark.parametrize("block", lengthy_except(["lm_encoder", "lm_decoder"], "lm_decoder"))
def test_cutting_the_image_at_every_layer_is_the_models_own_masked_run(traced, image, block):
    """Every edge to the image's positions cut at every layer equals the model's own T5 run with those positions
    masked: in the encoder's self-attention (``attention_mask`` of the encoder), or in the decoder's cross-attention
    (``attention_mask`` beside a clean ``encoder_outputs``)."""
    from blip_trace_widgets.attention_knockout.edges import decoder_edges
    from blip_trace_widgets.attention_knockout.knockout import Edges, knockout

    head, bundle, tracer = traced
    # the model's encoder mask hides the image's positions from every query, the image's own included: name them all
    every = tuple(range(QUERIES + len(tracer.question_ids)))
    edges = decoder_edges("lm_decoder") if block == "lm_decoder" else Edges(every, "image", "self", block)
    layers = 2
    result = knockout(bundle, image, QUESTION, edges=[edges], window=layers, answer=MODELS[head][1])
    lm, model = bundle.model.language_model, bundle.model
    with torch.no_grad():
        queries = model.language_projection(tracer.clean_pass.reader_output[:, :QUERIES])
        embeds = torch.cat([queries, lm.shared(torch.tensor([list(tracer.question_ids)]))], 1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        mask[:, :QUERIES] = 0
        encoded = lm.encoder(inputs_embeds=embeds, attention_mask=mask if block == "lm_encoder" else None)
        logits = lm(encoder_outputs=encoded, attention_mask=mask if block == "lm_decoder" else None,
                    decoder_input_ids=torch.tensor([[0]])).logits
    answer = tracer.target(TraceConfig(block=block, answer=MODELS[head][1])).tokens[0]
    expected = float(torch.softmax(logits[0, 0], -1)[answer])
    assert result.clean_score * (1 + result.changes[0, layers // 2]) == pytest.approx(expected, rel=1e-6)
    assert abs(expected - result.clean_score) > 1e-4  # the cut changes the answer: the check means something


def test_attention_patterns_are_the_models_own(traced, image):
    from blip_trace_widgets.causal_trace.patterns import attention_pattern

    head, bundle, tracer = traced
    model = bundle.model
    lm = model.language_model
    for config in (model.config, lm.config, lm.encoder.config, lm.decoder.config):
        config._attn_implementation = "eager"  # (sdpa gives no attentions)
    inputs = T5Loop(bundle, image, tracer, TraceConfig(block="lm_decoder", answer=MODELS[head][1]),
                    head.startswith("instruct")).inputs
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    attentions = out.language_model_outputs
    np.testing.assert_allclose(attention_pattern(tracer, "lm_encoder", "self_attn_head", 1),
                               attentions.encoder_attentions[1][0].numpy(), atol=1e-6)
    np.testing.assert_allclose(attention_pattern(tracer, "lm_decoder", "cross_attn_head", 0),
                               attentions.cross_attentions[0][0].numpy(), atol=1e-6)


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_a_saved_t5_folder_loads_traces_and_knocks_out(tmp_path, image):
    import json

    from blip_trace_widgets.cli import main

    folder = tmp_path / "tiny-instructblip-t5"
    tiny_blip2_t5(seed=0, queries=QUERIES, instruct=True).save_pretrained(folder)
    tiny_instructblip_processor(queries=QUERIES).save_pretrained(folder)
    assert load_model(str(folder)).head == "instructblip-t5"
    image.save(tmp_path / "image.png")
    common = ["--model", str(folder), "--image", str(tmp_path / "image.png"), "--question", QUESTION]
    assert main(["trace", *common, "--block", "lm_decoder", "--kind", "cross_attn", "--samples", "2",
                 "--out", str(tmp_path / "trace")]) in (0, None)
    saved = json.loads(next((tmp_path / "trace").glob("*.json")).read_text())
    assert saved["config"]["head"] == "instructblip-t5" and saved["block"] == "lm_decoder"
    assert main(["knockout", *common, "--edges", "decoder", "--window", "1",
                 "--out", str(tmp_path / "knockout")]) in (0, None)
    knocked = json.loads(next((tmp_path / "knockout").glob("*.json")).read_text())
    assert [spec["block"] for spec in knocked["specs"]] == ["lm_decoder"]
    assert knocked["labels"] == ["image → answer in the language model's decoder"]


@lengthy
def test_float16_is_refused_and_bfloat16_traces(image):
    processor = tiny_blip2_processor(queries=QUERIES)
    half = load_model((tiny_blip2_t5(seed=1, queries=QUERIES).half(), processor), device="cpu")
    with pytest.raises(BlipTraceError, match="dtype='bfloat16'"):
        Tracer(half, image, QUESTION)
    brain = load_model((tiny_blip2_t5(seed=1, queries=QUERIES).to(torch.bfloat16), processor), device="cpu")
    result = Tracer(brain, image, QUESTION).trace(block="lm_encoder", kind="mlp", samples=2, corrupt="image")
    assert np.isfinite(result.scores).all() and result.high_score > result.low_score


@pytest.mark.parametrize("block,kind",
                         lengthy_except([("lm_encoder", "hidden"), ("lm_decoder", "cross_attn")], ("lm_decoder", "cross_attn")))
def test_noise_on_the_projected_queries_matches_the_models_own_forward(traced, image, block, kind):
    """corrupt='projected': the T5 encoder's image tokens (language_projection's output) noised, against the model's
    own forward pass with that output replaced by a hook."""
    head, bundle, tracer = traced
    config = TraceConfig(block=block, kind=kind, samples=3, corrupt="projected", metric="logprob",
                         answer=MODELS[head][1], corruption=GaussianNoise(scale=3.0))
    result = tracer.trace(config)
    loop = T5Loop(bundle, image, tracer, config, head.startswith("instruct"), stage="language_projection")
    np.testing.assert_allclose(result.scores, loop.grid(result.scores.shape[0]), atol=1e-6, rtol=1e-6)
    assert abs(result.high_score - result.low_score) > 0.01


class T5QuestionLoop(T5Loop):
    """The loop with the question corrupted where the model reads it: the T5 encoder's token embeddings at the
    prompt's positions (the embedding also embeds the decoder's tokens: those are left alone), and InstructBLIP's
    Q-Former instruction (its embeddings' output), drawn in that order from one generator."""

    def __init__(self, bundle, image, tracer, config: TraceConfig, instruct: bool):
        super().__init__(bundle, image, tracer, config, instruct)
        self.prompt = len(tracer.question_ids)
        generator = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            words = self.model.language_model.shared(self.inputs["input_ids"][:, QUERIES:])
            self.noisy_prompt = config.corruption(words, config.samples, generator)
            self.noisy_instruction = None
            if instruct:
                seen = {}
                handle = self.model.qformer.embeddings.register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
                self._logprob(1)
                handle.remove()
                self.noisy_instruction = config.corruption(seen["x"][:, QUERIES:], config.samples, generator)

    def cell(self, restore: list[tuple[int, int]]) -> float:
        def prompt(m, i, o):
            if o.shape[1] != QUERIES + self.prompt:
                return o  # the decoder's tokens
            o = o.clone()
            o[:, QUERIES:] = self.noisy_prompt
            return o

        def instruction(m, i, o):
            o = o.clone()
            o[:, QUERIES:] = self.noisy_instruction
            return o

        self.noisy = None
        handles = [self.model.language_model.shared.register_forward_hook(prompt)]
        if self.noisy_instruction is not None:
            handles.append(self.model.qformer.embeddings.register_forward_hook(instruction))
        try:
            return super().cell(restore)
        finally:
            for handle in handles:
                handle.remove()


@pytest.mark.parametrize("block,kind",
                         lengthy_except([("lm_encoder", "mlp"), ("lm_decoder", "cross_attn")], ("lm_decoder", "cross_attn")))
def test_a_corrupted_question_matches_the_models_own_forward(traced, image, block, kind):
    head, bundle, tracer = traced
    config = TraceConfig(block=block, kind=kind, samples=3, corrupt="question", metric="logprob",
                         answer=MODELS[head][1], corruption=GaussianNoise(scale=3.0))
    result = tracer.trace(config)
    loop = T5QuestionLoop(bundle, image, tracer, config, head.startswith("instruct"))
    np.testing.assert_allclose(result.scores, loop.grid(result.scores.shape[0]), atol=1e-6, rtol=1e-6)
    assert abs(result.high_score - result.low_score) > 0.01


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_the_explorer_paints_only_cross_attention_that_reads_the_image(traced, image):
    """The T5 decoder's cross-attention reads the encoder's positions, not the image: its head map shows no image
    pattern view (before, painting it raised); the Q-Former's does."""
    from blip_trace_widgets.widgets import TraceExplorer

    _, bundle, _ = traced
    explorer = TraceExplorer(bundle, image, QUESTION, background=False, mode="exact")
    explorer.noise_samples.value = 2
    explorer.block.value = "lm_decoder"
    explorer.kind.value = "cross_attn_head"
    assert explorer.error.value == "" and explorer.pattern.layout.display == "none"
    explorer.block.value = "qformer"
    explorer.kind.value = "cross_attn_head"
    assert explorer.error.value == "" and explorer.pattern.layout.display is None


@lengthy
def test_knockout_groups_on_blocks_of_different_depths_share_the_layer_axis(traced, image, tmp_path):
    """The Q-Former (3 layers) and the T5 decoder (2) cut in one call: each row equals its own call, the decoder's
    third layer is NaN (null in JSON, no row in the table, a line that ends), never a zero change."""
    from blip_trace_widgets.attention_knockout.edges import decoder_edges
    from blip_trace_widgets.attention_knockout.knockout import Edges, knockout
    from blip_trace_widgets.attention_knockout.result import KnockoutResult

    _, bundle, _ = traced
    both = knockout(bundle, image, QUESTION, edges=[Edges(), decoder_edges("lm_decoder")], window=1)
    alone = [knockout(bundle, image, QUESTION, edges=[e], window=1) for e in (Edges(), decoder_edges("lm_decoder"))]
    assert both.scores.shape == (2, 3) and np.isnan(both.scores[1, 2]) and not np.isnan(both.scores[:, :2]).any()
    np.testing.assert_allclose(both.scores[0], alone[0].scores[0])
    np.testing.assert_allclose(both.scores[1, :2], alone[1].scores[0])
    assert len(both.to_dataframe()) == 5 and [s[1] for s in both.strongest()][1] < 2
    saved = both.save(tmp_path / "k.json")
    assert "NaN" not in saved.read_text() and np.isnan(KnockoutResult.load(saved).scores[1, 2])
    assert "each group’s block" in both.plot().get_xlabel()
