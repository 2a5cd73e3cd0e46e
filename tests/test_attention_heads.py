"""Attention heads as cells, against a per-cell loop of the model's own forward pass.

The loop restores head h at layer l with a forward pre-hook on the attention's output projection that sets
the head's slice (dims h*d_head to (h+1)*d_head) of its input to the clean value, at the chosen positions.
It spells the module paths out itself and shares nothing with the engine but the corrupted draw and the
tokens scored.
"""
from __future__ import annotations

import warnings
from contextlib import ExitStack

import numpy as np
import pytest
import torch
from fast_subset import lengthy, lengthy_except
from tiny_blip import tiny_captioner, tiny_matcher, tiny_model, tiny_processor
from tolerance import assert_close, within_rounding

from blip_trace_widgets import BlipTraceError, GaussianNoise, TraceConfig, Tracer, load_model
from blip_trace_widgets.core.names import HEAD_SUBLAYER

TEXT = {"question_encoder": "text_encoder.encoder.layer", "answer_decoder": "text_decoder.bert.encoder.layer",
        "caption_decoder": "text_decoder.bert.encoder.layer", "itm_encoder": "text_encoder.encoder.layer"}
PROJECTION = {"self_attn_head": ".attention.output.dense", "cross_attn_head": ".crossattention.output.dense"}
VISION = "vision_model.encoder.layers"


