"""InstructBLIP (OPT): the engine against a per-cell loop of InstructBlipForConditionalGeneration's own forward pass.

The loop spells the module paths out itself (it shares no code with the package's anatomy or engine). The Q-Former
reads the queries then the instruction: a query position's MLP is ``output_query.dense`` (run on the queries
only), an instruction position's is ``output.dense`` (run on the instruction only), and only the queries run the
cross-attention; the loop restores each cell in the module that really ran at its position.
"""
from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import pytest
import torch
from fast_subset import LENGTHY, lengthy
from tiny_blip import BLIP2_VOCAB, tiny_instructblip, tiny_instructblip_processor
from tolerance import assert_close, within_rounding

from blip_trace_widgets import BlipTraceError, GaussianNoise, TraceConfig, Tracer, load_model

pytestmark = LENGTHY  # InstructBLIP's tests: tests/test_blip2.py keeps the fast subset's BLIP-2 check

QFORMER = "qformer.encoder.layer.{l}"
LM = "language_model.model.decoder.layers.{l}"
LLAMA = "language_model.model.layers.{l}"  # a Vicuna-like (LLaMA) language model's layers
VIT = "vision_model.encoder.layers.{l}"
QUESTION = "what color is the shape?"
QUERIES = 4
SEED = 5


def _qformer_module(kind: str, position: int) -> tuple[str, int] | None:
    """(module, index in its output) that ``kind`` restores at a Q-Former position; None where nothing runs."""
    text = position >= QUERIES
    index = position - QUERIES if text else position
    if kind == "mlp":
        return (QFORMER + (".output.dense" if text else ".output_query.dense")), index
    if kind == "cross_attn":
        return None if text else (QFORMER + ".crossattention.output.dense", position)
    if kind == "post_cross_attn":  # the instruction skips cross-attention: its residual after it is h1
        return (QFORMER + ".attention", position) if text else (QFORMER + ".crossattention", position)
    suffix = {"hidden": "", "self_attn": ".attention.output.dense", "post_self_attn": ".attention"}[kind]
    return QFORMER + suffix, position


def _lm_module(kind: str, position: int) -> tuple[str, int]:
    return LM + {"hidden": "", "self_attn": ".self_attn.out_proj", "mlp": ".fc2"}[kind], position


def _llama_module(kind: str, position: int) -> tuple[str, int]:
    return LLAMA + {"hidden": "", "self_attn": ".self_attn.o_proj", "mlp": ".mlp"}[kind], position


def _vision_module(kind: str, position: int) -> tuple[str, int]:
    return VIT + {"hidden": "", "self_attn": ".self_attn", "mlp": ".mlp"}[kind], position


#: A head kind's module: the input of the attention's output projection (its context), per block.
HEAD_INPUTS = {("qformer", "self_attn_head"): QFORMER + ".attention.output.dense",
               ("qformer", "cross_attn_head"): QFORMER + ".crossattention.output.dense",
               ("language_model", "self_attn_head"): LM + ".self_attn.out_proj",
               ("llama", "self_attn_head"): LLAMA + ".self_attn.o_proj"}


def _out(o):
    return o[0] if isinstance(o, tuple) else o


