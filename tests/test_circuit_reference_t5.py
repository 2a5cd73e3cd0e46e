"""The BLIP-2 / InstructBLIP (Flan-T5) circuit reference (tests/circuit_reference_t5.py) on tiny random float64 models,
and the package's circuits engine against it.

Part A checks the reference alone: the graph against an enumeration of the definition and against the computation (a
perturbed node moves exactly the channels it sends to), identities of path patching and circuit runs, edges that must
score exactly 0, and single edges worked out by hand on the model's modules. Part B compares the engine's public API
(``circuit_graph``, ``path_patch``, ``edge_scores``, ``faithfulness``, ``circuit_inputs``) with the reference: the edge
set, exact edge scores in both directions under noise and a counterfactual image, a path from several senders to
several receivers, circuits keeping none, all and 30% of the edges, two noise draws averaged, a tied head (the final
state scaled before ``lm_head``) and a T5 of another shape (3 encoder layers, 1 decoder layer, heads narrower than
d_model, a plain ReLU feed-forward). Part B skips while ``circuit_graph`` refuses T5 models (a BlipTraceError); every
other engine call must then work.

The models are float64: T5 amplifies float32 rounding (tests/test_blip2_t5.py).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from circuit_reference_t5 import (
    Plan,
    check_edge,
    frozen_inputs,
    parse_edge,
    prepare_inputs,
    reference_channels,
    reference_circuit_score,
    reference_edge_score,
    reference_edges,
    reference_faithfulness,
    reference_nodes,
    reference_path_patch,
    reference_score,
    reference_senders,
    run,
    t5_inputs,
)
from fast_subset import LENGTHY, lengthy_except
from PIL import Image
from tiny_blip import BLIP2_VOCAB, VOCAB, tiny_blip2_processor, tiny_blip2_t5, tiny_instructblip_processor
from tolerance import assert_close, close

from blip_trace_widgets.core.errors import BlipTraceError

QUERIES, QF_LAYERS, HEADS, ENC_LAYERS, DEC_LAYERS = 4, 3, 4, 2, 2
CROSS = (0, 2)  # the Q-Former's cross_attention_frequency=2 over 3 layers
FAMILIES = ("blip2-t5", "instructblip-t5")
#: InstructBLIP's part A runs in the full suite only (the fast subset keeps BLIP-2's).
FAMILY_PARAMS = ["blip2-t5", pytest.param("instructblip-t5", marks=LENGTHY)]
IMAGE_TOKEN = BLIP2_VOCAB["<image>"]
START = 0  # tiny_t5_text_config's decoder_start_token_id


@functools.lru_cache(maxsize=2)
def _model(family: str) -> torch.nn.Module:
    return tiny_blip2_t5(seed=0, queries=QUERIES, instruct=family.startswith("instruct")).double()


def _images(model: torch.nn.Module, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.vision_model(pixel_values=torch.randn(1, 3, 32, 32, dtype=torch.float64))[0]


@functools.lru_cache(maxsize=1)
def _tied_model() -> torch.nn.Module:
    """BLIP-2 with a T5 whose head shares the token embeddings: transformers then scales the decoder's final state
    by d_model ** -0.5 before ``lm_head`` (tiny_blip2_t5's head is untied, as Flan-T5's)."""
    from tiny_blip import tiny_blip2_config, tiny_t5_text_config
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    base = tiny_blip2_config(queries=QUERIES)
    config = Blip2Config(vision_config=base.vision_config.to_dict(), qformer_config=base.qformer_config.to_dict(),
                         text_config={**tiny_t5_text_config(), "tie_word_embeddings": True}, num_query_tokens=QUERIES,
                         image_token_index=IMAGE_TOKEN, initializer_range=0.3)
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_(0, 1)
    return model.double().eval()


@functools.lru_cache(maxsize=1)
def _other_shape() -> torch.nn.Module:
    """InstructBLIP with a T5 of another shape than tiny_blip2_t5's: 3 encoder layers and 1 decoder layer, 2 heads of
    width 8 (their outputs 16 wide, d_model 32), a plain ReLU feed-forward (T5DenseActDense)."""
    from tiny_blip import tiny_blip2_config, tiny_t5_text_config
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    base = tiny_blip2_config(queries=QUERIES)
    qformer = {**base.qformer_config.to_dict(), "vocab_size": len(VOCAB), "max_position_embeddings": 32}
    text = {**tiny_t5_text_config(layers=3, decoder_layers=1), "num_heads": 2, "d_kv": 8, "feed_forward_proj": "relu"}
    config = InstructBlipConfig(vision_config=base.vision_config.to_dict(), qformer_config=qformer, text_config=text,
                                num_query_tokens=QUERIES, image_token_index=IMAGE_TOKEN, initializer_range=0.3)
    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_(0, 1)
    return model.double().eval()


def _inputs(family: str, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    model = _model(family) if model is None else model
    prompt = ["[CLS]", "question", ":", "what", "color", "is", "the", "circle", "?", "answer", ":", "[SEP]"]
    clean = {"image_embeds": _images(model, 1), "input_ids": torch.tensor([[BLIP2_VOCAB[w] for w in prompt]]),
             "answer_id": torch.tensor([BLIP2_VOCAB["red"]])}
    if family.startswith("instruct"):
        clean["qformer_input_ids"] = torch.tensor([[VOCAB[w] for w in ("[CLS]", "what", "color", "?", "[SEP]")]])
    return clean


@pytest.fixture(scope="module", params=FAMILY_PARAMS)
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def model(family: str) -> torch.nn.Module:
    return _model(family)


@pytest.fixture(scope="module")
def clean(family: str) -> dict[str, torch.Tensor]:
    return _inputs(family)


@pytest.fixture(scope="module")
def noisy(clean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image embeddings with Gaussian noise (seeded), the prompt and answer as in the clean inputs."""
    images = clean["image_embeds"]
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return dict(clean, image_embeds=images + noise)


@pytest.fixture(scope="module")
def counterfactual(model: torch.nn.Module, clean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Another image's embeddings; the prompt, instruction and answer as in the clean inputs."""
    return dict(clean, image_embeds=_images(model, 2))


@contextmanager
def _hooks(*pairs: tuple[torch.nn.Module, Callable[..., Any], bool]) -> Iterator[None]:
    """Plain forward hooks (``pre=False``) or pre-hooks (``pre=True``), removed afterwards."""
    handles = []
    try:
        for module, hook, pre in pairs:
            handles.append(module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _plain(model: torch.nn.Module, inputs: dict[str, torch.Tensor], *pairs: Any) -> float:
    """The score from the model's own modules under the given hooks, as the model's forward composes them (the
    projected queries scattered into the image tokens' embeddings, T5 from its decoder start token), without
    circuit_reference_t5."""
    images = inputs["image_embeds"]
    ones = torch.ones(images.shape[:-1], dtype=torch.long)
    with torch.no_grad(), _hooks(*pairs):
        query = model.query_tokens.expand(len(images), -1, -1)
        if "qformer_input_ids" in inputs:
            qids = inputs["qformer_input_ids"]
            mask = torch.ones(len(images), QUERIES + qids.shape[1], dtype=torch.long)
            state = model.qformer(input_ids=qids, attention_mask=mask, query_embeds=query,
                                  encoder_hidden_states=images, encoder_attention_mask=ones)[0]
        else:
            state = model.qformer(query_embeds=query, encoder_hidden_states=images, encoder_attention_mask=ones)[0]
        features = model.language_projection(state[:, :QUERIES])
        ids = torch.cat([torch.full((len(images), QUERIES), IMAGE_TOKEN), inputs["input_ids"]], dim=1)
        embeds = model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == IMAGE_TOKEN)[..., None], features)
        logits = model.language_model(inputs_embeds=embeds, decoder_input_ids=torch.tensor([[START]])).logits
    return float(torch.log_softmax(logits[0, 0], -1)[inputs["answer_id"][0]])


