"""BLIP-2 (OPT): the engine against a per-cell loop of Blip2ForConditionalGeneration's own forward pass with hooks.

The loop spells the module paths out itself (it shares no code with the package's anatomy or engine), corrupts the
image embeddings (the output of the ViT's final LayerNorm) or the patch embeddings with hooks, restores each
cell's modules to their clean outputs, and scores the answer from the model's own logits.
"""
from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import pytest
import torch
from fast_subset import lengthy, lengthy_except
from tiny_blip import BLIP2_VOCAB, tiny_blip2, tiny_blip2_processor
from tolerance import assert_close, within_rounding

from blip_trace_widgets import BlipTraceError, Edges, GaussianNoise, TraceConfig, Tracer, load_model

QFORMER = "qformer.encoder.layer.{l}"
LM = "language_model.model.decoder.layers.{l}"
VIT = "vision_model.encoder.layers.{l}"
#: (block, kind) -> module whose output the cell restores; "@in" marks an input (a head kind: the context).
PATHS = {
    ("qformer", "hidden"): QFORMER,
    ("qformer", "self_attn"): QFORMER + ".attention.output.dense",
    ("qformer", "cross_attn"): QFORMER + ".crossattention.output.dense",
    ("qformer", "mlp"): QFORMER + ".output_query.dense",
    ("qformer", "post_self_attn"): QFORMER + ".attention",
    ("qformer", "post_cross_attn"): QFORMER + ".crossattention",
    ("qformer", "self_attn_head"): QFORMER + ".attention.output.dense@in",
    ("qformer", "cross_attn_head"): QFORMER + ".crossattention.output.dense@in",
    ("language_model", "hidden"): LM,
    ("language_model", "self_attn"): LM + ".self_attn.out_proj",
    ("language_model", "mlp"): LM + ".fc2",
    ("language_model", "self_attn_head"): LM + ".self_attn.out_proj@in",
    ("vision_encoder", "hidden"): VIT,
    ("vision_encoder", "self_attn"): VIT + ".self_attn",
    ("vision_encoder", "mlp"): VIT + ".mlp",
}
QUESTION = "what color is the shape?"
QUERIES = 4


def _tensor(out):
    return out[0] if isinstance(out, tuple) else out


