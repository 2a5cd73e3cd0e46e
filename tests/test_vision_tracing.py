"""Image-side tracing and question corruption against plain per-cell loops with hooks (written here)."""
from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import pytest
import torch
from fast_subset import lengthy, lengthy_except
from tiny_blip import tiny_model, tiny_processor

from blip_trace_widgets import GaussianNoise, TraceConfig, Tracer, load_model
from blip_trace_widgets.core.regions import Box, Mask, Outside, region_grid
from blip_trace_widgets.corruptions.kinds import Blur, Grey

VISION_LAYER = "vision_model.encoder.layers.{layer}"
VISION_SUFFIX = {"hidden": "", "self_attn": ".self_attn", "mlp": ".mlp"}
TEXT_LAYER = "text_encoder.encoder.layer.{layer}"


def _tensor(out):
    return out[0] if isinstance(out, tuple) else out


def _replace(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


@pytest.fixture(scope="module")
def bundle():
    return load_model((tiny_model(seed=1), tiny_processor()), device="cpu")


class Loop:
    """One model forward per cell: corrupt with a hook, restore with hooks, score the answer's first token."""

    def __init__(self, bundle, image, question, config, answer_ids):
        self.model, self.config, self.answer = bundle.model, config, answer_ids[0]
        proc = bundle.processor
        self.pixels = proc.image_processor(image, return_tensors="pt")["pixel_values"]
        self.question_ids = torch.tensor([proc.tokenizer(question)["input_ids"]])
        self.bos = self.model.config.text_config.bos_token_id
        generator = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            if config.corrupt == "pixels":
                self.input = config.corruption(self.pixels, config.samples, generator)
            elif config.corrupt == "patches":
                self.input = config.corruption(self.model.vision_model.embeddings(self.pixels), config.samples, generator)
            else:
                self.input = config.corruption(self.model.text_encoder.embeddings(input_ids=self.question_ids),
                                               config.samples, generator)
        self.clean = self._record()

    def _names(self):
        if self.config.block == "vision_encoder":
            count = len(self.model.vision_model.encoder.layers)
            return [VISION_LAYER.format(layer=j) + VISION_SUFFIX[self.config.kind] for j in range(count)]
        return [TEXT_LAYER.format(layer=j) for j in range(len(self.model.text_encoder.encoder.layer))]

    def _record(self):
        seen, handles = {}, []
        for name in self._names():
            module = self.model.get_submodule(name)
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, _tensor(o).clone())))
        try:
            with torch.no_grad():
                self._forward(corrupted=False)
        finally:
            for h in handles:
                h.remove()
        return seen

    def _forward(self, corrupted: bool):
        cfg, model = self.config, self.model
        n = cfg.samples if corrupted else 1
        with ExitStack() as stack:
            pixels = self.pixels.expand(n, -1, -1, -1)
            if corrupted and cfg.corrupt == "pixels":
                pixels = self.input
            if corrupted and cfg.corrupt == "patches":
                h = model.vision_model.embeddings.register_forward_hook(lambda m, i, o: self.input)
                stack.callback(h.remove)
            if corrupted and cfg.corrupt == "question":
                positions = list(cfg.corrupt_tokens)

                def noisy(m, i, o):
                    o = o.expand(n, -1, -1).clone()
                    o[:, positions] = self.input[:, positions]
                    return o

                h = model.text_encoder.embeddings.register_forward_hook(noisy)
                stack.callback(h.remove)
            embeds = model.vision_model(pixel_values=pixels)[0]
            ids = self.question_ids.expand(n, -1)
            question = model.text_encoder(input_ids=ids, attention_mask=torch.ones_like(ids), encoder_hidden_states=embeds,
                                          encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long))[0]
            logits = model.text_decoder(input_ids=torch.full((n, 1), self.bos), encoder_hidden_states=question,
                                        encoder_attention_mask=torch.ones_like(ids)).logits
        return float(torch.softmax(logits[:, 0].float(), -1)[:, self.answer].mean())

    def cell(self, restore):
        names = self._names()
        with ExitStack() as stack, torch.no_grad():
            for layer, positions in restore:
                clean = self.clean[names[layer]]

                def hook(m, i, o, clean=clean, positions=positions):
                    t = _tensor(o).clone()
                    t[:, positions] = clean[0, positions]
                    return _replace(o, t)

                handle = self.model.get_submodule(names[layer]).register_forward_hook(hook)
                stack.callback(handle.remove)
            return self._forward(corrupted=True)

    def grid(self, groups, layers):
        w = self.config.window
        out = np.zeros((len(groups), layers))
        for g, positions in enumerate(groups):
            for layer in range(layers):
                window = range(max(0, layer - w // 2), min(layers, layer - (-w // 2)))
                out[g, layer] = self.cell([(j, list(positions)) for j in window])
        return out


CASES = [(kind, window, regions) for kind in ("hidden", "self_attn", "mlp") for window, regions in ((1, 4), (2, 2))]


@pytest.mark.parametrize("kind,window,regions", lengthy_except(CASES, ("hidden", 2, 2)))
def test_vision_engine_matches_per_cell_loop(bundle, image, question, kind, window, regions):
    config = TraceConfig(block="vision_encoder", kind=kind, window=window, regions=regions, samples=3, seed=4,
                         corruption=GaussianNoise(scale=3.0))
    assert config.corrupt == "patches"
    result = Tracer(bundle, image, question, max_batch_rows=5).trace(config)
    side = result.config["grid"]["patches_per_side"]
    groups = [g.tokens for g in region_grid(side, regions)]
    assert len(groups[1]) == (side // regions) ** 2 and result.tokens[0] == "[CLS]"
    loop = Loop(bundle, image, question, config, result.config["answer_ids"])
    expected = loop.grid(groups, result.num_layers)
    assert np.ptp(expected) > 1e-4, "the reference heatmap is flat: the test could not tell engines apart"
    np.testing.assert_allclose(result.scores, expected, atol=2e-5, rtol=1e-4)
    assert result.low_score == pytest.approx(loop.cell([]), abs=1e-5)


@pytest.mark.parametrize("corruption", [Grey(region=Box(0.0, 0.0, 0.5, 1.0)),
                                        Blur(sigma=2.0, region=Outside(Box(0.25, 0.25, 0.75, 0.75)))])
@lengthy
def test_pixel_corruptions_match_loop(bundle, image, question, corruption):
    config = TraceConfig(block="vision_encoder", kind="hidden", regions=2, samples=1, corruption=corruption)
    assert config.corrupt == "pixels"
    result = Tracer(bundle, image, question).trace(config)
    loop = Loop(bundle, image, question, config, result.config["answer_ids"])
    groups = [g.tokens for g in region_grid(result.config["grid"]["patches_per_side"], 2)]
    np.testing.assert_allclose(result.scores, loop.grid(groups, result.num_layers), atol=2e-5, rtol=1e-4)


@lengthy
def test_question_corruption_matches_loop(bundle, image, question):
    config = TraceConfig(kind="hidden", corrupt="question", corrupt_tokens=(2, 3), samples=3,
                         corruption=GaussianNoise(scale=3.0))
    result = Tracer(bundle, image, question).trace(config)
    assert result.config["corrupted_positions"] == [2, 3]
    loop = Loop(bundle, image, question, config, result.config["answer_ids"])
    groups = [[p] for p in range(len(result.tokens))]
    expected = loop.grid(groups, result.num_layers)
    assert np.ptp(expected) > 1e-4
    np.testing.assert_allclose(result.scores, expected, atol=2e-5, rtol=1e-4)


def test_object_word_is_corrupted_by_name(bundle, image):
    tracer = Tracer(bundle, image, "what color is the circle?")
    config = TraceConfig(corrupt="question", corrupt_tokens="object", samples=2)
    tokens = tracer.bundle.tokenizer.convert_ids_to_tokens(tracer.question_ids)
    assert tokens[tracer.corrupt_positions(config)[0]] == "circle"


def test_restoring_every_patch_at_the_last_layer_gives_the_clean_score(bundle, image, question):
    tracer = Tracer(bundle, image, question)
    config = TraceConfig(block="vision_encoder", samples=2, corruption=GaussianNoise(5.0))
    low, high = tracer.baselines(config)
    layers = tracer.blocks["vision_encoder"].stack.__len__()
    tokens = tracer.clean.image_embeds.shape[1]
    [everything], _ = tracer.restore([tuple((layers - 1, p) for p in range(tokens))], config)
    assert abs(high - low) > 1e-3
    assert everything == pytest.approx(high, rel=1e-5)
    [nothing], _ = tracer.restore([()], config)
    assert nothing == pytest.approx(low, rel=1e-6)


def test_region_corruption_touches_only_its_patches(bundle, image, question):
    tracer = Tracer(bundle, image, question)
    config = TraceConfig(block="vision_encoder", samples=2, corruption=GaussianNoise(5.0, region=Box(0.0, 0.0, 0.25, 0.25)))
    corrupted = tracer.corrupted(config).vision.inputs[0]
    clean = tracer.clean_vision.inputs[0]
    changed = (corrupted - clean).abs().amax(dim=(0, 2)) > 0
    assert changed.nonzero().flatten().tolist() == [1]  # the top-left patch of 4x4, not CLS


def test_result_carries_region_boxes_and_round_trips(bundle, image, question, tmp_path):
    from blip_trace_widgets import TraceResult

    result = Tracer(bundle, image, question).trace(block="vision_encoder", regions=2, samples=2)
    assert result.tokens == ["[CLS]", "r0c0", "r0c1", "r1c0", "r1c1"]
    assert result.config["grid"]["boxes"][4] == [0.5, 0.5, 1.0, 1.0]
    again = TraceResult.load(result.save(tmp_path / "v.json"))
    assert again == result and again.config["grid"]["boxes"][1] == [0.0, 0.0, 0.5, 0.5]
    frame = result.to_dataframe()
    assert set(frame["token"]) == set(result.tokens)
    last = frame[frame["token"] == "r1c1"].iloc[0]
    assert (last["left"], last["top"], last["right"], last["bottom"]) == (0.5, 0.5, 1.0, 1.0)
    assert frame[frame["token"] == "[CLS]"]["left"].isna().all()


@pytest.mark.parametrize("kwargs,message", [
    (dict(block="vision_encoder", kind="cross_attn"), "no 'cross_attn'"),
    (dict(block="vision_encoder", corrupt="image"), "corrupt='patches'"),
    (dict(block="vision_encoder", corrupt="question"), "corrupt='patches'"),
    (dict(regions=3), "block='vision_encoder'"),
    (dict(block="vision_encoder", regions=0), "regions must be"),
    (dict(corruption=Blur(), corrupt="image"), "Blur works on pixels"),
    (dict(corrupt_tokens=(1,)), "corrupt='question'"),
    (dict(corrupt="question", corrupt_tokens="subject"), "'object'"),
    (dict(corrupt="teeth"), "unknown corrupt"),
])
def test_bad_configurations_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TraceConfig(**kwargs)


def test_region_arguments_are_checked():
    with pytest.raises(ValueError, match="left < right"):
        Box(0.5, 0.0, 0.2, 1.0)
    with pytest.raises(ValueError, match="covers no pixel"):
        Mask(np.zeros((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="between 1 and 4"):
        region_grid(4, 5)


def test_mask_regions_follow_the_pixels():
    mask = np.zeros((32, 32), dtype=bool)
    mask[20:24, 2:5] = True  # inside patch row 2, col 0 of a 4x4 grid
    assert Mask(mask).token_mask(17).nonzero().flatten().tolist() == [1 + 2 * 4 + 0]
    assert Outside(Mask(mask)).token_mask(17).sum() == 15


@lengthy
def test_an_image_side_trace_runs_the_vision_encoder_once(bundle, image, question):
    tracer = Tracer(bundle, image, question)
    result = tracer.trace(block="vision_encoder", regions=2, samples=2)
    # one clean pass (recorded, and reused by the clean text pass) and one corrupted pass
    assert tracer.stats["vision_passes"] == 2
    reference = Tracer(bundle, image, question)
    assert tracer.model_answer == reference.model_answer
    # the clean image embeddings do not depend on which trace ran first: one path, bit for bit
    assert torch.equal(tracer.clean.image_embeds, reference.clean.image_embeds)
    assert result.high_score == pytest.approx(reference.baselines(TraceConfig(block="vision_encoder", samples=2))[1],
                                              rel=1e-5)