def _capture(store: dict[str, Any], key: str, pick: Callable[[Any, Any], Any]) -> Callable[..., None]:
    def hook(module: torch.nn.Module, args: Any, output: Any = None) -> None:
        store[key] = pick(args, output)

    return hook


def _first(args: Any, output: Any) -> Any:
    return (output if output is not None else args)[0]


def _whole(args: Any, output: Any) -> Any:
    return output


def _t5(model: torch.nn.Module) -> Any:
    return model.language_model


# ================================================================================================================
# Part A: the reference alone
# ----------------------------------------------------------------------------------------------------------------
# The graph


def _spec_edges(enc_layers: int = ENC_LAYERS, dec_layers: int = DEC_LAYERS, t5_heads: int = HEADS
                ) -> set[str]:
    """Every edge as the definition lists them, enumerated here for a tiny shape (independently of the module):
    the Q-Former's (3 layers of 4 heads, cross-attention on 0 and 2), T5's layers and heads as given."""
    edges: set[str] = set()
    qf = ["qf.emb"]
    for layer in range(QF_LAYERS):
        selfs = [f"qf.L{layer}.H{h}" for h in range(HEADS)]
        crosses = [f"qf.L{layer}.X{h}" for h in range(HEADS)] if layer in CROSS else []
        for h in range(HEADS):
            edges |= {f"{u} → qf.L{layer}.H{h}.{p}" for u in qf for p in "qkv"}
            if crosses:
                edges |= {f"{u} → qf.L{layer}.X{h}.q" for u in qf + selfs}
                edges |= {f"img → qf.L{layer}.X{h}.{p}" for p in "kv"}
        edges |= {f"{u} → qf.L{layer}.mlp" for u in qf + selfs + crosses}
        qf += selfs + crosses + [f"qf.L{layer}.mlp"]
    enc = ["enc.emb"]
    for layer in range(enc_layers):
        heads = [f"enc.L{layer}.H{h}" for h in range(t5_heads)]
        edges |= {f"{u} → enc.L{layer}.H{h}.{p}" for u in qf + enc for h in range(t5_heads) for p in "qkv"}
        edges |= {f"{u} → enc.L{layer}.mlp" for u in qf + enc + heads}
        enc += heads + [f"enc.L{layer}.mlp"]
    dec = ["dec.emb"]
    for layer in range(dec_layers):
        selfs = [f"dec.L{layer}.H{h}" for h in range(t5_heads)]
        crosses = [f"dec.L{layer}.X{h}" for h in range(t5_heads)]
        for h in range(t5_heads):
            edges |= {f"{u} → dec.L{layer}.H{h}.{p}" for u in dec for p in "qkv"}
            edges |= {f"{u} → dec.L{layer}.X{h}.q" for u in dec + selfs}
            edges |= {f"{u} → dec.L{layer}.X{h}.{p}" for u in qf + enc for p in "kv"}
        edges |= {f"{u} → dec.L{layer}.mlp" for u in dec + selfs + crosses}
        dec += selfs + crosses + [f"dec.L{layer}.mlp"]
    return edges | {f"{u} → out" for u in dec}


def test_graph_is_the_definitions(model: torch.nn.Module) -> None:
    qf_nodes = 1 + sum(HEADS * (2 if layer in CROSS else 1) + 1 for layer in range(QF_LAYERS))
    enc_nodes, dec_nodes = 1 + ENC_LAYERS * (HEADS + 1), 1 + DEC_LAYERS * (2 * HEADS + 1)
    assert len(reference_nodes(model)) == 1 + qf_nodes + enc_nodes + dec_nodes + 1 == 56
    assert len(reference_channels(model)) == (QF_LAYERS * (3 * HEADS + 1) + len(CROSS) * 3 * HEADS
                                              + ENC_LAYERS * (3 * HEADS + 1) + DEC_LAYERS * (6 * HEADS + 1) + 1)
    edges = reference_edges(model)
    assert len(edges) == len(set(edges)) == 2007
    assert set(edges) == _spec_edges()


@pytest.mark.parametrize("edge, present", [
    ("img → qf.L0.X0.k", True), ("img → qf.L2.X3.v", True), ("img → enc.L0.H0.k", False),
    ("img → dec.L0.X0.k", False), ("img → out", False), ("qf.emb → enc.L1.H2.v", True),
    ("qf.emb → dec.L1.X0.k", True), ("qf.emb → dec.L1.X0.q", False), ("qf.emb → out", False),
    ("qf.L2.mlp → dec.L0.H0.v", False), ("qf.L2.mlp → dec.L0.mlp", False), ("qf.L2.X1 → enc.L0.mlp", True),
    ("enc.emb → enc.L0.H0.q", True), ("enc.emb → dec.L0.X3.v", True), ("enc.emb → out", False),
    ("enc.L0.H1 → enc.L0.H2.q", False), ("enc.L0.H1 → enc.L0.mlp", True), ("enc.L0.mlp → enc.L1.H0.k", True),
    ("enc.L1.mlp → enc.L0.H0.k", False), ("enc.L1.mlp → dec.L0.X0.k", True), ("enc.L1.mlp → dec.L0.X0.q", False),
    ("enc.L0.H3 → out", False), ("enc.L1.H0 → qf.L2.mlp", False),
    ("dec.emb → dec.L0.H0.q", True), ("dec.emb → dec.L0.X0.q", True), ("dec.emb → dec.L0.X0.k", False),
    ("dec.emb → out", True), ("dec.L0.H1 → dec.L0.X2.q", True), ("dec.L0.H1 → dec.L0.H2.q", False),
    ("dec.L0.X1 → dec.L0.X2.q", False), ("dec.L0.X1 → dec.L0.mlp", True), ("dec.L0.mlp → dec.L1.X0.q", True),
    ("dec.L0.mlp → dec.L1.X0.k", False), ("dec.L1.mlp → dec.L0.H0.v", False), ("dec.L1.X2 → out", True),
    ("dec.L0.H0 → enc.L1.mlp", False),
])
def test_edges_listed(model: torch.nn.Module, edge: str, present: bool) -> None:
    assert (edge in reference_edges(model)) is present