class InstructLoop:
    """ROME's procedure on InstructBLIP, one forward pass of the whole model per cell, noise samples as the batch."""

    def __init__(self, bundle, image, tracer, config: TraceConfig, stage: str = "vision_model.post_layernorm"):
        self.model, self.config, self.stage = bundle.model, config, stage
        self.answer = list(tracer.target(config).tokens)
        self.ids = torch.tensor([[BLIP2_VOCAB["<image>"]] * QUERIES + list(tracer.question_ids) + self.answer[:-1]])
        self.instruction = torch.tensor([list(bundle.processor.qformer_tokenizer(QUESTION)["input_ids"])])
        self.offset = QUERIES + len(tracer.question_ids) - 1
        self.pixels = bundle.processor.image_processor(image, return_tensors="pt")["pixel_values"]
        self.llama = self.model.config.text_config.model_type == "llama"
        self.where = {"qformer": _qformer_module, "language_model": _llama_module if self.llama else _lm_module,
                      "vision_encoder": _vision_module}[config.block]
        seen = {}
        handle = self.model.get_submodule(stage).register_forward_hook(
            lambda m, i, o: seen.setdefault("x", o) if o.ndim == 3 else None)
        with torch.no_grad():
            self.clean = self._record()
        handle.remove()
        self.noisy = config.corruption(seen["x"], config.samples, torch.Generator().manual_seed(config.seed))

    def _record(self) -> dict[str, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}
        layers = ("qformer.encoder.layer.", "language_model.model.decoder.layers.", "language_model.model.layers.",
                  "vision_model.encoder.layers.")
        handles = [module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, _out(o).clone()))
                   for name, module in self.model.named_modules() if name.startswith(layers)
                   and not name.endswith(("dropout", "act_fn", "activation_fn"))]
        handles += [module.register_forward_pre_hook(lambda m, i, name=name: seen.__setitem__(name + "@in", i[0].clone()))
                    for name, module in self.model.named_modules()
                    if name.endswith(("attention.output.dense", "self_attn.out_proj", "self_attn.o_proj"))]
        try:
            self._forward(1)
        finally:
            for h in handles:
                h.remove()
        return seen

    def _forward(self, samples: int) -> torch.Tensor:
        return self.model(pixel_values=self.pixels.expand(samples, -1, -1, -1), input_ids=self.ids.expand(samples, -1),
                          qformer_input_ids=self.instruction.expand(samples, -1)).logits

    def cell(self, restore: list[tuple[int, int]]) -> float:
        samples = self.config.samples
        with ExitStack() as stack, torch.no_grad():
            self._corrupt(stack)
            for layer, position in restore:
                found = self.where(self.config.kind, position)
                if found is None:
                    continue
                name, index = found[0].format(l=layer), found[1]
                if name not in self.clean:  # a layer without cross-attention: its residual after it is h1
                    if self.config.kind != "post_cross_attn":
                        continue
                    name = name.replace(".crossattention", ".attention")

                def hook(m, i, o, clean=self.clean[name], index=index):
                    t = _out(o).clone()
                    view = t.view(samples, -1, t.shape[-1])  # OPT's fc2 runs on [B*T, D]
                    view[:, index] = clean.view(1, -1, clean.shape[-1])[0, index]
                    return (t, *o[1:]) if isinstance(o, tuple) else t

                handle = self.model.get_submodule(name).register_forward_hook(hook)
                stack.callback(handle.remove)
            logits = self._forward(samples)
        return float(torch.softmax(logits.float(), -1)[:, self.offset, self.answer[0]].mean())

    def _corrupt(self, stack: ExitStack) -> None:
        """Hooks that corrupt the input: the noisy stage output (the ViT's, or its patch embeddings) in its place."""
        handle = self.model.get_submodule(self.stage).register_forward_hook(
            lambda m, i, o: self.noisy if o.ndim == 3 else o)
        stack.callback(handle.remove)

    def grid(self, positions: int, layers: int) -> np.ndarray:
        w = self.config.window
        return np.array([[self.cell([(j, p) for j in range(max(0, layer - w // 2), min(layers, layer - (-w // 2)))])
                          for layer in range(layers)] for p in range(positions)])


@pytest.fixture(scope="module")
def bundle():
    return load_model((tiny_instructblip(seed=SEED), tiny_instructblip_processor(queries=QUERIES)), device="cpu")


@pytest.fixture(scope="module")
def tracer(bundle, image):
    return Tracer(bundle, image, QUESTION)


CASES = [("qformer", kind, window) for kind in ("hidden", "self_attn", "cross_attn", "mlp", "post_self_attn",
                                                  "post_cross_attn") for window in (1, 3)]
CASES += [("language_model", kind, 1) for kind in ("hidden", "self_attn", "mlp")]


@pytest.mark.parametrize("block,kind,window", CASES)
@lengthy
def test_every_block_kind_and_window_matches_the_models_own_forward(bundle, image, tracer, block, kind, window):
    config = TraceConfig(block=block, kind=kind, window=window, samples=3, corruption=GaussianNoise(scale=3.0),
                         corrupt="image", answer="red")
    result = tracer.trace(config)
    loop = InstructLoop(bundle, image, tracer, config)
    assert_close(result.scores, loop.grid(*result.scores.shape), ulps=1024)
    assert result.low_score == within_rounding(loop.cell([]))


def test_the_q_former_reads_the_queries_then_the_instruction(tracer):
    result = tracer.trace(TraceConfig(block="qformer", kind="cross_attn", samples=2, corrupt="image", answer="red"))
    words = ["[CLS]", "what", "color", "is", "the", "shape", "?", "[SEP]"]
    assert result.tokens == [f"q{i}" for i in range(QUERIES)] + words
    assert result.config["absent_positions"] == list(range(QUERIES, QUERIES + len(words)))
    assert result.absent_cells[QUERIES:].all() and result.absent_cells[:QUERIES, 1].all()
    assert not result.absent_cells[:QUERIES, [0, 2]].any()
    assert_close(result.scores[QUERIES:], result.low_score)  # nothing to restore there
    language = tracer.trace(TraceConfig(block="language_model", samples=2, corrupt="image", answer="red"))
    assert language.tokens[:QUERIES] == ["q0", "q1", "q2", "q3"] and language.tokens[QUERIES:] == words[:-1]


def test_the_instruction_changes_what_the_queries_carry(bundle, image):
    # the queries attend to the instruction: another question changes the Q-Former's output queries
    one, other = Tracer(bundle, image, QUESTION), Tracer(bundle, image, "is there a circle?")
    first, second = one.clean_pass.reader_output[:, :QUERIES], other.clean_pass.reader_output[:, :QUERIES]
    assert first.shape == second.shape and not torch.allclose(first, second, atol=1e-3)


@pytest.mark.parametrize("language", ["opt", "llama"])
@lengthy
def test_greedy_answer_is_generate_token_for_token(image, language):
    answered = 0
    for seed in range(3):
        model = tiny_instructblip(seed=seed, language=language)
        b = load_model((model, tiny_instructblip_processor(queries=QUERIES)), device="cpu")
        tracer = Tracer(b, image, QUESTION)
        inputs = b.processor(images=image, text=QUESTION, return_tensors="pt")
        ids = torch.tensor([[BLIP2_VOCAB["<image>"]] * QUERIES + list(tracer.question_ids)])
        out = model.generate(pixel_values=inputs["pixel_values"], input_ids=ids,
                             qformer_input_ids=inputs["qformer_input_ids"], max_new_tokens=10, do_sample=False,
                             num_beams=1)
        generated = [int(t) for t in out[0, ids.shape[1]:]]
        eos = model.config.text_config.eos_token_id
        generated = generated[:generated.index(eos)] if eos in generated else generated
        assert tracer.clean.greedy_ids == generated
        answered += bool(generated)
    assert answered  # at least one model says something, so the comparison is not of empty answers only


def test_restoring_everything_gives_the_clean_score_and_nothing_the_low(tracer):
    config = TraceConfig(block="qformer", kind="hidden", samples=3, corrupt="image", answer="red",
                         corruption=GaussianNoise(scale=10.0))
    result = tracer.trace(config)
    assert abs(result.high_score - result.low_score) > 1e-3
    everything = tuple((2, p) for p in range(len(result.tokens)))
    scores = tracer.restore_marked([everything, ()], config)
    assert float(scores.mean[0]) == within_rounding(result.high_score)
    assert float(scores.mean[1]) == within_rounding(result.low_score)


def test_noise_on_the_queries_and_the_refusals(tracer):
    result = tracer.trace(TraceConfig(block="language_model", samples=3, corrupt="queries", answer="red"))
    assert result.scores.shape == (QUERIES + len(tracer.question_ids), 3) and np.isfinite(result.scores).all()
    with pytest.raises(BlipTraceError, match="trace block='language_model'"):
        tracer.trace(TraceConfig(block="qformer", corrupt="queries"))


def test_estimates_tend_to_exact_as_the_noise_vanishes(tracer):
    errors = []  # this model's effects are small and curved: the error falls from 0.23 at 0.01σ to 0.016 at 0.001σ
    for scale in (0.01, 0.001):
        config = TraceConfig(block="qformer", kind="mlp", samples=2, corrupt="image", answer="red",
                             corruption=GaussianNoise(scale=scale))
        exact, estimate = tracer.trace(config), tracer.trace(config, method="estimate")
        errors.append(np.abs(estimate.scores - exact.scores).sum() / np.abs(exact.scores - exact.low_score).sum())
    assert errors[1] < 0.1 and errors[1] < errors[0] / 5, errors


def test_absent_instruction_positions_are_drawn_not_applicable(tracer):
    from blip_trace_widgets.causal_trace.plots import plot_trace

    ax = plot_trace(tracer.trace(TraceConfig(block="qformer", kind="cross_attn", samples=2, corrupt="image",
                                             answer="red")))
    assert [t.get_text() for t in ax.texts].count("n/a") == 1 + 8  # layer 1, and the instruction's 8 rows


def test_knockout_of_the_image_cuts_only_the_queries(bundle, image):
    from blip_trace_widgets.attention_knockout.knockout import Edges, knockout

    result = knockout(bundle, image, QUESTION, edges=[Edges()], window=1, answer="red")
    assert result.labels == ["image → Q-Former"] and np.isfinite(result.changes).all()
    assert result.changes[0, 1] == within_rounding(0.0)  # layer 1 has no cross-attention to cut


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_a_saved_instructblip_folder_loads_traces_and_explores(tmp_path, image):
    import json

    from blip_trace_widgets.cli import main
    from blip_trace_widgets.widgets import TraceExplorer

    folder = tmp_path / "tiny-instructblip"
    tiny_instructblip(seed=SEED).save_pretrained(folder)
    tiny_instructblip_processor(queries=QUERIES).save_pretrained(folder)
    loaded = load_model(str(folder))
    assert loaded.head == "instructblip" and type(loaded.processor).__name__ == "InstructBlipProcessor"
    image.save(tmp_path / "image.png")
    code = main(["trace", "--model", str(folder), "--image", str(tmp_path / "image.png"), "--question", QUESTION,
                 "--answer", "red", "--block", "qformer", "--kind", "cross_attn", "--samples", "2",
                 "--out", str(tmp_path / "out")])
    assert code in (0, None)
    saved = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert saved["config"]["head"] == "instructblip" and saved["config"]["absent_positions"][0] == QUERIES
    explorer = TraceExplorer(loaded, image, QUESTION, background=False, mode="exact")
    explorer.noise_samples.value = 2
    explorer.kind.value = "mlp"
    assert explorer.error.value == "" and explorer.result.tokens[QUERIES] == "[CLS]"


class QuestionLoop(InstructLoop):
    """The same loop with the question corrupted where the model reads it: the language model's token embeddings at
    the prompt's positions, and the Q-Former's instruction (its embeddings' output, after their LayerNorm), drawn in
    that order from one generator."""

    def __init__(self, bundle, image, tracer, config: TraceConfig):
        super().__init__(bundle, image, tracer, config)
        self.prompt = len(tracer.question_ids)
        with torch.no_grad():
            words = self.model.language_model.get_input_embeddings()(self.ids[:, QUERIES:QUERIES + self.prompt])
            seen = {}
            handle = self.model.qformer.embeddings.register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
            self._forward(1)
            handle.remove()
        generator = torch.Generator().manual_seed(config.seed)
        self.noisy_prompt = config.corruption(words, config.samples, generator)
        self.noisy_instruction = config.corruption(seen["x"][:, QUERIES:], config.samples, generator)

    def _corrupt(self, stack: ExitStack) -> None:
        def prompt(m, i, o):
            o = o.clone()
            o[:, QUERIES:QUERIES + self.prompt] = self.noisy_prompt
            return o

        def instruction(m, i, o):
            o = o.clone()
            o[:, QUERIES:] = self.noisy_instruction
            return o

        for module, hook in ((self.model.language_model.get_input_embeddings(), prompt),
                             (self.model.qformer.embeddings, instruction)):
            handle = module.register_forward_hook(hook)
            stack.callback(handle.remove)


@pytest.mark.parametrize("block,kind", [("language_model", "hidden"), ("language_model", "mlp"), ("qformer", "mlp"),
                                        ("qformer", "cross_attn")])
@lengthy
def test_a_corrupted_question_is_both_copies_and_matches_the_models_own_forward(bundle, image, tracer, block, kind):
    """corrupt='question': noise on the prompt's token embeddings and on the Q-Former's instruction, checked cell by
    cell against the model's own forward with hooks that put the same noise in both places. A Q-Former cell restores
    the Q-Former's state only: the language model still reads the corrupted prompt."""
    config = TraceConfig(block=block, kind=kind, samples=3, corrupt="question", answer="red",
                         corruption=GaussianNoise(scale=3.0))
    result = tracer.trace(config)
    loop = QuestionLoop(bundle, image, tracer, config)
    assert_close(result.scores, loop.grid(*result.scores.shape), ulps=1024)
    assert result.low_score == within_rounding(loop.cell([]))
    assert abs(result.high_score - result.low_score) > 1e-3


@lengthy
def test_a_word_swap_swaps_the_word_in_both_copies(bundle, image, tracer):
    from blip_trace_widgets import WordSwap

    swapped = Tracer(bundle, image, "what shape is the color?")  # "color" and "shape" swapped: one token each
    result = tracer.trace(TraceConfig(block="language_model", samples=1, corrupt="question", answer="red",
                                      corruption=WordSwap({"color": "shape", "shape": "color"})))
    expected = swapped.trace(TraceConfig(block="language_model", samples=1, corrupt="image", answer="red"))
    assert result.low_score == within_rounding(expected.high_score)  # the swap is the other question, clean
    with pytest.raises(BlipTraceError, match="corrupt_tokens positions are ambiguous"):
        tracer.trace(TraceConfig(block="language_model", corrupt="question", corrupt_tokens=(1,), answer="red"))
    noised = tracer.trace(TraceConfig(block="qformer", corrupt="question", direction="noise", samples=2, answer="red"))
    assert np.isfinite(noised.scores).all()


class HeadLoop(InstructLoop):
    """The loop for head kinds: a cell restores one head's slice of the attention's context (the output
    projection's input) at every position, over its window of layers."""

    def cell(self, restore: list[tuple[int, int]]) -> float:
        samples, heads = self.config.samples, 4
        with ExitStack() as stack, torch.no_grad():
            self._corrupt(stack)
            for layer, head in restore:
                block = "llama" if self.llama and self.config.block == "language_model" else self.config.block
                name = HEAD_INPUTS[(block, self.config.kind)].format(l=layer)
                if name + "@in" not in self.clean:
                    continue  # a layer without cross-attention

                def pre(m, i, clean=self.clean[name + "@in"], h=head):
                    x = i[0].clone()
                    width = x.shape[-1] // heads
                    view = x.view(samples, -1, x.shape[-1])
                    view[..., h * width:(h + 1) * width] = clean.view(1, -1, clean.shape[-1])[..., h * width:(h + 1) * width]
                    return (x, *i[1:])

                handle = self.model.get_submodule(name).register_forward_pre_hook(pre)
                stack.callback(handle.remove)
            logits = self._forward(samples)
        return float(torch.softmax(logits.float(), -1)[:, self.offset, self.answer[0]].mean())


@pytest.mark.parametrize("block,kind,window", [("qformer", "self_attn_head", 1), ("qformer", "cross_attn_head", 3),
                                               ("language_model", "self_attn_head", 1), ("language_model", "hidden", 3)])
@lengthy
def test_head_kinds_and_wider_windows_match_the_models_own_forward(bundle, image, tracer, block, kind, window):
    config = TraceConfig(block=block, kind=kind, window=window, samples=3, corruption=GaussianNoise(scale=3.0),
                         corrupt="image", answer="red")
    result = tracer.trace(config)
    loop = (HeadLoop if kind.endswith("_head") else InstructLoop)(bundle, image, tracer, config)
    assert_close(result.scores, loop.grid(*result.scores.shape), ulps=1024)


@pytest.mark.parametrize("kind", ["hidden", "self_attn", "mlp"])
@lengthy
def test_the_vision_encoder_matches_the_models_own_forward(bundle, image, tracer, kind):
    config = TraceConfig(block="vision_encoder", kind=kind, samples=2, corruption=GaussianNoise(scale=3.0),
                         corrupt="patches", answer="red")
    result = tracer.trace(config)
    loop = InstructLoop(bundle, image, tracer, config, stage="vision_model.embeddings")
    assert_close(result.scores, loop.grid(*result.scores.shape), ulps=1024)
    assert abs(result.high_score - result.low_score) > 1e-3


@pytest.fixture(scope="module")
def vicuna(image):
    """InstructBLIP with a Vicuna-like (LLaMA) language model: rotary positions, grouped keys and values."""
    bundle = load_model((tiny_instructblip(seed=1, language="llama"), tiny_instructblip_processor(queries=QUERIES)),
                        device="cpu")
    return bundle, Tracer(bundle, image, QUESTION)


@pytest.mark.parametrize("block,kind,window", [("language_model", "hidden", 1), ("language_model", "self_attn", 3),
                                               ("language_model", "mlp", 1), ("language_model", "self_attn_head", 1),
                                               ("qformer", "mlp", 1)])
@lengthy
def test_a_llama_language_model_matches_the_models_own_forward(vicuna, image, block, kind, window):
    bundle, tracer = vicuna
    config = TraceConfig(block=block, kind=kind, window=window, samples=3, corruption=GaussianNoise(scale=3.0),
                         corrupt="image")
    result = tracer.trace(config)
    loop = (HeadLoop if kind.endswith("_head") else InstructLoop)(bundle, image, tracer, config)
    assert_close(result.scores, loop.grid(*result.scores.shape), ulps=1024)
    assert abs(result.high_score - result.low_score) > 1e-3


@lengthy
def test_a_corrupted_questions_estimate_reads_the_corrupted_prompt_downstream(tracer):
    """The estimate of a Q-Former map under a corrupted question starts from the same corrupted run as the exact map
    (its language model reads the corrupted prompt), so the two agree at small noise."""
    errors = []
    for scale in (0.01, 0.001):
        config = TraceConfig(block="qformer", kind="hidden", samples=2, corrupt="question", answer="red",
                             corruption=GaussianNoise(scale=scale))
        exact, estimate = tracer.trace(config), tracer.trace(config, method="estimate")
        assert estimate.low_score == within_rounding(exact.low_score)
        errors.append(np.abs(estimate.scores - exact.scores).sum() / np.abs(exact.scores - exact.low_score).sum())
    assert errors[1] < 0.1, errors