def _replace(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


class Blip2Loop:
    """ROME's procedure on BLIP-2, one forward pass of the whole model per cell, noise samples as the batch."""

    def __init__(self, bundle, image, config: TraceConfig, answer: list[int], corrupt: str):
        self.model, self.config, self.answer, self.corrupt = bundle.model, config, answer, corrupt
        tokenizer = bundle.tokenizer
        prompt = [self.model.config.text_config.bos_token_id,
                  *tokenizer(f"Question: {QUESTION} Answer:", add_special_tokens=False)["input_ids"]]
        self.ids = torch.tensor([[BLIP2_VOCAB["<image>"]] * QUERIES + prompt + answer[:-1]])
        self.offset = QUERIES + len(prompt) - 1
        self.pixels = bundle.processor.image_processor(image, return_tensors="pt")["pixel_values"]
        self.stage = "vision_model.post_layernorm" if corrupt == "image" else "vision_model.embeddings"
        with torch.no_grad():
            clean_input = self.clean_stage = self._stage_output(self.pixels)
        self.noisy = config.corruption(clean_input, config.samples, torch.Generator().manual_seed(config.seed))
        self.clean = self._record()

    def _stage_output(self, pixels):
        seen = {}
        module = self.model.get_submodule(self.stage)
        handle = module.register_forward_hook(lambda m, i, o: seen.setdefault("x", o) if o.ndim == 3 else None)
        try:
            self.model(pixel_values=pixels, input_ids=self.ids)
        finally:
            handle.remove()
        return seen["x"]

    def _present(self, name: str) -> bool:
        try:
            self.model.get_submodule(name.split("@")[0])
            return True
        except AttributeError:
            return False

    def _record(self):
        seen, handles = {}, []
        for layer in range(self._layers()):
            name = self._name(layer)
            if name is None:
                continue
            module = self.model.get_submodule(name.split("@")[0])
            if name.endswith("@in"):
                handles.append(module.register_forward_pre_hook(
                    lambda m, i, name=name: seen.__setitem__(name, i[0].clone())))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, i, o, name=name: seen.__setitem__(name, _tensor(o).clone())))
        try:
            with torch.no_grad():
                self.model(pixel_values=self.pixels, input_ids=self.ids)
        finally:
            for h in handles:
                h.remove()
        return seen

    def _name(self, layer: int) -> str | None:
        """The module a cell restores at ``layer``, or None where the layer lacks the sublayer."""
        name = PATHS[(self.config.block, self.config.kind)].format(l=layer)
        if self._present(name):
            return name
        if self.config.kind == "post_cross_attn":  # no cross-attention: the residual after it is h1
            return name.replace(".crossattention", ".attention")
        return None

    def _layers(self) -> int:
        return len(self.model.get_submodule(PATHS[(self.config.block, "hidden")].split(".{l}")[0]))

    def cell(self, restore: list[tuple[int, int]], heads: bool) -> float:
        """The mean score with ``restore``'s (layer, position) (or, for head kinds, (layer, head)) restored."""
        samples = self.config.samples
        with ExitStack() as stack, torch.no_grad():
            noisy = self.noisy
            handle = self.model.get_submodule(self.stage).register_forward_hook(
                lambda m, i, o: noisy if o.ndim == 3 else o)
            stack.callback(handle.remove)
            for layer, unit in restore:
                name = self._name(layer)
                if name is None:
                    continue  # a layer without the sublayer: nothing to restore
                clean = self.clean[name]
                module = self.model.get_submodule(name.split("@")[0])
                if heads:
                    width = clean.shape[-1] // self._heads()

                    def pre(m, i, clean=clean, h=unit, width=width):
                        x = i[0].clone()
                        x[..., h * width:(h + 1) * width] = clean[..., h * width:(h + 1) * width]
                        return (x, *i[1:])

                    handle = module.register_forward_pre_hook(pre)
                else:
                    def hook(m, i, o, clean=clean, pos=unit):
                        t = _tensor(o).clone()
                        flat = t.ndim == 2  # OPT's fc2 runs on [B*T, D]
                        view = t.view(samples, -1, t.shape[-1]) if flat else t
                        view[:, pos] = clean.view(1, -1, clean.shape[-1])[0, pos]
                        return _replace(o, t)

                    handle = module.register_forward_hook(hook)
                stack.callback(handle.remove)
            logits = self.model(pixel_values=self.pixels.expand(samples, -1, -1, -1),
                                input_ids=self.ids.expand(samples, -1)).logits
        logprobs = torch.log_softmax(logits.float(), -1)
        return float(logprobs[:, self.offset, self.answer[0]].exp().mean())

    def _heads(self) -> int:
        config = self.model.config
        return {"qformer": config.qformer_config, "language_model": config.text_config,
                "vision_encoder": config.vision_config}[self.config.block].num_attention_heads

    def grid(self, units: int) -> np.ndarray:
        layers, w = self._layers(), self.config.window
        heads = self.config.kind.endswith("_head")
        out = np.zeros((units, layers))
        for u in range(units):
            for layer in range(layers):
                window = range(max(0, layer - w // 2), min(layers, layer - (-w // 2)))
                out[u, layer] = self.cell([(j, u) for j in window], heads)
        return out


@pytest.fixture(scope="module")
def bundle():
    return load_model((tiny_blip2(seed=3), tiny_blip2_processor(queries=QUERIES)), device="cpu")


@pytest.fixture(scope="module")
def tracer(bundle, image):
    return Tracer(bundle, image, QUESTION)


CASES = [(block, kind, window) for (block, kind) in PATHS for window in (1, 3)
         if not (block == "vision_encoder" and window == 3)]


@pytest.mark.parametrize("block,kind,window", lengthy_except(CASES, ("qformer", "cross_attn", 1)))
def test_every_block_kind_and_window_matches_the_models_own_forward(bundle, image, tracer, block, kind, window):
    corrupt = "patches" if block == "vision_encoder" else "image"
    config = TraceConfig(block=block, kind=kind, window=window, samples=3, corruption=GaussianNoise(scale=3.0),
                         corrupt=corrupt)
    result = tracer.trace(config)
    answer = list(tracer.target(config).tokens)
    loop = Blip2Loop(bundle, image, config, answer, corrupt)
    expected = loop.grid(result.scores.shape[0])
    assert_close(result.scores, expected, ulps=1024)
    assert result.low_score == within_rounding(loop.cell([], False))


@pytest.mark.parametrize("block", ["qformer", "language_model", "vision_encoder"])
def test_restoring_everything_gives_the_clean_score_and_nothing_the_low(tracer, block):
    corrupt = "patches" if block == "vision_encoder" else "image"
    config = TraceConfig(block=block, kind="hidden", samples=3, corrupt=corrupt, corruption=GaussianNoise(scale=10.0))
    result = tracer.trace(config)
    assert abs(result.high_score - result.low_score) > 1e-3  # the noise moves the score
    last = len(tracer.blocks[block].stack) - 1
    everything = tuple((last, p) for p in range(len(result.tokens)))
    scores = tracer.restore_marked([everything, ()], config)
    assert float(scores.mean[0]) == within_rounding(result.high_score)
    assert float(scores.mean[1]) == within_rounding(result.low_score)


def test_cross_attention_cells_of_layers_without_it_are_marked_absent(tracer):
    result = tracer.trace(TraceConfig(block="qformer", kind="cross_attn", samples=3, corrupt="image"))
    absent = result.config["absent_layers"]
    assert absent == [1]  # cross_attention_frequency=2 over 3 layers: layers 0 and 2 cross-attend
    assert_close(result.scores[:, absent], result.low_score)
    assert not np.allclose(result.scores[:, [0, 2]], result.low_score, atol=1e-4)


@lengthy
def test_greedy_answer_is_generate_token_for_token(bundle, image):
    for seed in range(3):
        model = tiny_blip2(seed=seed)
        b = load_model((model, tiny_blip2_processor(queries=QUERIES)), device="cpu")
        tracer = Tracer(b, image, QUESTION)
        pixels = b.processor.image_processor(image, return_tensors="pt")["pixel_values"]
        ids = torch.tensor([[BLIP2_VOCAB["<image>"]] * QUERIES + list(tracer.question_ids)])
        out = model.generate(pixel_values=pixels, input_ids=ids, max_new_tokens=10, do_sample=False, num_beams=1)
        generated = [int(t) for t in out[0, ids.shape[1]:]]
        eos = model.config.text_config.eos_token_id
        if eos in generated:
            generated = generated[:generated.index(eos)]
        assert tracer.clean.greedy_ids == generated


def test_an_answer_is_scored_as_the_model_would_say_it(tracer):
    # after "Answer:", a byte-level tokenizer's answer carries its space; a WordPiece one's does not differ
    red = tracer.target(TraceConfig(block="language_model", answer="red")).tokens
    assert red == (BLIP2_VOCAB["red"],)
    target = tracer.target(TraceConfig(block="language_model", answer="red"))
    assert target.offset == QUERIES + len(tracer.question_ids) - 1


def test_question_corruption_and_blip_blocks_are_refused_clearly(tracer):
    with pytest.raises(BlipTraceError, match="corrupt the image"):
        tracer.trace(TraceConfig(block="qformer", corrupt="question"))
    with pytest.raises(BlipTraceError, match="has no question encoder"):
        tracer.trace(TraceConfig(block="question_encoder"))


def test_the_labels_are_the_queries_then_the_prompt(tracer):
    result = tracer.trace(TraceConfig(block="language_model", samples=2, corrupt="image"))
    assert result.tokens[:QUERIES] == [f"q{i}" for i in range(QUERIES)]
    assert result.tokens[QUERIES] == "[CLS]" and "question" in result.tokens
    assert tracer.trace(TraceConfig(block="qformer", samples=2, corrupt="image")).tokens == ["q0", "q1", "q2", "q3"]


@pytest.mark.parametrize("block", lengthy_except(["qformer", "language_model", "vision_encoder"], "language_model"))
def test_estimates_tend_to_exact_as_the_noise_vanishes(tracer, block):
    corrupt = "patches" if block == "vision_encoder" else "image"
    errors = []
    for scale in (0.1, 0.01):
        config = TraceConfig(block=block, kind="mlp", samples=2, corrupt=corrupt, corruption=GaussianNoise(scale=scale))
        exact = tracer.trace(config)
        estimate = tracer.trace(config, method="estimate")
        errors.append(np.abs(estimate.scores - exact.scores).sum() / np.abs(exact.scores - exact.low_score).sum())
    assert errors[1] < 0.1 and errors[1] < errors[0] / 5, errors  # the error shrinks with the noise


@lengthy
def test_absent_layers_are_drawn_not_applicable(tracer):
    from blip_trace_widgets.causal_trace.plots import plot_trace

    result = tracer.trace(TraceConfig(block="qformer", kind="cross_attn_head", samples=2, corrupt="image"))
    assert result.absent_cells[:, 1].all() and not result.absent_cells[:, [0, 2]].any()
    ax = plot_trace(result)
    assert "n/a" in [t.get_text() for t in ax.texts] and "no cross-attention" in ax.get_xlabel()
    assert "n/a" not in [t.get_text() for t in plot_trace(tracer.trace(TraceConfig(
        block="qformer", kind="mlp", samples=2, corrupt="image"))).texts]


def test_qk_fix_is_refused_on_the_pre_ln_language_model(tracer):
    with pytest.raises(BlipTraceError, match="outside the vision encoder and BLIP-2's language model"):
        tracer.trace(TraceConfig(block="language_model", method="estimate", qk_fix=True, corrupt="image"))


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_a_saved_blip2_folder_loads_and_traces_from_the_command_line(tmp_path, image, capsys):
    from blip_trace_widgets.cli import main

    folder = tmp_path / "tiny-blip2"
    tiny_blip2(seed=3).save_pretrained(folder)
    tiny_blip2_processor(queries=QUERIES).save_pretrained(folder)
    bundle = load_model(str(folder))
    assert bundle.head == "blip2" and type(bundle.processor).__name__ == "Blip2Processor"
    image.save(tmp_path / "image.png")
    code = main(["trace", "--model", str(folder), "--image", str(tmp_path / "image.png"), "--question", QUESTION,
                 "--block", "qformer", "--kind", "cross_attn", "--samples", "2", "--out", str(tmp_path / "out")])
    assert code in (0, None)
    written = sorted(p.suffix for p in (tmp_path / "out").iterdir())
    assert written == [".json", ".png"]
    import json

    saved = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert saved["config"]["absent_layers"] == [1] and saved["config"]["head"] == "blip2"


def test_cutting_the_image_out_of_every_language_model_layer_is_reading_the_text_alone(bundle, image, tracer):
    """With every edge to the image's positions cut at every layer, the text positions read only the text: the
    model's own OPT decoder run on the text's embeddings alone, at positions Q onward, gives the same answer
    probability."""
    from blip_trace_widgets.attention_knockout.knockout import Edges, knockout

    layers = len(bundle.model.language_model.model.decoder.layers)
    result = knockout(bundle, image, QUESTION, edges=Edges(block="language_model", attention="self", keys="image"),
                      window=layers)
    centre = layers // 2  # its window covers every layer
    ids = torch.tensor([list(tracer.question_ids)])
    positions = torch.arange(QUERIES, QUERIES + ids.shape[1])[None]
    with torch.no_grad():
        logits = bundle.model.language_model(input_ids=ids, position_ids=positions).logits
    answer = tracer.target(TraceConfig(block="language_model")).tokens[0]
    expected = float(torch.softmax(logits[0, -1].float(), -1)[answer])
    cut = result.clean_score * (1 + result.changes[0, centre])
    assert cut == within_rounding(expected)
    assert result.labels == ["image → language model (self-attention)"]


@lengthy
def test_knockout_labels_and_refusals_on_blip2(bundle, image):
    from blip_trace_widgets.attention_knockout.knockout import Edges, knockout

    result = knockout(bundle, image, QUESTION, edges=[Edges(), Edges(block="qformer", attention="self")], window=1)
    assert result.labels == ["image → queries", "queries → queries (self-attention)"]
    assert np.isfinite(result.changes).all()
    estimate = knockout(bundle, image, QUESTION, edges=[Edges()], window=1, method="estimate")
    assert estimate.changes.shape == result.changes[:1].shape
    with pytest.raises(BlipTraceError, match="has no cross-attention"):
        Edges(block="language_model")
    with pytest.raises(BlipTraceError, match="image's positions in BLIP-2's language model"):
        knockout(bundle, image, QUESTION, edges=[Edges(block="qformer", attention="self", keys="image")])


def test_patterns_of_blip2_heads_are_the_models_own(bundle, image, tracer):
    from blip_trace_widgets.causal_trace.patterns import attention_pattern

    pixels = bundle.processor.image_processor(image, return_tensors="pt")["pixel_values"]
    ids = torch.tensor([[BLIP2_VOCAB["<image>"]] * QUERIES + list(tracer.question_ids)
                        + list(tracer.target(TraceConfig(block="language_model")).inputs[len(tracer.question_ids):])])
    bundle.model.config._attn_implementation = "eager"
    for sub in (bundle.model.qformer, bundle.model.language_model):
        sub.config._attn_implementation = "eager"
    seen = {}
    handle = bundle.model.get_submodule("qformer.encoder.layer.2.crossattention.attention").register_forward_hook(
        lambda m, i, o: seen.update(weights=o[1]))
    try:
        with torch.no_grad():
            out = bundle.model(pixel_values=pixels, input_ids=ids, output_attentions=True)
    finally:
        handle.remove()
    ours = attention_pattern(tracer, "language_model", "self_attn_head", 1)
    assert_close(ours, out.language_model_outputs.attentions[1][0].numpy())
    cross = attention_pattern(tracer, "qformer", "cross_attn_head", 2)
    assert_close(cross, seen["weights"][0].numpy())
    with pytest.raises(BlipTraceError, match="layer 1 of the Q-Former has no cross-attention: pick one of layers 0, 2"):
        attention_pattern(tracer, "qformer", "cross_attn_head", 1)


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_the_explorer_offers_each_blip2_block_its_own_kinds(bundle, image):
    from blip_trace_widgets.widgets import TraceExplorer

    explorer = TraceExplorer(bundle, image, QUESTION, background=False, mode="exact")
    explorer.noise_samples.value = 2
    assert [v for _, v in explorer.block.options] == ["qformer", "language_model"]
    explorer.kind.value = "cross_attn"
    assert explorer.error.value == "" and explorer.result.config["absent_layers"] == [1]
    explorer.block.value = "language_model"  # it has no cross-attention: the kind falls back to hidden states
    assert "cross_attn" not in [v for _, v in explorer.kind.options] and explorer.kind.value == "hidden"
    assert explorer.error.value == "" and explorer.result.block == "language_model"
    explorer.view.value = "compare"
    assert explorer.error.value == "" and sorted(explorer.results) == ["hidden", "mlp", "self_attn"]
    assert [child.layout.display for child in explorer.comparison.children][-1] == "none"


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_the_explorer_paints_only_the_q_formers_cross_attention_layers(bundle, image):
    from blip_trace_widgets.widgets import TraceExplorer

    explorer = TraceExplorer(bundle, image, QUESTION, background=False, mode="exact")
    explorer.noise_samples.value = 2
    explorer.kind.value = "cross_attn_head"
    assert explorer.error.value == "" and explorer.pattern.layout.display is None
    assert [j for _, j in explorer.pattern.layer.options] == [0, 2]  # layer 1 has no cross-attention
    explorer.pattern.layer.value = 2
    assert explorer.pattern.view.value  # painted


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_a_sharded_checkpoint_loads_in_half_precision(tmp_path, monkeypatch, image):
    """BLIP-2's hub checkpoints are sharded: the half-precision shortcut (for single-file checkpoints) steps aside and
    transformers loads the shards in the dtype asked for; a hub snapshot without model.safetensors is not used."""
    from blip_trace_widgets.models import loading

    folder = tmp_path / "sharded"
    tiny_blip2(seed=3).save_pretrained(folder, max_shard_size="100KB")
    tiny_blip2_processor(queries=QUERIES).save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    bundle = load_model(str(folder), dtype="float16")
    assert bundle.dtype == torch.float16 and bundle.head == "blip2"
    assert Tracer(bundle, image, QUESTION).trace(block="qformer", samples=2, corrupt="image").scores.shape == (4, 3)
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: str(folder))
    assert loading._half_source("Owner/blip2-like", torch.float16, {}) == "Owner/blip2-like"


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_the_decoder_group_is_the_language_model_reading_the_image(bundle, image):
    from blip_trace_widgets.attention_knockout.edges import parse_edges
    from blip_trace_widgets.widgets import KnockoutExplorer

    assert parse_edges("decoder", decoder="language_model") == Edges(block="language_model", attention="self",
                                                                      keys="image")
    assert parse_edges("decoder").block == "answer_decoder"
    explorer = KnockoutExplorer(bundle, image, QUESTION, background=False)
    assert ("language model ↛ image", "decoder") in explorer.groups.options
    explorer.groups.value = ("decoder",)
    assert explorer.error.value == "" and explorer.result.labels == ["image → language model (self-attention)"]


@lengthy
def test_noise_on_the_qformers_output_queries_is_restored_in_the_language_model(bundle, image, tracer):
    """corrupt='queries': the Q-Former's outputs (what the language model reads) noised, checked cell by cell
    against the model's own forward pass with that output replaced by a hook."""
    config = TraceConfig(block="language_model", kind="hidden", samples=3, corrupt="queries",
                         corruption=GaussianNoise(scale=3.0))
    result = tracer.trace(config)
    assert "Q-Former output queries" in result.plot().get_title(loc="left")
    answer = list(tracer.target(config).tokens)
    loop = Blip2Loop(bundle, image, config, answer, "image")
    with torch.no_grad():
        queries = bundle.model.qformer(query_embeds=bundle.model.query_tokens,
                                       encoder_hidden_states=loop.clean_stage).last_hidden_state
    last = len(bundle.model.qformer.encoder.layer) - 1  # the Q-Former's output is its last layer's
    loop.stage = f"qformer.encoder.layer.{last}"
    loop.noisy = config.corruption(queries, 3, torch.Generator().manual_seed(0))
    assert_close(result.scores, loop.grid(result.scores.shape[0]), ulps=1024)
    with pytest.raises(BlipTraceError, match="trace block='language_model'"):
        tracer.trace(TraceConfig(block="qformer", corrupt="queries"))


@lengthy
def test_noise_on_the_projected_queries_is_restored_in_the_language_model(bundle, image, tracer):
    """corrupt='projected': the language model's image tokens (language_projection's output) noised, against the
    model's own forward pass with that output replaced by a hook; σ is the projected queries' own."""
    config = TraceConfig(block="language_model", kind="mlp", samples=3, corrupt="projected",
                         corruption=GaussianNoise(scale=3.0))
    result = tracer.trace(config)
    assert "projected queries" in result.plot().get_title(loc="left")
    loop = Blip2Loop(bundle, image, config, list(tracer.target(config).tokens), "image")
    seen = {}
    handle = bundle.model.language_projection.register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    with torch.no_grad():
        bundle.model(pixel_values=loop.pixels, input_ids=loop.ids)
    handle.remove()
    loop.stage = "language_projection"
    loop.noisy = config.corruption(seen["x"], 3, torch.Generator().manual_seed(0))
    assert_close(result.scores, loop.grid(result.scores.shape[0]), ulps=1024)
    assert abs(result.high_score - result.low_score) > 1e-3
    with pytest.raises(BlipTraceError, match="corrupt='projected', noise on the queries"):
        tracer.trace(TraceConfig(block="qformer", corrupt="projected"))


@lengthy
def test_queries_are_refused_where_there_are_none(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    with pytest.raises(BlipTraceError, match="BLIP-2's Q-Former outputs: this model has none"):
        Tracer(demo_bundle, image, question).trace(block="answer_decoder", corrupt="queries")
    with pytest.raises(BlipTraceError, match="corrupt='projected' is noise on BLIP-2's Q-Former outputs"):
        Tracer(demo_bundle, image, question).trace(block="answer_decoder", corrupt="projected")