def test_edges_are_exactly_the_direct_dependencies_of_a_frozen_forward(model: torch.nn.Module,
                                                                       clean: dict[str, torch.Tensor]) -> None:
    """Perturb one node's output with every other node frozen: the channels whose input moves are its receivers,
    and no other channel's input changes by a single bit."""
    inputs = prepare_inputs(model, clean)
    _, plan = run(model, inputs)
    frozen = {name: plan.outputs[name] for name in reference_nodes(model)[:-1]}
    base = frozen_inputs(model, inputs, frozen, reference_channels(model))
    listed = {parse_edge(edge) for edge in reference_edges(model)}
    torch.manual_seed(3)
    for node in frozen:
        moved = frozen_inputs(model, inputs, {**frozen, node: frozen[node] + torch.randn_like(frozen[node])},
                              reference_channels(model))
        changed = {channel for channel in moved if not torch.equal(moved[channel], base[channel])}
        assert changed == {r for u, r in listed if u == node}, node


@pytest.mark.parametrize("edge", ["dec.L1.H0 → dec.L0.H0.q", "img → enc.L0.H0.q", "enc.L0.H0 → enc.L0.H1.q",
                                  "out → dec.L0.mlp", "enc.L0.mlp → enc.L0.mlp", "img → dec.L0.X0.k",
                                  "enc.L1.mlp → out", "qf.L2.mlp → out", "dec.L0.X0 → dec.L0.X1.q",
                                  "qf.L9.H0 → enc.L0.mlp", "enc.L0.H0 → dec.L9.mlp", "dec.L0.X0 → dec.L1.X0.k",
                                  "enc.L0.H0 → enc.L1.H0", "enc.L0.H0", "enc.L0.H0 → → out"])
def test_an_edge_the_receiver_cannot_reach_is_refused(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                                                      noisy: dict[str, torch.Tensor], edge: str) -> None:
    with pytest.raises(BlipTraceError):
        reference_edge_score(model, clean, noisy, edge)


def test_arrows_and_senders(model: torch.nn.Module) -> None:
    assert check_edge(model, "enc.L0.H1->dec.L1.X2.v") == ("enc.L0.H1", "dec.L1.X2.v")
    qf = [n for n in reference_nodes(model) if n.startswith("qf.")]
    enc = [n for n in reference_nodes(model) if n.startswith("enc.")]
    dec = [n for n in reference_nodes(model) if n.startswith("dec.")]
    assert reference_senders(model, "qf.L2.X1.v") == ["img"]
    assert reference_senders(model, "enc.L0.H2.k") == [*qf, "enc.emb"]
    assert reference_senders(model, "dec.L0.X1.k") == reference_senders(model, "dec.L1.X3.v") == qf + enc
    assert reference_senders(model, "dec.L0.H3.q") == ["dec.emb"]
    assert reference_senders(model, "dec.L0.X0.q") == ["dec.emb", *(f"dec.L0.H{h}" for h in range(HEADS))]
    assert reference_senders(model, "out") == dec
    with pytest.raises(BlipTraceError, match="receiver channel"):
        reference_senders(model, "enc.L0.X0.k")  # the encoder does not cross-attend
    with pytest.raises(BlipTraceError, match="receiver channel"):
        reference_senders(model, "dec.L2.mlp")  # two decoder layers


def test_inputs_and_models_are_checked(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                                       noisy: dict[str, torch.Tensor], family: str) -> None:
    with pytest.raises(BlipTraceError, match="reaches"):
        reference_path_patch(model, clean, noisy, ["img"], ["qf.L0.X0.k", "enc.L0.H0.q"])
    with pytest.raises(BlipTraceError, match="sender"):
        reference_path_patch(model, clean, noisy, ["out"], ["out"])
    other = clean["input_ids"].clone()
    other[0, 4] = BLIP2_VOCAB["shape"]
    with pytest.raises(BlipTraceError, match="image embeddings only"):
        reference_path_patch(model, clean, dict(clean, input_ids=other), ["enc.emb"], ["enc.L0.mlp"])
    with pytest.raises(BlipTraceError, match="direction"):
        reference_path_patch(model, clean, noisy, ["img"], ["qf.L0.X0.k"], direction="sideways")
    from tiny_blip import tiny_blip2

    with pytest.raises(BlipTraceError, match="T5"):
        reference_score(tiny_blip2(seed=0), clean)


def test_hooks_are_removed_even_when_a_forward_fails(model: torch.nn.Module, clean: dict[str, torch.Tensor]) -> None:
    with pytest.raises(RuntimeError):
        run(model, prepare_inputs(model, clean), Plan(channels={"dec.L0.X0.k": torch.zeros(1, 1, 3)}))
    with pytest.raises(RuntimeError):
        run(model, prepare_inputs(model, clean), Plan(channels={"enc.L1.mlp": torch.zeros(1, 1, 3)}))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------------------------------------------
# Path patching identities


def test_patching_nothing_returns_the_base_score_the_models_own(model: torch.nn.Module, family: str,
                                                                clean: dict[str, torch.Tensor],
                                                                noisy: dict[str, torch.Tensor]) -> None:
    base = reference_score(model, clean)
    assert_close(base, _plain(model, clean), dtype=torch.float64)
    assert reference_path_patch(model, clean, noisy, [], []) == base
    assert reference_path_patch(model, clean, noisy, [], [], direction="denoise") == reference_score(model, noisy)
    assert abs(base - reference_score(model, noisy)) > 0.05  # a corruption that matters
    # the whole model's forward from pixels, as transformers runs it
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    ids = torch.cat([torch.full((1, QUERIES), IMAGE_TOKEN), clean["input_ids"]], dim=1)
    extra = {"qformer_input_ids": clean["qformer_input_ids"]} if family.startswith("instruct") else {}
    with torch.no_grad():
        logits = model(pixel_values=pixels, input_ids=ids, decoder_input_ids=torch.tensor([[START]]), **extra).logits
    assert_close(base, float(torch.log_softmax(logits[0, 0], -1)[clean["answer_id"][0]]), dtype=torch.float64)
    from_pixels = {k: v for k, v in clean.items() if k != "image_embeds"} | {"pixel_values": pixels}
    assert reference_score(model, from_pixels) == base
    with_image_tokens = dict(clean, input_ids=ids)
    assert reference_score(model, with_image_tokens) == base
    assert reference_score(model, clean, score="prob") == pytest.approx(float(np.exp(base)), rel=1e-12)


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_every_node_to_every_channel_is_the_source_run(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                                                       counterfactual: dict[str, torch.Tensor],
                                                       direction: str) -> None:
    senders = reference_nodes(model)[:-1]
    source = counterfactual if direction == "noise" else clean
    for receivers in (reference_channels(model), ["out"]):
        assert_close(reference_path_patch(model, clean, counterfactual, senders, receivers, direction),
                     reference_score(model, source), dtype=torch.float64, scale=10.0)


