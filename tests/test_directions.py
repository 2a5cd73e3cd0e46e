"""direction="noise": each sample's corrupted states patched into the clean run, against a per-cell loop
of the model's own forward pass with hooks written here (module paths spelled out), on tiny BLIP models."""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import replace

import numpy as np
import pytest
import torch
from fast_subset import lengthy
from tiny_blip import tiny_captioner, tiny_matcher, tiny_model, tiny_processor
from tolerance import assert_close, within_rounding

from blip_trace_widgets import BlipTraceError, GaussianNoise, TraceConfig, Tracer, load_model

LAYERS = {"question_encoder": "text_encoder.encoder.layer", "answer_decoder": "text_decoder.bert.encoder.layer",
          "caption_decoder": "text_decoder.bert.encoder.layer", "itm_encoder": "text_encoder.encoder.layer",
          "vision_encoder": "vision_model.encoder.layers"}
TEXT = {"hidden": "", "self_attn": ".attention.output.dense", "cross_attn": ".crossattention.output.dense",
        "mlp": ".output.dense", "post_cross_attn": ".crossattention"}
VISION = {"hidden": "", "self_attn": ".self_attn", "mlp": ".mlp"}


def _tensor(out):
    return out[0] if isinstance(out, tuple) else out


def _replace(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


class NoiseLoop:
    """The clean input (S copies), with one cell's modules set to each sample's corrupted output."""

    def __init__(self, tracer: Tracer, config: TraceConfig):
        self.tracer, self.config, self.model = tracer, config, tracer.model
        self.target = tracer.target(config)
        self.question = torch.tensor([list(tracer.question_ids)])
        self.pixels = tracer.bundle.processor.image_processor(tracer.image, return_tensors="pt")["pixel_values"]
        self.vision = config.block == "vision_encoder"
        self.corrupted_input = tracer.corrupted_patches(config) if self.vision else tracer.corrupted(config).image_embeds
        self.samples = self.corrupted_input.shape[0]
        self.corrupted = self._record()

    def path(self, layer: int) -> str:
        suffix = (VISION if self.vision else TEXT)[self.config.kind]
        return f"{LAYERS[self.config.block]}.{layer}{suffix}"

    def layers(self) -> int:
        return len(self.model.get_submodule(LAYERS[self.config.block]))

    def _record(self) -> dict[int, torch.Tensor]:
        seen, handles = {}, []
        for layer in range(self.layers()):
            module = self.model.get_submodule(self.path(layer))
            handles.append(module.register_forward_hook(
                lambda m, i, o, layer=layer: seen.__setitem__(layer, _tensor(o).clone())))
        try:
            with torch.no_grad():
                self.forward(corrupted=True)
        finally:
            for handle in handles:
                handle.remove()
        return seen

    def forward(self, corrupted: bool) -> torch.Tensor:
        model, n = self.model, self.samples
        with ExitStack() as stack:
            if self.vision:
                if corrupted:
                    handle = model.vision_model.embeddings.register_forward_hook(lambda m, i, o: self.corrupted_input)
                    stack.callback(handle.remove)
                embeds = model.vision_model(pixel_values=self.pixels.expand(n, -1, -1, -1))[0]
            else:
                embeds = self.corrupted_input if corrupted else model.vision_model(
                    pixel_values=self.pixels)[0].expand(n, -1, -1)
            return self._score(embeds)

    def _score(self, embeds: torch.Tensor) -> torch.Tensor:
        model, target, n, head = self.model, self.target, embeds.shape[0], self.tracer.head
        if head == "itm":
            states = model.text_encoder(input_ids=self.question.expand(n, -1), encoder_hidden_states=embeds)[0]
            return torch.softmax(model.itm_head(states[:, 0]), -1)[:, 1]
        states = (model.text_encoder(input_ids=self.question.expand(n, -1), encoder_hidden_states=embeds)[0]
                  if head == "vqa" else embeds)
        inputs = torch.tensor([list(target.inputs)]).expand(n, -1)
        logprobs = torch.log_softmax(model.text_decoder(input_ids=inputs, encoder_hidden_states=states).logits.double(), -1)
        total = sum(logprobs[:, target.offset + k, t] for k, t in enumerate(target.tokens))
        return total if self.config.metric == "logprob" else total.exp()

    def cell(self, cells: list[tuple[int, int]]) -> float:
        with ExitStack() as stack, torch.no_grad():
            for layer, pos in cells:
                held = self.corrupted[layer]

                def hook(m, i, o, held=held, pos=pos):
                    t = _tensor(o).clone()
                    t[:, pos] = held[:, pos]
                    return _replace(o, t)

                handle = self.model.get_submodule(self.path(layer)).register_forward_hook(hook)
                stack.callback(handle.remove)
            return float(self.forward(corrupted=False).mean())


@pytest.fixture(scope="module")
def bundles():
    return {"vqa": load_model((tiny_model(seed=1), tiny_processor()), device="cpu"),
            "caption": load_model((tiny_captioner(seed=2), tiny_processor()), device="cpu"),
            "itm": load_model((tiny_matcher(seed=3), tiny_processor()), device="cpu")}


CASES = [("vqa", "question_encoder", kind) for kind in TEXT] + [("vqa", "answer_decoder", kind) for kind in TEXT] + [
    ("caption", "caption_decoder", "hidden"), ("caption", "caption_decoder", "cross_attn"), ("itm", "itm_encoder", "mlp"),
    ("vqa", "vision_encoder", "hidden"), ("vqa", "vision_encoder", "mlp"), ("itm", "vision_encoder", "self_attn")]


def _tracer(bundles, image, question, head):
    return Tracer(bundles[head], image, "" if head == "caption" else ("a red circle" if head == "itm" else question))


def _config(head, block, kind, window):
    extra = {"target": 1, "answer": "red blue circle"} if head == "caption" else {}
    if block == "answer_decoder":  # log p: p changes little in a random tiny decoder
        extra = {"answer": "red blue", "metric": "logprob"}
    return TraceConfig(block=block, kind=kind, window=window, samples=3, seed=3, direction="noise",
                       corruption=GaussianNoise(3.0), **extra)


@pytest.mark.slow  # many per-cell loops; the fast subset keeps the rest of this file
@pytest.mark.parametrize("head,block,kind", CASES)
@pytest.mark.parametrize("window", [1, 2])
def test_noising_matches_a_per_cell_loop(bundles, image, question, head, block, kind, window):
    tracer = _tracer(bundles, image, question, head)
    config = _config(head, block, kind, window)
    result = tracer.trace(config)
    loop = NoiseLoop(tracer, config)
    layers, positions = loop.layers(), result.scores.shape[0]
    expected = np.array([[loop.cell([(j, p) for j in range(max(0, layer - window // 2),
                                                           min(layers, layer - (-window // 2)))])
                          for layer in range(layers)] for p in range(positions)])
    assert_close(result.scores, expected)
    assert result.high_score == within_rounding(float(loop.forward(corrupted=False).mean()))
    assert np.abs(expected - result.high_score).max() > 1e-4  # the cells do something: the check could fail


@pytest.mark.parametrize("head,block", sorted({(head, block) for head, block, _ in CASES}))
@lengthy
def test_noising_every_cell_gives_the_corrupted_score_and_none_the_clean(bundles, image, question, head, block):
    """Every hidden state patched: the corrupted run itself (a sublayer's outputs alone are not the whole state)."""
    kind = "hidden"
    tracer = _tracer(bundles, image, question, head)
    config = _config(head, block, kind, 1)
    result = tracer.trace(config)
    layers = result.num_layers
    units = int(tracer.runs(tracer.blocks[block], config, tracer.target(config))[0].kinds[kind][0].shape[1])
    everything = tuple((j, p) for j in range(layers) for p in range(units))
    mean, _ = tracer.restore([everything, ()], config)
    assert mean[0] == within_rounding(result.low_score)
    assert mean[1] == within_rounding(result.high_score)
    assert result.config["direction"] == "noise"


@pytest.mark.parametrize("fields, message", [
    ({"direction": "sideways"}, "unknown direction"),
    ({"direction": "noise", "fresh_noise": True, "method": "estimate"}, "fresh"),
])
def test_direction_settings_are_checked(fields, message):
    with pytest.raises(BlipTraceError, match=message):
        TraceConfig(**fields)


class SeverNoiseLoop(NoiseLoop):
    """ROME's severing in the noising direction: a hidden state patched with each sample's corrupted value while the
    severed sublayer is held at its clean output (at the patched positions, or at every position) in every layer."""

    def __init__(self, tracer: Tracer, config: TraceConfig):
        super().__init__(tracer, config)
        self.held = self._record_sever()

    def sever_path(self, layer: int) -> str:
        return f"{LAYERS[self.config.block]}.{layer}{TEXT[self.config.sever]}"

    def _record_sever(self) -> dict[int, torch.Tensor]:
        seen, handles = {}, []
        for layer in range(self.layers()):
            handles.append(self.model.get_submodule(self.sever_path(layer)).register_forward_hook(
                lambda m, i, o, layer=layer: seen.__setitem__(layer, _tensor(o).clone())))
        try:
            with torch.no_grad():
                self.forward(corrupted=False)
        finally:
            for handle in handles:
                handle.remove()
        return seen

    def cell(self, cells: list[tuple[int, int]]) -> float:
        positions = sorted({pos for _, pos in cells})
        with ExitStack() as stack:
            for layer in range(self.layers()):
                def hold(m, i, o, layer=layer):
                    t = _tensor(o).clone()
                    at = slice(None) if self.config.sever_at == "all" else positions
                    t[:, at] = self.held[layer][:, at]
                    return _replace(o, t)

                handle = self.model.get_submodule(self.sever_path(layer)).register_forward_hook(hold)
                stack.callback(handle.remove)
            return super().cell(cells)


@pytest.mark.parametrize("sever,sever_at", [("mlp", "restored"), ("self_attn", "restored"), ("mlp", "all")])
@lengthy
def test_noising_with_severing_matches_a_per_cell_loop(bundles, image, question, sever, sever_at):
    tracer = _tracer(bundles, image, question, "vqa")
    config = replace(_config("vqa", "question_encoder", "hidden", 1), sever=sever, sever_at=sever_at)
    result = tracer.trace(config)
    loop = SeverNoiseLoop(tracer, config)
    expected = np.array([[loop.cell([(layer, p)]) for layer in range(loop.layers())]
                         for p in range(result.scores.shape[0])])
    assert_close(result.scores, expected)
    plain = tracer.trace(replace(config, sever=None))
    assert np.abs(plain.scores - result.scores).max() > 1e-4  # severing changes the map: the check could fail


@lengthy
def test_noising_figures_say_so_and_start_white_at_clean(bundles, image, question, tmp_path, capsys):
    from blip_trace_widgets import sweep
    from blip_trace_widgets.causal_trace.plots import plot_trace, trace_title
    from blip_trace_widgets.cli import main

    tracer = _tracer(bundles, image, question, "vqa")
    result = tracer.trace(_config("vqa", "question_encoder", "hidden", 1))
    assert trace_title(result, width=300).startswith("Noising: corrupted question encoder hidden states patched")
    assert result.direction == "noise"
    np.testing.assert_allclose(result.indirect_effect(), result.high_score - result.scores)
    ax = plot_trace(result, tiny=None)
    mesh = ax.collections[0]
    assert mesh.to_rgba([result.high_score])[0][:3].min() > 0.9  # white where nothing was taken away
    if abs(result.total_effect) > result.floor:  # full colour at the corrupted score (a span under the floor is widened)
        assert mesh.to_rgba([result.low_score])[0][:3].min() < 0.6
    table = sweep(bundles["vqa"], [(image, question, "red")], configs=[_config("vqa", "question_encoder", "hidden", 1)],
                  out=tmp_path / "s", progress=False)  # sweeps record noising, and average what each cell takes away
    assert list(table.direction) == ["noise"] and np.allclose(list(map(list, table.scores[0])), result.scores)
    image.save(tmp_path / "image.png")
    code = main(["trace", "--model", "demo", "--image", str(tmp_path / "image.png"), "--question", question,
                 "--direction", "noise", "--samples", "2", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err


# ----- symmetric token replacement ------------------------------------------------------------------------------

class SwapLoop:
    """The model's own forward pass on the counterfactual question's tokens, one cell at a time restored to the
    clean question's run, with hooks on the question encoder's modules (either direction)."""

    def __init__(self, bundle, image, question, other, config):
        self.model, self.config = bundle.model, config
        tok = bundle.processor.tokenizer
        self.ids = torch.tensor([tok(question)["input_ids"]])
        self.other = torch.tensor([tok(other)["input_ids"]])
        pixels = bundle.processor.image_processor(image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            self.embeds = self.model.vision_model(pixel_values=pixels)[0]
        self.answer = Tracer(bundle, image, question).target(config).tokens[0]
        self.clean, self.corrupted = self._record(self.ids), self._record(self.other)

    def path(self, layer):
        return f"{LAYERS[self.config.block]}.{layer}{TEXT[self.config.kind]}"

    def _record(self, ids):
        seen, handles = {}, []
        for layer in range(len(self.model.get_submodule(LAYERS[self.config.block]))):
            handles.append(self.model.get_submodule(self.path(layer)).register_forward_hook(
                lambda m, i, o, layer=layer: seen.__setitem__(layer, _tensor(o).clone())))
        try:
            with torch.no_grad():
                self._forward(ids)
        finally:
            for handle in handles:
                handle.remove()
        return seen

    def _forward(self, ids):
        states = self.model.text_encoder(input_ids=ids, encoder_hidden_states=self.embeds)[0]
        bos = self.model.config.text_config.bos_token_id
        logits = self.model.text_decoder(input_ids=torch.tensor([[bos]]), encoder_hidden_states=states).logits
        return float(torch.softmax(logits[0, 0].double(), -1)[self.answer])

    def cell(self, cells, noise: bool):
        source, base = (self.corrupted, self.ids) if noise else (self.clean, self.other)
        with ExitStack() as stack, torch.no_grad():
            for layer, pos in cells:
                def hook(m, i, o, held=source[layer], pos=pos):
                    t = _tensor(o).clone()
                    t[:, pos] = held[:, pos]
                    return _replace(o, t)

                handle = self.model.get_submodule(self.path(layer)).register_forward_hook(hook)
                stack.callback(handle.remove)
            return self._forward(base)


@pytest.mark.slow  # many per-cell loops; the fast subset keeps the rest of this file
@pytest.mark.parametrize("kind", list(TEXT))
@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_a_word_swap_matches_a_per_cell_loop(bundles, image, kind, window, direction):
    from blip_trace_widgets import WordSwap

    question = "what color is the circle?"
    config = TraceConfig(kind=kind, window=window, samples=1, corruption=WordSwap({"circle": "shape"}),
                         direction=direction)  # a word of the tiny vocabulary: one it lacks is refused
    tracer = Tracer(bundles["vqa"], image, question)
    result = tracer.trace(config)
    assert result.config["corrupt"] == "question" and result.config["corrupted_positions"] == [5]
    loop = SwapLoop(bundles["vqa"], image, question, "what color is the shape?", config)
    layers = result.num_layers
    expected = np.array([[loop.cell([(j, p) for j in range(max(0, layer - window // 2),
                                                          min(layers, layer - (-window // 2)))], direction == "noise")
                          for layer in range(layers)] for p in range(result.scores.shape[0])])
    assert_close(result.scores, expected)
    assert result.low_score == within_rounding(loop._forward(loop.other))
    assert np.abs(expected - expected.mean()).max() > 1e-6  # the cells differ: the check could fail


class TextSwapLoop(SwapLoop):
    """A captioner's prompt or a matcher's text with words swapped: the model's own decoder (or ITM encoder and
    head) on the counterfactual tokens, one cell at a time restored to the clean text's run (or the reverse)."""

    def __init__(self, tracer: Tracer, other: list[int], config: TraceConfig):
        self.model, self.config, self.head = tracer.model, config, tracer.head
        self.target = tracer.target(config)
        clean = list(self.target.inputs) if self.head == "caption" else list(tracer.question_ids)
        self.ids = torch.tensor([clean])
        self.other = torch.tensor([list(other) + clean[len(other):]])
        pixels = tracer.bundle.processor.image_processor(tracer.image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            self.embeds = self.model.vision_model(pixel_values=pixels)[0]
        self.clean, self.corrupted = self._record(self.ids), self._record(self.other)

    def _forward(self, ids):
        if self.head == "itm":
            states = self.model.text_encoder(input_ids=ids, encoder_hidden_states=self.embeds)[0]
            return float(torch.softmax(self.model.itm_head(states[:, 0]).double(), -1)[0, 1])
        logits = self.model.text_decoder(input_ids=ids, encoder_hidden_states=self.embeds).logits.double()
        return float(torch.softmax(logits[0, self.target.offset], -1)[self.target.tokens[0]])


@pytest.mark.parametrize("head, text, swap", [("caption", "a red", {"red": "blue"}),
                                              ("itm", "a red circle", {"red": "green"})])
@pytest.mark.parametrize("kind, window", [("hidden", 1), ("mlp", 2), ("cross_attn", 1)])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
@lengthy
def test_a_word_swap_of_a_prompt_or_a_matched_text_matches_a_per_cell_loop(bundles, image, head, text, swap, kind,
                                                                           window, direction):
    from blip_trace_widgets import WordSwap

    tracer = Tracer(bundles[head], image, text)
    extra = {"answer": "red blue circle", "target": 1} if head == "caption" else {}
    config = TraceConfig(block="caption_decoder" if head == "caption" else "itm_encoder", kind=kind, window=window,
                         samples=1, corruption=WordSwap(swap), direction=direction, **extra)
    result = tracer.trace(config)
    assert result.config["corrupt"] == "question" and result.config["corrupted_positions"] == [2]
    other = tracer.corrupted_runs.bound_swap(config.corruption).ids
    loop = TextSwapLoop(tracer, other, config)
    layers = result.num_layers
    expected = np.array([[loop.cell([(j, p) for j in range(max(0, layer - window // 2),
                                                          min(layers, layer - (-window // 2)))], direction == "noise")
                          for layer in range(layers)] for p in range(result.scores.shape[0])])
    assert_close(result.scores, expected)
    assert result.low_score == within_rounding(loop._forward(loop.other))
    assert result.high_score == within_rounding(loop._forward(loop.ids))
    assert np.abs(expected - expected.mean()).max() > 1e-6  # the cells differ: the check could fail


@pytest.mark.parametrize("swap, message", [
    ({"circle": "big triangle"}, "a swap must keep the length"),
    ({"square": "triangle"}, "swap word 'square' is not in the question"),
    ({"circle": "circle"}, "to other words"),
])
def test_bad_word_swaps_are_clear_errors(bundles, image, swap, message):
    from blip_trace_widgets import WordSwap

    with pytest.raises(BlipTraceError, match=message):
        Tracer(bundles["vqa"], image, "what color is the circle?").trace(corruption=WordSwap(swap), samples=1)


@pytest.mark.parametrize("block,kind", [("question_encoder", "hidden"), ("question_encoder", "mlp"),
                                        ("answer_decoder", "hidden"), ("question_encoder", "cross_attn_head")])
@lengthy
def test_a_noising_estimate_is_first_order_at_the_clean_run(demo_bundle, demo_sample, block, kind):
    """Noising's attribution patching: the clean run's gradient times (corrupted - clean), per sample. Under weak
    noise it is the exact noising map to first order; under strong noise it need not be (reported, not hidden)."""
    image, question, _ = demo_sample
    tracer = Tracer(demo_bundle, image, question)
    weak = dict(block=block, kind=kind, direction="noise", samples=3, corruption=GaussianNoise(0.3), window=1)
    exact, estimate = tracer.trace(**weak), tracer.trace(method="estimate", **weak)
    effect = np.abs(exact.scores - exact.high_score).max()
    assert effect > 5e-4  # the noise does something: the comparison could fail
    assert np.abs(exact.scores - estimate.scores).max() < 0.25 * effect
    assert estimate.high_score == exact.high_score and estimate.low_score == pytest.approx(exact.low_score)
    assert estimate.is_estimate and estimate.direction == "noise"
    verified = tracer.trace(method="verified", verify=3, **weak)
    assert int(verified.exact_cells.sum()) == 3


@lengthy
def test_the_papers_fresh_noise_noises_each_cell_with_its_own_draw(bundles, image, question):
    """The paper's procedure in the noising direction: cell i patches the (i+1)-th draw of the seed (after the low
    score's) into the clean run; checked against NoiseLoop run on that draw."""
    from blip_trace_widgets import procedure_config

    tracer = _tracer(bundles, image, question, "vqa")
    config = procedure_config("paper", direction="noise", kind="mlp", window=1, block="question_encoder")
    result = tracer.trace(config)
    cells = tracer.blocks["question_encoder"].layout(tracer.clean_pass, config, tracer.target(config)).cells
    generator = torch.Generator().manual_seed(int(config.seed))
    tracer.corrupted_runs.skip_draw(config, generator)
    loop = NoiseLoop(tracer, config)
    for index, cell in enumerate(cells[:6]):
        loop.corrupted_input = tracer.corrupted_runs.draw(config, generator).image_embeds
        loop.corrupted = loop._record()
        assert result.scores.ravel()[index] == within_rounding(loop.cell(list(cell)))
    assert result.direction == "noise" and np.abs(result.scores - result.high_score).max() > 1e-4


def test_a_swap_of_two_words_exchanges_them():
    """Every swap reads the question as given: exchanging two words does not let the second swap undo the first."""
    from blip_trace_widgets import WordSwap

    assert WordSwap({"color": "shape", "shape": "color"}).counterfactual("what color is the shape?") == \
        "what shape is the color?"
    assert WordSwap({"red": "blue"}).counterfactual("is it red? red.") == "is it blue? blue."