class HeadLoop:
    """One forward pass of the model per cell, the noise samples as the batch."""

    def __init__(self, tracer: Tracer, config: TraceConfig):
        self.tracer, self.config, self.model = tracer, config, tracer.model
        self.target = tracer.target(config)
        self.question = torch.tensor([list(tracer.question_ids)])
        self.pixels = tracer.bundle.processor.image_processor(tracer.image, return_tensors="pt")["pixel_values"]
        if config.block == "vision_encoder":
            self.corrupted_input = tracer.corrupted_patches(config)
            heads = self.model.config.vision_config.num_attention_heads
        else:
            self.corrupted_input = tracer.corrupted(config).image_embeds
            heads = self.model.config.text_config.num_attention_heads
        self.heads = heads
        self.clean = self._record()

    def projection(self, layer: int) -> torch.nn.Module:
        if self.config.block == "vision_encoder":
            return self.model.get_submodule(f"{VISION}.{layer}.self_attn.projection")
        return self.model.get_submodule(f"{TEXT[self.config.block]}.{layer}{PROJECTION[self.config.kind]}")

    def layers(self) -> int:
        name = VISION if self.config.block == "vision_encoder" else TEXT[self.config.block]
        return len(self.model.get_submodule(name))

    def _record(self) -> dict[int, torch.Tensor]:
        seen, handles = {}, []
        for layer in range(self.layers()):
            handles.append(self.projection(layer).register_forward_pre_hook(
                lambda m, args, layer=layer: seen.__setitem__(layer, args[0].clone())))
        try:
            with torch.no_grad():
                self.forward(corrupted=False)
        finally:
            for handle in handles:
                handle.remove()
        return seen

    def forward(self, corrupted: bool) -> torch.Tensor:
        """Per-sample scores of the model's own forward pass (the clean input, or the corrupted draw)."""
        model, block = self.model, self.config.block
        with ExitStack() as stack:
            if block == "vision_encoder":
                pixels = self.pixels.expand(self.corrupted_input.shape[0] if corrupted else 1, -1, -1, -1)
                if corrupted:
                    handle = model.vision_model.embeddings.register_forward_hook(lambda m, i, o: self.corrupted_input)
                    stack.callback(handle.remove)
                embeds = model.vision_model(pixel_values=pixels)[0]
            else:
                embeds = self.corrupted_input if corrupted else model.vision_model(pixel_values=self.pixels)[0]
            return self._score(embeds)

    def _score(self, embeds: torch.Tensor) -> torch.Tensor:
        model, target, n = self.model, self.target, embeds.shape[0]
        head = self.tracer.head
        if head == "itm":
            states = model.text_encoder(input_ids=self.question.expand(n, -1), encoder_hidden_states=embeds)[0]
            return torch.softmax(model.itm_head(states[:, 0]), -1)[:, 1]
        if head == "vqa":
            states = model.text_encoder(input_ids=self.question.expand(n, -1), encoder_hidden_states=embeds)[0]
        else:
            states = embeds
        inputs = torch.tensor([list(target.inputs)]).expand(n, -1)
        logits = model.text_decoder(input_ids=inputs, encoder_hidden_states=states).logits
        logprobs = torch.log_softmax(logits.double(), -1)
        total = sum(logprobs[:, target.offset + k, t] for k, t in enumerate(target.tokens))
        return total if self.config.metric == "logprob" else total.exp()

    def cell(self, restore: list[tuple[int, int, list[int]]]) -> float:
        """The mean score with each (layer, head, positions) restored."""
        d = self.clean[0].shape[-1] // self.heads
        with ExitStack() as stack, torch.no_grad():
            for layer, head, positions in restore:
                clean = self.clean[layer]

                def hook(m, args, clean=clean, head=head, positions=positions):
                    x = args[0].clone()
                    x[:, positions, head * d:(head + 1) * d] = clean[0, positions, head * d:(head + 1) * d]
                    return (x, *args[1:])

                handle = self.projection(layer).register_forward_pre_hook(hook)
                stack.callback(handle.remove)
            return float(self.forward(corrupted=True).mean())

    def grid(self, positions: list[int]) -> np.ndarray:
        layers, w = self.layers(), self.config.window
        out = np.zeros((self.heads, layers))
        for h in range(self.heads):
            for layer in range(layers):
                window = range(max(0, layer - w // 2), min(layers, layer - (-w // 2)))
                out[h, layer] = self.cell([(j, h, positions) for j in window])
        return out


@pytest.fixture(scope="module")
def bundles():
    return {"vqa": load_model((tiny_model(seed=1), tiny_processor()), device="cpu"),
            "caption": load_model((tiny_captioner(seed=2), tiny_processor()), device="cpu"),
            "itm": load_model((tiny_matcher(seed=3), tiny_processor()), device="cpu")}


TEXT_CASES = [(head, block, kind) for head, blocks in {"vqa": ("question_encoder", "answer_decoder"),
                                                        "caption": ("caption_decoder",), "itm": ("itm_encoder",)}.items()
              for block in blocks for kind in PROJECTION]
CASES = [*TEXT_CASES, *((head, "vision_encoder", "attn_head") for head in ("vqa", "caption", "itm"))]


def _config(head: str, block: str, kind: str, window: int, position) -> TraceConfig:
    extra = {"target": 2, "answer": "red blue circle"} if head == "caption" else {}
    if block == "answer_decoder":  # three decoder positions; log p, as p changes little in a random tiny decoder
        extra = {"answer": "red blue circle", "metric": "logprob"}
    return TraceConfig(block=block, kind=kind, window=window, position=position, samples=3, seed=2,
                       corruption=GaussianNoise(3.0), **extra)


@pytest.mark.slow  # many per-cell loops; the fast subset keeps the rest of this file
@pytest.mark.parametrize("head,block,kind", CASES)
@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("position", [None, 1, (0, 2)], ids=["every position", "one", "two"])
def test_head_cells_match_a_per_cell_loop(bundles, image, question, head, block, kind, window, position):
    bundle = bundles[head]
    text = "" if head == "caption" else ("a red circle" if head == "itm" else question)
    tracer = Tracer(bundle, image, text)
    layers = len(tracer.blocks[block].stack)
    config = _config(head, block, kind, min(window, layers), position)
    result = tracer.trace(config)
    loop = HeadLoop(tracer, config)
    positions = result.config["restored_positions"]
    assert positions == (list(range(len(positions))) if position is None else [position] if position == 1
                         else list(position))
    assert result.tokens == [f"h{h}" for h in range(loop.heads)]
    expected = loop.grid(positions)
    assert_close(result.scores, expected)
    assert result.low_score == within_rounding(float(loop.forward(corrupted=True).mean()))
    assert np.abs(expected - result.low_score).max() > 1e-4  # the cells do something: the check could fail


@pytest.mark.parametrize("head,block,kind", lengthy_except(CASES, ("vqa", "answer_decoder", "cross_attn_head")))
def test_every_head_at_a_layer_is_the_sublayer(bundles, image, question, head, block, kind):
    """Restoring every head at every position of a layer restores the sublayer's output there."""
    from dataclasses import replace

    text = "" if head == "caption" else ("a red circle" if head == "itm" else question)
    tracer = Tracer(bundles[head], image, text)
    config = _config(head, block, kind, 1, None)
    sublayer = replace(config, kind=HEAD_SUBLAYER[kind])
    heads = len(tracer.trace(config).tokens)
    positions = int(tracer.runs(tracer.blocks[block], config, tracer.target(config))[0].inputs[0].shape[1])
    layers = len(tracer.blocks[block].stack)
    every_head = [tuple((layer, h * positions + p) for h in range(heads) for p in range(positions))
                  for layer in range(layers)]
    every_position = [tuple((layer, p) for p in range(positions)) for layer in range(layers)]
    by_heads, _ = tracer.restore(every_head, config)
    by_sublayer, _ = tracer.restore(every_position, sublayer)
    assert_close(by_heads, by_sublayer)
    low = tracer.trace(config).low_score
    assert np.abs(by_sublayer - low).max() > 1e-4


@lengthy
def test_estimates_of_heads_tend_to_exact(bundles, image, question):
    tracer = Tracer(bundles["vqa"], image, question)
    config = _config("vqa", "question_encoder", "cross_attn_head", 1, None)
    exact = tracer.trace(config)
    errors = [np.abs(tracer.trace(config, method="estimate", steps=k).scores - exact.scores).mean() for k in (1, 32)]
    assert errors[0] > 1e-6 and errors[1] < 0.5 * errors[0], errors  # 0.34x under transformers 4.40's random init


@pytest.mark.parametrize("fields, message", [
    ({"kind": "cross_attn_head", "sever": "mlp"}, "use it with kind='hidden'"),
    ({"kind": "mlp", "position": 1}, "use it with a head kind"),
    ({"kind": "cross_attn_head", "position": "verb"}, "role"),
    ({"kind": "cross_attn_head", "position": []}, "non-empty"),
    ({"kind": "attn_head", "block": "vision_encoder", "regions": 2}, "rows are heads"),
    ({"kind": "attn_head"}, "has no 'attn_head'"),
])
def test_head_settings_are_checked(fields, message):
    with pytest.raises(BlipTraceError, match=message):
        TraceConfig(**fields)


def test_a_position_outside_the_block_is_a_clear_error(bundles, image, question):
    tracer = Tracer(bundles["vqa"], image, question)
    with pytest.raises(BlipTraceError, match="position 40 is outside"):
        tracer.trace(kind="cross_attn_head", position=40, samples=2)


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_the_explorer_traces_heads_at_the_positions_typed(demo_bundle, demo_sample):
    from blip_trace_widgets.widgets import TraceExplorer, controls_config

    config = controls_config(block="question_encoder", kind="cross_attn_head", window=1, corruption="gaussian",
                             level=10.0, samples=2, seed=0, position="object")
    assert config.position == "object"
    assert controls_config(block="question_encoder", kind="mlp", window=1, corruption="gaussian", level=10.0,
                           samples=2, seed=0, position="object").position is None  # read only for head kinds
    image, question, _ = demo_sample
    explorer = TraceExplorer(demo_bundle, image, question, background=False)
    assert explorer.position.layout.display == "none"
    explorer.kind.value = "cross_attn_head"
    assert explorer.position.layout.display is None
    assert explorer.result is not None and explorer.result.tokens[0] == "h0"
    explorer.position.value = "1,2"
    assert explorer.result.config["restored_positions"] == [1, 2]
    explorer.position.value = "verb"
    assert "role" in explorer.error.value  # shown inside the widget


@lengthy
def test_cli_traces_heads_at_a_role(tmp_path, capsys, demo_sample):
    from blip_trace_widgets import TraceResult
    from blip_trace_widgets.cli import main

    demo_sample.image.save(tmp_path / "image.png")
    code = main(["trace", "--model", "demo", "--image", str(tmp_path / "image.png"), "--question",
                 demo_sample.question, "--kind", "cross_attn_head", "--position", "object", "--samples", "2",
                 "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    [saved] = (tmp_path / "out").glob("*.json")
    result = TraceResult.load(saved)
    assert result.tokens[0] == "h0" and result.config["position"] == "object"
    assert len(result.config["restored_positions"]) >= 1


@lengthy
def test_head_sweeps_average_per_head_and_rank(demo_bundle, tmp_path):
    from blip_trace_widgets import sweep
    from blip_trace_widgets.causal_trace.averages import average_effect, top_heads
    from blip_trace_widgets.datasets.subsets import load_vqa_subset

    samples = load_vqa_subset("easy-vqa-color", limit=3)
    config = TraceConfig(kind="cross_attn_head", samples=2, corruption=GaussianNoise(demo_bundle.noise_scale))
    table = sweep(demo_bundle, samples, configs=[config, TraceConfig(kind="mlp", samples=2)], out=tmp_path / "s")
    averaged = average_effect(table[table["kind"] == "cross_attn_head"])
    heads = demo_bundle.model.config.text_config.num_attention_heads
    assert set(averaged["role"]) == {f"h{h}" for h in range(heads)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ranked = top_heads(table, 5)
    assert len(ranked) == 5 and (ranked["kind"] == "cross_attn_head").all()
    assert {"q_value", "significant", "interval_excludes_0", "questions"} <= set(ranked)
    noise = not ranked["interval_excludes_0"].any()  # then the ranks are said to be noise
    assert noise == any("their ranks are noise" in str(w.message) for w in caught)
    assert ranked["mean"].is_monotonic_decreasing and (ranked["ci_low"] <= ranked["mean"]).all()
    with pytest.raises(ValueError, match="no head maps"):
        top_heads(table[table["kind"] == "mlp"], 3)


@lengthy
def test_patterns_are_the_models_own_attention(bundles, image, question):
    """The pattern of a head equals the attention probabilities the model's own modules compute."""
    from blip_trace_widgets.causal_trace.patterns import attention_pattern

    tracer = Tracer(bundles["vqa"], image, question)
    model = bundles["vqa"].model
    seen = {}
    layer = model.text_encoder.encoder.layer[1]
    handle = layer.crossattention.self.register_forward_hook(lambda m, i, o: seen.__setitem__("cross", o[1]))
    handle_self = layer.attention.self.register_forward_hook(lambda m, i, o: seen.__setitem__("self", o[1]))
    try:
        pixels = bundles["vqa"].processor.image_processor(tracer.image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            embeds = model.vision_model(pixel_values=pixels)[0]
            model.text_encoder(input_ids=torch.tensor([list(tracer.question_ids)]), encoder_hidden_states=embeds,
                               output_attentions=True)
    finally:
        handle.remove()
        handle_self.remove()
    assert_close(attention_pattern(tracer, "question_encoder", "cross_attn_head", 1),
                               seen["cross"][0].numpy())
    assert_close(attention_pattern(tracer, "question_encoder", "self_attn_head", 1),
                               seen["self"][0].numpy())
    vision = attention_pattern(tracer, "vision_encoder", "attn_head", 0)
    assert vision.shape[1] == vision.shape[2] and np.allclose(vision.sum(-1), 1, atol=1e-5)


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_the_explorer_paints_the_chosen_heads_pattern(demo_bundle, demo_sample):
    from blip_trace_widgets.widgets import TraceExplorer

    image, question, _ = demo_sample
    explorer = TraceExplorer(demo_bundle, image, question, background=False)
    assert explorer.pattern.layout.display == "none"
    explorer.kind.value = "cross_attn_head"
    assert explorer.pattern.layout.display is None and bytes(explorer.pattern.view.value).startswith(b"\x89PNG")
    before = bytes(explorer.pattern.view.value)
    explorer.pattern.head.value = 2
    assert bytes(explorer.pattern.view.value) != before  # another head reads other patches
    explorer.block.value = "answer_decoder"  # it cross-attends to the question, not the image
    assert explorer.pattern.layout.display == "none"


@lengthy
def test_heads_noise_in_both_directions(bundles, image, question):
    tracer = Tracer(bundles["vqa"], image, question)
    config = TraceConfig(kind="cross_attn_head", samples=2, direction="noise", corruption=GaussianNoise(3.0))
    result = tracer.trace(config)
    heads, positions = len(result.tokens), len(result.config["restored_positions"])
    everything = tuple((j, h * positions + p) for j in range(result.num_layers) for h in range(heads)
                       for p in range(positions))
    none_patched = tracer.restore([()], config)[0][0]
    assert none_patched == within_rounding(result.high_score)
    assert tracer.restore([everything], config)[0][0] != pytest.approx(result.high_score, abs=1e-4)