def test_img_to_every_cross_attention_key_and_value_is_the_corrupted_run(
        model: torch.nn.Module, clean: dict[str, torch.Tensor], counterfactual: dict[str, torch.Tensor]) -> None:
    receivers = [c for c in reference_channels(model) if c.startswith("qf.") and ".X" in c and c[-1] in "kv"]
    assert len(receivers) == 2 * HEADS * len(CROSS)
    patched = reference_path_patch(model, clean, counterfactual, ["img"], receivers)
    assert_close(patched, _plain(model, counterfactual), dtype=torch.float64, scale=10.0)
    assert abs(patched - reference_score(model, clean)) > 1e-3


def test_the_encoder_to_every_decoder_key_and_value_is_the_corrupted_run(
        model: torch.nn.Module, clean: dict[str, torch.Tensor], counterfactual: dict[str, torch.Tensor]) -> None:
    """The decoder reads the image only through its cross-attention keys and values: every node of the Q-Former and
    the encoder into them is the corrupted run; into the rest of the decoder (all but them) it changes nothing."""
    upstream = [n for n in reference_nodes(model) if n.split(".")[0] in ("img", "qf", "enc")]
    into = [c for c in reference_channels(model) if c.startswith("dec.") and ".X" in c and c[-1] in "kv"]
    patched = reference_path_patch(model, clean, counterfactual, upstream, into)
    assert_close(patched, _plain(model, counterfactual), dtype=torch.float64, scale=10.0)
    every = [c for c in reference_channels(model) if c.split(".")[0] in ("qf", "enc")] + into
    assert_close(reference_path_patch(model, clean, counterfactual, upstream, every), patched,
                 dtype=torch.float64, scale=10.0)


#: Edges that carry nothing under an image corruption. The corruption leaves the prompt, the instruction, the queries
#: and the decoder's start token alike: the embeddings' edges score 0, and so do the edges of the nodes that read only
#: them (the Q-Former's layer-0 and the decoder's layer-0 self-attention heads). The decoder has one position, so its
#: self-attention weighs its one key by 1 whatever its query and key read: edges into decoder self-attention q and k
#: score 0 (those into v do not: NONZERO).
ZERO = ["qf.emb → qf.L0.H1.q", "qf.emb → enc.L1.H2.v", "enc.emb → enc.L0.H0.k", "enc.emb → dec.L1.X0.v",
        "dec.emb → dec.L0.X1.q", "dec.emb → out", "qf.L0.H1 → enc.L0.H0.v", "qf.L0.H2 → qf.L2.mlp",
        "dec.L0.H1 → out", "dec.L0.H2 → dec.L1.mlp", "dec.L0.X1 → dec.L1.H2.q", "dec.L0.mlp → dec.L1.H0.k"]
NONZERO = ["qf.L1.H1 → enc.L0.H0.v", "qf.L1.H2 → qf.L2.mlp", "dec.L0.X1 → dec.L1.H2.v", "dec.L0.X1 → out",
           "img → qf.L2.X1.v", "enc.L1.mlp → dec.L0.X2.k"]


@pytest.mark.parametrize("edge", lengthy_except(ZERO, "enc.emb → dec.L1.X0.v", "qf.L0.H1 → enc.L0.H0.v",
                                                "dec.L0.X1 → dec.L1.H2.q", "dec.L0.H1 → out"))
def test_edges_that_carry_nothing_score_exactly_zero(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                                                     counterfactual: dict[str, torch.Tensor], edge: str) -> None:
    assert reference_edge_score(model, clean, counterfactual, edge) == 0.0
    assert reference_edge_score(model, clean, counterfactual, edge, direction="denoise") == 0.0


@pytest.mark.parametrize("edge", lengthy_except(NONZERO, "dec.L0.X1 → dec.L1.H2.v", "qf.L1.H1 → enc.L0.H0.v"))
def test_the_same_senders_or_receivers_move_the_score_elsewhere(model: torch.nn.Module,
                                                               clean: dict[str, torch.Tensor],
                                                               counterfactual: dict[str, torch.Tensor],
                                                               edge: str) -> None:
    assert abs(reference_edge_score(model, clean, counterfactual, edge)) > 1e-6


def test_the_last_mlp_to_out_is_patching_its_output(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                                                    counterfactual: dict[str, torch.Tensor]) -> None:
    """The decoder's last feed-forward feeds only ``out``: path patching it there is activation patching of its
    output."""
    feed_forward = _t5(model).decoder.block[-1].layer[-1].DenseReluDense
    store: dict[str, Any] = {}
    _plain(model, counterfactual, (feed_forward, _capture(store, "mlp", _whole), False))
    expected = _plain(model, clean, (feed_forward, lambda m, a, o: store["mlp"], False))
    assert_close(reference_path_patch(model, clean, counterfactual, [f"dec.L{DEC_LAYERS - 1}.mlp"], ["out"]),
                 expected, dtype=torch.float64, scale=10.0)
    assert abs(expected - _plain(model, clean)) > 1e-4


def test_a_tied_head_reads_the_decoders_final_state_scaled() -> None:
    """With tied embeddings ``out`` reads d_model ** -0.5 times the decoder's final layer norm, as transformers
    scales it; the score is the model's own and the last MLP into ``out`` is still activation patching."""
    model = _tied_model()
    t5 = _t5(model)
    assert t5.lm_head.weight is t5.shared.weight and t5.config.scale_decoder_outputs
    clean = _inputs("blip2-t5", model)
    other = dict(clean, image_embeds=_images(model, 2))
    store: dict[str, Any] = {}
    base = _plain(model, clean, (t5.decoder.final_layer_norm, _capture(store, "final", _whole), False))
    _, plan = run(model, prepare_inputs(model, clean))
    assert_close(plan.seen["out"].numpy(), (store["final"] * t5.config.d_model ** -0.5).numpy(), dtype=torch.float64)
    assert_close(reference_score(model, clean), base, dtype=torch.float64)
    feed_forward = t5.decoder.block[-1].layer[-1].DenseReluDense
    _plain(model, other, (feed_forward, _capture(store, "mlp", _whole), False))
    expected = _plain(model, clean, (feed_forward, lambda m, a, o: store["mlp"], False))
    assert abs(expected - base) > 1e-4
    assert_close(reference_path_patch(model, clean, other, [f"dec.L{DEC_LAYERS - 1}.mlp"], ["out"]), expected,
                 dtype=torch.float64, scale=10.0)


def test_a_t5_of_another_shape() -> None:
    """3 encoder layers, 1 decoder layer, 2 heads narrower than d_model, a plain feed-forward: the graph is the
    definition's, a perturbed node moves exactly its receivers, the score is the model's own and every node into
    every channel is the source run."""
    model = _other_shape()
    feed_forward = _t5(model).encoder.block[0].layer[-1].DenseReluDense
    assert type(feed_forward).__name__ == "T5DenseActDense" and _t5(model).config.d_kv * 2 != _t5(model).config.d_model
    assert set(reference_edges(model)) == _spec_edges(enc_layers=3, dec_layers=1, t5_heads=2)
    clean = _inputs("instructblip-t5", model)
    other = dict(clean, image_embeds=_images(model, 2))
    inputs = prepare_inputs(model, clean)
    _, plan = run(model, inputs)
    frozen = {name: plan.outputs[name] for name in reference_nodes(model)[:-1]}
    base = frozen_inputs(model, inputs, frozen, reference_channels(model))
    torch.manual_seed(3)
    for node in frozen:
        moved = frozen_inputs(model, inputs, {**frozen, node: frozen[node] + torch.randn_like(frozen[node])},
                              reference_channels(model))
        changed = {channel for channel in moved if not torch.equal(moved[channel], base[channel])}
        assert changed == {r for u, r in map(parse_edge, reference_edges(model)) if u == node}, node
    assert_close(reference_score(model, clean), _plain(model, clean), dtype=torch.float64)
    assert abs(reference_score(model, clean) - reference_score(model, other)) > 1e-3
    assert_close(reference_path_patch(model, clean, other, reference_nodes(model)[:-1], reference_channels(model)),
                 reference_score(model, other), dtype=torch.float64, scale=10.0)


def _rows_hook(rows: slice, value: torch.Tensor) -> Callable[..., torch.Tensor]:
    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[..., rows] = value
        return output

    return hook


def _encoder_head_to_decoder_value_by_hand(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                                           corrupted: dict[str, torch.Tensor]) -> float:
    """enc.L0.H1 → dec.L1.X2.v from the modules: encoder layer 0's ``o`` reads head 1's slice from the corrupted
    run; the encoder's residual stream is summed with every other node frozen at its clean output (layer 0's MLP,
    layer 1's attention and MLP) and normed by the encoder's final layer norm; only head 2's value rows of decoder
    layer 1's cross-attention read the result."""
    t5 = _t5(model)
    zero, one = t5.encoder.block
    attention = zero.layer[0].SelfAttention
    size = attention.key_value_proj_dim
    store: dict[str, Any] = {}
    _plain(model, corrupted, (attention.o, _capture(store, "bad", _first), True))
    _plain(model, clean, (zero, _capture(store, "h0", _first), True),
           (attention.o, _capture(store, "ctx", _first), True),
           (zero.layer[1].DenseReluDense, _capture(store, "m0", _whole), False),
           (one.layer[0].SelfAttention, _capture(store, "a1", _first), False),
           (one.layer[1].DenseReluDense, _capture(store, "m1", _whole), False))
    context = store["ctx"].clone()
    context[..., size:2 * size] = store["bad"][..., size:2 * size]
    rows = slice(2 * size, 3 * size)
    cross = t5.decoder.block[1].layer[1].EncDecAttention
    with torch.no_grad():
        h = store["h0"] + attention.o(context) + store["m0"] + store["a1"] + store["m1"]
        value = cross.v(t5.encoder.final_layer_norm(h))[..., rows]
    return _plain(model, clean, (cross.v, _rows_hook(rows, value), False))


def _cross_head_to_mlp_by_hand(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                               corrupted: dict[str, torch.Tensor]) -> float:
    """dec.L0.X1 → dec.L1.mlp from the modules: decoder layer 0's cross-attention ``o`` reads head 1's slice from the
    corrupted run; the decoder's residual stream up to layer 1's feed-forward is summed with every other node frozen
    clean (layer 0's self-attention and MLP, layer 1's self- and cross-attention); only layer 1's feed-forward reads
    its layer norm."""
    zero, one = _t5(model).decoder.block
    cross = zero.layer[1].EncDecAttention
    size = cross.key_value_proj_dim
    store: dict[str, Any] = {}
    _plain(model, corrupted, (cross.o, _capture(store, "bad", _first), True))
    _plain(model, clean, (zero, _capture(store, "g0", _first), True),
           (zero.layer[0].SelfAttention, _capture(store, "s0", _first), False),
           (cross.o, _capture(store, "ctx", _first), True),
           (zero.layer[2].DenseReluDense, _capture(store, "m0", _whole), False),
           (one.layer[0].SelfAttention, _capture(store, "s1", _first), False),
           (one.layer[1].EncDecAttention, _capture(store, "x1", _first), False))
    context = store["ctx"].clone()
    context[..., size:2 * size] = store["bad"][..., size:2 * size]
    with torch.no_grad():
        h = store["g0"] + store["s0"] + cross.o(context) + store["m0"] + store["s1"] + store["x1"]
        mlp_input = one.layer[2].layer_norm(h)
    return _plain(model, clean, (one.layer[2].DenseReluDense, lambda m, a: (mlp_input,), True))


def _q_former_head_to_encoder_key_by_hand(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                                          corrupted: dict[str, torch.Tensor]) -> float:
    """qf.L2.X1 → enc.L1.H2.k from the modules: the Q-Former's last layer recomputed with cross-attention head 1's
    context slice from the corrupted run (its self-attention output and MLP output frozen clean); its query rows
    projected into the encoder's rows 0..Q-1; encoder layer 0 frozen clean; only head 2's key rows of encoder layer 1
    read the result."""
    last = model.qformer.encoder.layer[2]
    cross, size = last.crossattention, last.crossattention.attention.attention_head_size
    zero, one = _t5(model).encoder.block
    store: dict[str, Any] = {}
    _plain(model, corrupted, (cross.attention, _capture(store, "bad", _first), False))
    _plain(model, clean, (cross.attention, _capture(store, "ctx", _first), False),
           (last.attention, _capture(store, "after_self", _whole), False),
           (last.output_query.dense, _capture(store, "mlp", _whole), False),
           (zero, _capture(store, "h0", _first), True),
           (zero.layer[0].SelfAttention, _capture(store, "a0", _first), False),
           (zero.layer[1].DenseReluDense, _capture(store, "m0", _whole), False))
    context = store["ctx"].clone()
    context[..., size:2 * size] = store["bad"][..., size:2 * size]
    rows = slice(2 * size, 3 * size)
    attention = one.layer[0].SelfAttention
    with torch.no_grad():
        after_cross = cross.output(context, store["after_self"][:, :QUERIES])
        queries = last.output_query.LayerNorm(store["mlp"] + after_cross)
        h = store["h0"].clone()
        h[:, :QUERIES] = model.language_projection(queries)  # the query rows of the encoder's input
        h = h + store["a0"] + store["m0"]
        key = attention.k(one.layer[0].layer_norm(h))[..., rows]
    return _plain(model, clean, (attention.k, _rows_hook(rows, key), False))


@pytest.mark.parametrize("edge, by_hand", [("enc.L0.H1 → dec.L1.X2.v", _encoder_head_to_decoder_value_by_hand),
                                           ("dec.L0.X1 → dec.L1.mlp", _cross_head_to_mlp_by_hand),
                                           ("qf.L2.X1 → enc.L1.H2.k", _q_former_head_to_encoder_key_by_hand)])
def test_single_edges_match_the_definition_worked_by_hand(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                                                          counterfactual: dict[str, torch.Tensor], edge: str,
                                                          by_hand: Callable[..., float]) -> None:
    expected = by_hand(model, clean, counterfactual) - _plain(model, clean)
    assert abs(expected) > 1e-5
    assert_close(reference_edge_score(model, clean, counterfactual, edge), expected, dtype=torch.float64, scale=10.0)
    denoised = by_hand(model, counterfactual, clean) - _plain(model, counterfactual)
    assert_close(reference_edge_score(model, clean, counterfactual, edge, direction="denoise"), denoised,
                 dtype=torch.float64, scale=10.0)


def test_rows_of_a_batch_are_patched_independently_and_averaged(
        model: torch.nn.Module, clean: dict[str, torch.Tensor], noisy: dict[str, torch.Tensor],
        counterfactual: dict[str, torch.Tensor]) -> None:
    def stack(*rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: torch.cat([row[key] for row in rows]) for key in rows[0]}

    edge = "enc.L0.H1 → dec.L1.X2.v"
    both = reference_edge_score(model, stack(clean, clean), stack(noisy, counterfactual), edge)
    one, two = (reference_edge_score(model, clean, other, edge) for other in (noisy, counterfactual))
    assert one != two
    assert_close(both, (one + two) / 2, dtype=torch.float64, scale=10.0)


# ----------------------------------------------------------------------------------------------------------------
# Circuit runs


@pytest.mark.slow
def test_circuit_with_every_edge_is_the_clean_run_and_with_none_the_corrupted_run(
        model: torch.nn.Module, clean: dict[str, torch.Tensor], counterfactual: dict[str, torch.Tensor]) -> None:
    edges = reference_edges(model)
    assert_close(reference_circuit_score(model, clean, counterfactual, edges), reference_score(model, clean),
                 dtype=torch.float64, scale=10.0)
    assert_close(reference_circuit_score(model, clean, counterfactual, []), _plain(model, counterfactual),
                 dtype=torch.float64, scale=10.0)
    assert reference_faithfulness(model, clean, counterfactual, edges) == pytest.approx(1.0)
    assert reference_faithfulness(model, clean, counterfactual, []) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.slow
def test_circuit_keeping_every_edge_but_the_decoders_keys_and_values_is_the_corrupted_run(
        model: torch.nn.Module, clean: dict[str, torch.Tensor], counterfactual: dict[str, torch.Tensor]) -> None:
    """The image reaches the decoder only through its cross-attention keys and values: with every other edge kept,
    the decoder reads the corrupted encoder output, and the circuit run is the corrupted run."""
    cut = [e for e in reference_edges(model) if not (parse_edge(e)[1].startswith("dec.")
                                                        and ".X" in parse_edge(e)[1] and e[-1] in "kv")]
    assert_close(reference_circuit_score(model, clean, counterfactual, cut), _plain(model, counterfactual),
                 dtype=torch.float64, scale=10.0)


@pytest.mark.slow
@pytest.mark.parametrize("edge", ["dec.L1.mlp → out", "img → qf.L2.X1.v", "qf.L1.H1 → qf.L2.mlp",
                                  "qf.L2.X0 → enc.L0.H3.k", "enc.L0.H2 → dec.L1.X0.v", "dec.L0.X1 → dec.L1.mlp",
                                  "qf.L1.mlp → enc.L1.mlp"])
def test_dropping_one_edge_from_the_full_circuit_is_that_edges_path_patch(
        model: torch.nn.Module, clean: dict[str, torch.Tensor], counterfactual: dict[str, torch.Tensor],
        edge: str) -> None:
    kept = [e for e in reference_edges(model) if parse_edge(e) != parse_edge(edge)]
    effect = reference_edge_score(model, clean, counterfactual, edge)
    assert abs(effect) > 1e-6
    assert_close(reference_circuit_score(model, clean, counterfactual, kept), reference_score(model, clean) + effect,
                 dtype=torch.float64, scale=10.0)


# ================================================================================================================
# Part B: the package's engine against the reference

QUESTION, ANSWER = "what color is the circle?", "red"
#: (model seed): tiny models whose answer moves under the corruptions here.
SEEDS = {"blip2-t5": 1, "instructblip-t5": 0}


@functools.lru_cache(maxsize=2)
def _bundle(family: str) -> Any:
    from blip_trace_widgets import load_model

    instruct = family.startswith("instruct")
    processor = tiny_instructblip_processor(queries=QUERIES) if instruct else tiny_blip2_processor(queries=QUERIES)
    model = tiny_blip2_t5(seed=SEEDS[family], queries=QUERIES, instruct=instruct).double()
    return load_model((model, processor), device="cpu")


def _picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))


def _engine_graph(bundle: Any) -> Any:
    """The engine's graph, or a skip while the engine refuses T5 models (circuit_graph's BlipTraceError); once it
    gives a graph, every other engine call must work."""
    from blip_trace_widgets.circuits import circuit_graph

    try:
        return circuit_graph(bundle)
    except BlipTraceError as error:
        pytest.skip(f"the circuits engine does not cover {type(bundle.model).__name__} with T5 yet: "
                    f"circuit_graph refuses it ({str(error)[:160]})")


@functools.lru_cache(maxsize=2)
def _engine_case(family: str) -> tuple[Any, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(bundle, clean, noisy, counterfactual): the reference's dicts on the bundle's model, the image embeddings
    from the bundle's own image processor; the noise (3 standard deviations, seeded) is handed to the engine as the
    corrupted embeddings themselves, the counterfactual as its picture."""
    bundle = _bundle(family)
    clean = t5_inputs(bundle.model, bundle.processor, _picture(0), QUESTION, ANSWER)
    images = clean["image_embeds"]
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0), dtype=images.dtype)
    noisy = dict(clean, image_embeds=images + noise * 3 * images.std())
    other = t5_inputs(bundle.model, bundle.processor, _picture(1), QUESTION, ANSWER)
    return bundle, clean, noisy, dict(clean, image_embeds=other["image_embeds"])


def _corruption(kind: str, corrupted: dict[str, Any]) -> Any:
    return corrupted["image_embeds"] if kind == "noise" else _picture(1)


def _engine_edges(family: str, kind: str, direction: str, edges: list[str]) -> Any:
    from blip_trace_widgets.circuits import edge_scores

    bundle, clean, noisy, other = _engine_case(family)
    corrupted = noisy if kind == "noise" else other
    return edge_scores(bundle, _picture(0), QUESTION, method="exact", corruption=_corruption(kind, corrupted),
                       direction="noise" if direction == "noise" else "restore", samples=1, answer=ANSWER,
                       edges=edges)


#: One or more edges of every channel kind, in each part of the model.
EDGES = ["img → qf.L0.X0.k", "img → qf.L2.X3.v", "qf.L1.H2 → qf.L2.X1.q", "qf.L1.mlp → qf.L2.mlp",
         "qf.L2.X1 → enc.L0.H3.k", "qf.L0.mlp → enc.L1.mlp", "qf.L2.mlp → dec.L0.X1.v", "enc.emb → enc.L0.H0.q",
         "enc.L0.mlp → enc.L1.H2.q", "enc.L0.H1 → dec.L1.X2.v", "enc.L1.mlp → dec.L0.X0.k",
         "dec.L0.X1 → dec.L1.H2.v", "dec.L0.X3 → dec.L1.X0.q", "dec.L0.mlp → dec.L1.mlp", "dec.L1.X2 → out",
         "dec.L1.mlp → out"]


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_engine_graph_is_the_references(family: str) -> None:
    bundle = _bundle(family)
    graph = _engine_graph(bundle)
    model = bundle.model
    edges = reference_edges(model)
    assert len(set(graph.edges)) == len(graph.edges)
    assert sorted(set(graph.edges) - set(edges))[:5] == [] and sorted(set(edges) - set(graph.edges))[:5] == []
    assert set(graph.nodes) == set(reference_nodes(model)[:-1])
    assert sorted(graph.channels) == sorted(reference_channels(model))


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_engine_inputs_clean_and_corrupted_runs_are_the_references(family: str) -> None:
    """The inputs agree (image embeddings, answer token; the prompt through the scores): the engine's clean and
    corrupted scores are the reference's, and one exact edge score is too (the fast subset's engine check)."""
    from blip_trace_widgets.circuits import circuit_inputs

    _engine_graph(_bundle(family))
    bundle, clean, noisy, _ = _engine_case(family)
    pair = circuit_inputs(bundle, _picture(0), QUESTION, answer=ANSWER, samples=1)
    assert_close(pair.img.detach().double().numpy(), clean["image_embeds"].double().numpy(), dtype=torch.float64)
    edge = "enc.L0.H1 → dec.L1.X2.v"
    result = _engine_edges(family, "noise", "noise", [edge])
    assert_close(result.clean_score, reference_score(bundle.model, clean), scale=10.0)
    assert_close(result.corrupted_score, reference_score(bundle.model, noisy), scale=10.0)
    assert abs(result.clean_score - result.corrupted_score) > 1e-2, "a corruption that matters"
    assert list(result.edges) == [edge]
    theirs = reference_edge_score(bundle.model, clean, noisy, edge)
    assert abs(theirs) > 1e-4
    assert_close(float(result.scores[0]), theirs, scale=10.0)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["noise", "counterfactual"])
@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_engine_exact_edge_scores_equal_the_reference(family: str, kind: str, direction: str) -> None:
    _engine_graph(_bundle(family))
    bundle, clean, noisy, other = _engine_case(family)
    corrupted = noisy if kind == "noise" else other
    result = _engine_edges(family, kind, direction, EDGES)
    ours = dict(zip(result.edges, np.asarray(result.scores, dtype=float)))
    assert sorted(ours) == sorted(EDGES)
    theirs = {e: reference_edge_score(bundle.model, clean, corrupted, e, direction) for e in EDGES}
    assert sum(abs(v) > 1e-4 for v in theirs.values()) >= len(EDGES) // 2, "edges that change nothing: a weak test"
    wrong = {e: (ours[e], theirs[e]) for e in EDGES if not close(ours[e], theirs[e], scale=10.0)}
    assert not wrong, f"engine vs reference (edge: (engine, reference)): {wrong}"


#: (senders, receivers): across the Q-Former, the encoder and the decoder; receivers all in T5; all in the decoder.
PATHS = [(["img", "qf.L1.mlp", "enc.L0.H1", "dec.L0.X2"], ["qf.L2.X1.k", "enc.L1.H0.v", "dec.L1.X3.k", "dec.L1.mlp", "out"]),
         (["qf.L2.X1", "enc.L0.mlp", "enc.L1.H3"], ["enc.L1.H2.q", "enc.L1.mlp", "dec.L0.X1.v", "dec.L1.X0.k"]),
         (["enc.L1.mlp", "dec.L0.X0", "dec.L0.mlp"], ["dec.L1.X2.v", "dec.L1.H1.v", "dec.L1.mlp", "out"])]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("path", range(len(PATHS)))
@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_engine_path_from_several_senders_to_several_receivers_equals_the_reference(family: str, path: int,
                                                                                    direction: str) -> None:
    from blip_trace_widgets.circuits import path_patch

    _engine_graph(_bundle(family))
    bundle, clean, _, other = _engine_case(family)
    senders, receivers = PATHS[path]
    result = path_patch(bundle, _picture(0), QUESTION, sender=senders, receivers=receivers,
                        corruption=_corruption("counterfactual", other), samples=1, answer=ANSWER,
                        direction="noise" if direction == "noise" else "restore")
    base = reference_score(bundle.model, clean if direction == "noise" else other)
    theirs = reference_path_patch(bundle.model, clean, other, senders, receivers, direction) - base
    assert abs(theirs) > 1e-3
    assert_close(result.base_score, base, scale=10.0)
    assert_close(result.effect, theirs, scale=10.0)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_engine_circuit_runs_equal_the_reference(family: str) -> None:
    from blip_trace_widgets.circuits import faithfulness

    graph = _engine_graph(_bundle(family))
    bundle, clean, noisy, _ = _engine_case(family)
    model = bundle.model
    edges = list(graph.edges)
    some = [e for e, keep in zip(edges, np.random.default_rng(0).random(len(edges)) < 0.3) if keep]
    full, empty = reference_score(model, clean), reference_score(model, noisy)
    for kept, expected in (([], empty), (edges, full), (some, None)):
        result = faithfulness(bundle, _picture(0), QUESTION, kept, corruption=_corruption("noise", noisy),
                              samples=1, answer=ANSWER)
        if expected is None:
            expected = reference_circuit_score(model, clean, noisy, some)
            assert abs(expected - empty) > 1e-3 and abs(expected - full) > 1e-3, "neither run: a real test"
        assert_close(result.circuit_score, expected, scale=10.0, err_msg=f"{len(kept)} of {len(edges)} edges")
        assert_close(result.clean_score, full, scale=10.0)
        assert_close(result.corrupted_score, empty, scale=10.0)


@pytest.mark.slow
def test_engine_averages_noise_draws_as_the_reference_averages_rows() -> None:
    """Two noise draws handed to the engine as corrupted embeddings [2, N, D]: its edge scores and circuit score are
    the mean over the draws, as the reference's over a batch of (clean, draw) rows."""
    from blip_trace_widgets.circuits import edge_scores, faithfulness

    graph = _engine_graph(_bundle("blip2-t5"))
    bundle, clean, noisy, _ = _engine_case("blip2-t5")
    images = clean["image_embeds"]
    second = images + torch.randn(images.shape, generator=torch.Generator().manual_seed(1),
                                  dtype=images.dtype) * 3 * images.std()
    draws = torch.cat([noisy["image_embeds"], second])
    rows = {key: torch.cat([value, value]) for key, value in clean.items()}
    corrupted = dict(rows, image_embeds=draws)
    edges = ["enc.L0.H1 → dec.L1.X2.v", "img → qf.L0.X3.k", "dec.L0.X1 → dec.L1.mlp"]
    result = edge_scores(bundle, _picture(0), QUESTION, method="exact", corruption=draws, samples=2, answer=ANSWER,
                         edges=edges)
    ours = dict(zip(result.edges, np.asarray(result.scores, dtype=float)))
    for edge in edges:
        one, two = (reference_edge_score(bundle.model, clean, dict(clean, image_embeds=d[None]), edge) for d in draws)
        assert one != two
        assert_close(ours[edge], reference_edge_score(bundle.model, rows, corrupted, edge), scale=10.0, err_msg=edge)
        assert_close(ours[edge], (one + two) / 2, scale=10.0, err_msg=edge)
    some = [e for e, keep in zip(graph.edges, np.random.default_rng(1).random(len(graph.edges)) < 0.3) if keep]
    circuit = faithfulness(bundle, _picture(0), QUESTION, some, corruption=draws, samples=2, answer=ANSWER)
    assert_close(circuit.circuit_score, reference_circuit_score(bundle.model, rows, corrupted, some), scale=10.0)


@pytest.mark.slow
def test_engine_scales_a_tied_heads_final_state_as_the_reference() -> None:
    """A T5 with tied embeddings (its final state scaled before lm_head): the engine's scores, edges into ``out``
    and a path across the encoder are the reference's."""
    from blip_trace_widgets import load_model
    from blip_trace_widgets.circuits import edge_scores

    bundle = load_model((_tied_model(), tiny_blip2_processor(queries=QUERIES)), device="cpu")
    _engine_graph(bundle)
    model = bundle.model
    clean = t5_inputs(model, bundle.processor, _picture(0), QUESTION, ANSWER)
    other = dict(clean, image_embeds=t5_inputs(model, bundle.processor, _picture(1), QUESTION, ANSWER)["image_embeds"])
    edges = ["dec.L1.mlp → out", "dec.L1.X2 → out", "dec.L0.X1 → dec.L1.mlp", "enc.L0.H1 → dec.L1.X2.v"]
    for direction in ("noise", "denoise"):
        result = edge_scores(bundle, _picture(0), QUESTION, method="exact", corruption=_picture(1),
                             direction="noise" if direction == "noise" else "restore", samples=1, answer=ANSWER,
                             edges=edges)
        assert_close(result.clean_score, reference_score(model, clean), scale=10.0)
        assert_close(result.corrupted_score, reference_score(model, other), scale=10.0)
        ours = dict(zip(result.edges, np.asarray(result.scores, dtype=float)))
        theirs = {e: reference_edge_score(model, clean, other, e, direction) for e in edges}
        assert max(abs(v) for v in theirs.values()) > 1e-3
        wrong = {e: (ours[e], theirs[e]) for e in edges if not close(ours[e], theirs[e], scale=10.0)}
        assert not wrong, f"{direction}: engine vs reference (edge: (engine, reference)): {wrong}"


@pytest.mark.slow
def test_engine_on_a_t5_of_another_shape_equals_the_reference() -> None:
    """InstructBLIP with 3 encoder layers, 1 decoder layer, 2 heads narrower than d_model and a plain feed-forward:
    the engine's graph, edge scores both ways and a 30% circuit are the reference's."""
    from blip_trace_widgets import load_model
    from blip_trace_widgets.circuits import edge_scores, faithfulness

    bundle = load_model((_other_shape(), tiny_instructblip_processor(queries=QUERIES)), device="cpu")
    graph = _engine_graph(bundle)
    model = bundle.model
    assert sorted(graph.edges) == sorted(reference_edges(model))
    clean = t5_inputs(model, bundle.processor, _picture(0), QUESTION, ANSWER)
    other = dict(clean, image_embeds=t5_inputs(model, bundle.processor, _picture(1), QUESTION, ANSWER)["image_embeds"])
    edges = ["img → qf.L2.X0.k", "qf.L2.mlp → enc.L2.H1.q", "enc.L0.H1 → enc.L2.mlp", "enc.L1.mlp → dec.L0.X1.k",
             "enc.L2.H0 → dec.L0.X0.v", "dec.L0.X1 → dec.L0.mlp", "dec.L0.X0 → out", "dec.L0.mlp → out"]
    for direction in ("noise", "denoise"):
        result = edge_scores(bundle, _picture(0), QUESTION, method="exact", corruption=_picture(1),
                             direction="noise" if direction == "noise" else "restore", samples=1, answer=ANSWER,
                             edges=edges)
        assert_close(result.clean_score, reference_score(model, clean), scale=10.0)
        assert_close(result.corrupted_score, reference_score(model, other), scale=10.0)
        ours = dict(zip(result.edges, np.asarray(result.scores, dtype=float)))
        theirs = {e: reference_edge_score(model, clean, other, e, direction) for e in edges}
        assert sum(abs(v) > 1e-4 for v in theirs.values()) >= len(edges) // 2
        wrong = {e: (ours[e], theirs[e]) for e in edges if not close(ours[e], theirs[e], scale=10.0)}
        assert not wrong, f"{direction}: engine vs reference (edge: (engine, reference)): {wrong}"
    some = [e for e, keep in zip(graph.edges, np.random.default_rng(2).random(len(graph.edges)) < 0.3) if keep]
    circuit = faithfulness(bundle, _picture(0), QUESTION, some, corruption=_picture(1), samples=1, answer=ANSWER)
    assert_close(circuit.circuit_score, reference_circuit_score(model, clean, other, some), scale=10.0)


@pytest.mark.slow
def test_engine_scores_probabilities_as_the_reference() -> None:
    """metric='prob': p of the answer's first token, not its log (the model's own answer here, 'green': p = 0.9997
    on the clean image, the counterfactual's answer is another)."""
    from blip_trace_widgets.circuits import edge_scores

    _engine_graph(_bundle("blip2-t5"))
    bundle, clean, _, other = _engine_case("blip2-t5")
    green = torch.tensor([BLIP2_VOCAB["green"]])
    clean, other = dict(clean, answer_id=green), dict(other, answer_id=green)
    edges = ["enc.L0.H1 → dec.L1.X2.v", "qf.L2.X1 → enc.L0.H3.k", "dec.L1.mlp → out"]
    result = edge_scores(bundle, _picture(0), QUESTION, method="exact", corruption=_picture(1), samples=1,
                         answer="green", metric="prob", edges=edges)
    assert_close(result.clean_score, reference_score(bundle.model, clean, score="prob"))
    assert_close(result.corrupted_score, reference_score(bundle.model, other, score="prob"))
    ours = dict(zip(result.edges, np.asarray(result.scores, dtype=float)))
    theirs = {e: reference_edge_score(bundle.model, clean, other, e, score="prob") for e in edges}
    assert max(abs(v) for v in theirs.values()) > 1e-2
    wrong = {e: (ours[e], theirs[e]) for e in edges if not close(ours[e], theirs[e])}
    assert not wrong, f"engine vs reference (edge: (engine, reference)): {wrong}"
