"""The BLIP-2 / InstructBLIP (OPT) circuit reference (tests/circuit_reference_blip2.py) on tiny random models, and the
package's circuits engine against it.

Part A checks the reference alone: the graph against the computation (a perturbed node moves exactly the channels it
sends to), identities of path patching and circuit runs, and single edges worked out by hand on the model's modules.
Part B compares the engine's public API (``circuit_graph``, ``path_patch``, ``edge_scores``, ``faithfulness``) with
the reference: the edge set, exact edge scores in both directions under noise and a counterfactual image, a path from
several senders to several receivers, circuits keeping none, all and 30% of the edges, two noise draws averaged,
and the trained demo models with a counterfactual image. Part B skips while the engine refuses BLIP-2 models (a
BlipTraceError from ``circuit_graph`` or the function under test).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from circuit_reference_blip2 import (
    Plan,
    blip2_inputs,
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
)
from fast_subset import LENGTHY
from PIL import Image
from tiny_blip import (
    BLIP2_VOCAB,
    VOCAB,
    tiny_blip2,
    tiny_blip2_processor,
    tiny_instructblip,
    tiny_instructblip_processor,
)
from tolerance import assert_close, close

from blip_trace_widgets.core.errors import BlipTraceError

QUERIES, LAYERS, HEADS = 4, 3, 4
CROSS = (0, 2)  # cross_attention_frequency=2 over 3 layers
FAMILIES = ("blip2", "instructblip")
#: The families as parameters: InstructBLIP's checks run in the full suite only (the fast subset keeps BLIP-2's and
#: the InstructBLIP-only test of the instruction's rows).
FAMILY_PARAMS = ["blip2", pytest.param("instructblip", marks=LENGTHY)]
IMAGE_TOKEN = BLIP2_VOCAB["<image>"]


@functools.lru_cache(maxsize=2)
def _model(family: str) -> torch.nn.Module:
    return tiny_blip2(seed=0) if family == "blip2" else tiny_instructblip(seed=0)


def _images(model: torch.nn.Module, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.vision_model(pixel_values=torch.randn(1, 3, 32, 32))[0]


def _inputs(family: str) -> dict[str, torch.Tensor]:
    model = _model(family)
    prompt = ["[CLS]", "question", ":", "what", "color", "is", "the", "circle", "?", "answer", ":"]
    clean = {"image_embeds": _images(model, 1), "input_ids": torch.tensor([[BLIP2_VOCAB[w] for w in prompt]]),
             "answer_id": torch.tensor([BLIP2_VOCAB["red"]])}
    if family == "instructblip":
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
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(7))
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
    projected queries scattered into the image tokens' embeddings), without circuit_reference_blip2."""
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
        logits = model.language_model(inputs_embeds=embeds).logits
    return float(torch.log_softmax(logits[0, -1], -1)[inputs["answer_id"][0]])


def _capture(store: dict[str, Any], key: str, pick: Callable[[Any, Any], Any]) -> Callable[..., None]:
    def hook(module: torch.nn.Module, args: Any, output: Any = None) -> None:
        store[key] = pick(args, output)

    return hook


def _first(args: Any, output: Any) -> Any:
    return (output if output is not None else args)[0]


def _whole(args: Any, output: Any) -> Any:
    return output


# ================================================================================================================
# Part A: the reference alone
# ----------------------------------------------------------------------------------------------------------------
# The graph


def _expected_edge_count() -> int:
    """Counted from the definition: per channel, the nodes upstream of it."""
    qf_per_layer = [HEADS * (2 if layer in CROSS else 1) + 1 for layer in range(LAYERS)]
    qf_nodes = 1 + sum(qf_per_layer)
    total = 0
    for layer in range(LAYERS):
        before = 1 + sum(qf_per_layer[:layer])
        total += 3 * HEADS * before  # self-attention q, k, v
        if layer in CROSS:
            total += HEADS * (before + HEADS) + 2 * HEADS  # cross-attention q; k and v from img
        total += before + HEADS * (2 if layer in CROSS else 1)  # the MLP
    for layer in range(LAYERS):
        before = qf_nodes + 1 + (HEADS + 1) * layer
        total += 3 * HEADS * before + before + HEADS
    return total + qf_nodes + 1 + (HEADS + 1) * LAYERS


def test_graph_counts_follow_the_architecture(model: torch.nn.Module) -> None:
    qf_nodes = 1 + sum(HEADS * (2 if layer in CROSS else 1) + 1 for layer in range(LAYERS))
    assert len(reference_nodes(model)) == 1 + qf_nodes + 1 + (HEADS + 1) * LAYERS + 1
    assert len(reference_channels(model)) == (LAYERS * (3 * HEADS + 1) + len(CROSS) * 3 * HEADS
                                              + LAYERS * (3 * HEADS + 1) + 1)
    edges = reference_edges(model)
    assert len(edges) == len(set(edges)) == _expected_edge_count() == 1692


@pytest.mark.parametrize("edge, present", [
    ("img → qf.L0.X0.k", True), ("img → qf.L2.X3.v", True), ("img → qf.L0.X0.q", False),
    ("img → qf.L0.H0.k", False), ("img → lm.L0.H0.k", False), ("img → out", False), ("img → qf.L1.X0.k", False),
    ("qf.emb → qf.L0.H0.q", True), ("qf.emb → lm.L2.H1.v", True), ("qf.emb → out", True),
    ("qf.L0.H1 → qf.L0.H2.q", False), ("qf.L0.H1 → qf.L0.X2.q", True), ("qf.L0.X1 → qf.L0.X2.q", False),
    ("qf.L0.X1 → qf.L0.mlp", True), ("qf.L0.H1 → qf.L0.mlp", True), ("qf.L0.mlp → qf.L1.H0.k", True),
    ("qf.L1.mlp → qf.L0.H0.k", False), ("qf.L1.H0 → qf.L2.X0.k", False), ("qf.L1.H0 → qf.L2.X0.q", True),
    ("qf.L2.mlp → lm.L0.H0.q", True), ("qf.L0.H3 → lm.L2.mlp", True), ("qf.L2.X1 → out", True),
    ("lm.emb → lm.L0.H0.q", True), ("lm.emb → out", True), ("lm.emb → qf.L2.mlp", False),
    ("lm.L0.H1 → lm.L0.H2.q", False), ("lm.L0.H1 → lm.L0.mlp", True), ("lm.L0.mlp → lm.L1.H0.k", True),
    ("lm.L1.mlp → lm.L0.H0.k", False), ("lm.L0.mlp → lm.L0.mlp", False), ("lm.L2.mlp → out", True),
    ("lm.L0.H0 → qf.L2.mlp", False), ("qf.L0.H0 → qf.L0.H0.q", False),
])
def test_edges_listed(model: torch.nn.Module, edge: str, present: bool) -> None:
    assert (edge in reference_edges(model)) is present


def test_edges_are_exactly_the_direct_dependencies_of_a_frozen_forward(model: torch.nn.Module,
                                                                       clean: dict[str, torch.Tensor]) -> None:
    """Perturb one node's output with every other node frozen: the channels whose input moves are its receivers."""
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


def test_the_instructions_rows_of_the_last_q_former_layer_reach_nothing() -> None:
    """InstructBLIP's language model reads the Q-Former's query rows only: the last layer's MLP output at the
    instruction's rows moves no channel, at the query rows every channel it sends to."""
    model = _model("instructblip")
    inputs = prepare_inputs(model, _inputs("instructblip"))
    _, plan = run(model, inputs)
    frozen = {name: plan.outputs[name] for name in reference_nodes(model)[:-1]}
    base = frozen_inputs(model, inputs, frozen, reference_channels(model))
    last = f"qf.L{LAYERS - 1}.mlp"
    for rows, moves in ((slice(QUERIES, None), False), (slice(0, QUERIES), True)):
        value = frozen[last].clone()
        value[:, rows] += 1.0
        moved = frozen_inputs(model, inputs, {**frozen, last: value}, reference_channels(model))
        changed = {channel for channel in moved if not torch.equal(moved[channel], base[channel])}
        assert changed == ({r for u, r in map(parse_edge, reference_edges(model)) if u == last} if moves else set())


@pytest.mark.parametrize("edge", ["lm.L2.H0 → lm.L1.H0.q", "img → qf.L0.H0.q", "lm.L0.H0 → lm.L0.H1.q",
                                  "out → lm.L0.mlp", "qf.L0.mlp → qf.L0.mlp", "img → lm.L0.H0.k",
                                  "img → qf.L1.X0.k", "qf.L9.H0 → out", "qf.L0.H0 → lm.L9.mlp",
                                  "qf.L0.H0 → qf.L1.H0", "qf.L0.H0", "qf.L0.H0 → → out", "lm.L0.H0 → qf.L2.mlp"])
def test_an_edge_the_receiver_cannot_reach_is_refused(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                                                      noisy: dict[str, torch.Tensor], edge: str) -> None:
    with pytest.raises(BlipTraceError):
        reference_edge_score(model, clean, noisy, edge)


def test_arrows_and_senders(model: torch.nn.Module) -> None:
    assert parse_edge("qf.L1.H0 -> lm.L2.H3.k") == parse_edge("qf.L1.H0 → lm.L2.H3.k") == ("qf.L1.H0", "lm.L2.H3.k")
    assert check_edge(model, "qf.L1.H0->lm.L2.H3.k") == ("qf.L1.H0", "lm.L2.H3.k")
    assert reference_senders(model, "qf.L0.H2.k") == ["qf.emb"]
    assert reference_senders(model, "qf.L0.X2.q") == ["qf.emb", *(f"qf.L0.H{h}" for h in range(HEADS))]
    assert reference_senders(model, "qf.L2.X1.v") == ["img"]
    assert reference_senders(model, "lm.L0.H0.q") == [n for n in reference_nodes(model)
                                                      if n.startswith("qf.")] + ["lm.emb"]
    assert reference_senders(model, "out") == [n for n in reference_nodes(model) if n[:3] in ("qf.", "lm.")]
    with pytest.raises(BlipTraceError, match="receiver channel"):
        reference_senders(model, "lm.L0.H0")
    with pytest.raises(BlipTraceError, match="receiver channel"):
        reference_senders(model, "qf.L1.X0.k")  # layer 1 has no cross-attention


def test_inputs_are_checked(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                            noisy: dict[str, torch.Tensor], family: str) -> None:
    with pytest.raises(BlipTraceError, match="reaches"):
        reference_path_patch(model, clean, noisy, ["img"], ["qf.L0.X0.k", "qf.L1.H0.q"])
    with pytest.raises(BlipTraceError, match="sender"):
        reference_path_patch(model, clean, noisy, ["out"], ["out"])
    other = clean["input_ids"].clone()
    other[0, 4] = BLIP2_VOCAB["shape"]
    with pytest.raises(BlipTraceError, match="image embeddings only"):
        reference_path_patch(model, clean, dict(clean, input_ids=other), ["qf.emb"], ["out"])
    with pytest.raises(BlipTraceError, match="direction"):
        reference_path_patch(model, clean, noisy, ["img"], ["qf.L0.X0.k"], direction="sideways")
    if family == "instructblip":
        with pytest.raises(BlipTraceError, match="qformer_input_ids"):
            reference_score(model, {k: v for k, v in clean.items() if k != "qformer_input_ids"})
    else:
        with pytest.raises(BlipTraceError, match="no instruction"):
            reference_score(model, dict(clean, qformer_input_ids=clean["input_ids"]))


def test_a_processors_leading_image_tokens_are_read_as_the_query_rows(model: torch.nn.Module,
                                                                     clean: dict[str, torch.Tensor]) -> None:
    with_image_tokens = torch.cat([torch.full((1, QUERIES), IMAGE_TOKEN), clean["input_ids"]], dim=1)
    assert reference_score(model, dict(clean, input_ids=with_image_tokens)) == reference_score(model, clean)


def test_hooks_are_removed_even_when_a_forward_fails(model: torch.nn.Module, clean: dict[str, torch.Tensor]) -> None:
    with pytest.raises(RuntimeError):
        run(model, prepare_inputs(model, clean), Plan(channels={"lm.L0.H0.q": torch.zeros(1, 1, 3)}))
    with pytest.raises(RuntimeError):
        run(model, prepare_inputs(model, clean), Plan(channels={"qf.L0.mlp": torch.zeros(1, 1, 3)}))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------------------------------------------
# Path patching identities


def test_patching_nothing_returns_the_base_score_the_models_own(model: torch.nn.Module, family: str,
                                                                clean: dict[str, torch.Tensor],
                                                                noisy: dict[str, torch.Tensor]) -> None:
    base = reference_score(model, clean)
    assert_close(base, _plain(model, clean))
    assert reference_path_patch(model, clean, noisy, [], []) == base
    assert reference_path_patch(model, clean, noisy, [], [], direction="denoise") == reference_score(model, noisy)
    assert abs(base - reference_score(model, noisy)) > 0.05  # a corruption that matters
    # the whole model's forward from pixels, as transformers runs it
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 32, 32)
    ids = torch.cat([torch.full((1, QUERIES), IMAGE_TOKEN), clean["input_ids"]], dim=1)
    extra = {"qformer_input_ids": clean["qformer_input_ids"]} if family == "instructblip" else {}
    with torch.no_grad():
        logits = model(pixel_values=pixels, input_ids=ids, **extra).logits
    assert_close(base, float(torch.log_softmax(logits[0, -1], -1)[clean["answer_id"][0]]))
    from_pixels = {k: v for k, v in clean.items() if k != "image_embeds"} | {"pixel_values": pixels}
    assert reference_score(model, from_pixels) == base
    assert reference_score(model, clean, score="prob") == pytest.approx(float(np.exp(base)), rel=1e-6)


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_every_node_to_every_channel_is_the_source_run(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                                                       counterfactual: dict[str, torch.Tensor],
                                                       direction: str) -> None:
    senders = reference_nodes(model)[:-1]
    source = counterfactual if direction == "noise" else clean
    for receivers in (reference_channels(model), ["out"]):
        assert_close(reference_path_patch(model, clean, counterfactual, senders, receivers, direction),
                     reference_score(model, source))


def test_img_to_every_cross_attention_key_and_value_is_the_corrupted_run(
        model: torch.nn.Module, clean: dict[str, torch.Tensor], counterfactual: dict[str, torch.Tensor]) -> None:
    receivers = [c for c in reference_channels(model) if ".X" in c and c[-1] in "kv"]
    assert len(receivers) == 2 * HEADS * len(CROSS)
    patched = reference_path_patch(model, clean, counterfactual, ["img"], receivers)
    assert_close(patched, _plain(model, counterfactual))
    assert abs(patched - reference_score(model, clean)) > 1e-3


def test_the_embeddings_edges_score_exactly_zero(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                                                 counterfactual: dict[str, torch.Tensor]) -> None:
    """The corruption leaves the prompt, the instruction and the queries alike: qf.emb and lm.emb send the same
    values in both runs, so their edges score 0 (while an image edge does not)."""
    for edge in ("qf.emb → qf.L0.H1.q", "qf.emb → lm.L1.H2.v", "lm.emb → lm.L0.H0.k", "lm.emb → out"):
        assert reference_edge_score(model, clean, counterfactual, edge) == 0.0, edge
    assert reference_edge_score(model, clean, counterfactual, "img → qf.L2.X1.v") != 0.0


def test_what_the_last_prompt_position_cannot_see_scores_exactly_zero(
        model: torch.nn.Module, clean: dict[str, torch.Tensor],
        counterfactual: dict[str, torch.Tensor]) -> None:
    """The score reads the prompt's last position, a text row, where the Q-Former adds nothing directly: its edges
    into ``out``, into the last OPT layer's MLP and into that layer's queries score exactly 0 (a query row's change
    reaches the last position only through a later layer's keys and values), while the same senders' edges into
    earlier layers do not. The Q-Former's layer-0 self-attention reads only the learned queries (and InstructBLIP's
    instruction), the same in both runs: its heads' edges score exactly 0, layer 1's do not."""
    last = f"lm.L{LAYERS - 1}"
    for edge in ("qf.L2.mlp → out", "qf.L0.X2 → out", f"qf.L2.mlp → {last}.mlp", f"qf.L2.X1 → {last}.H0.q"):
        assert reference_edge_score(model, clean, counterfactual, edge) == 0.0, edge
    for edge in ("qf.L2.mlp → lm.L0.mlp", "qf.L2.X1 → lm.L1.H0.q", f"qf.L2.X1 → {last}.H0.k"):
        assert abs(reference_edge_score(model, clean, counterfactual, edge)) > 1e-6, edge
    assert reference_edge_score(model, clean, counterfactual, "qf.L0.H1 → qf.L2.mlp") == 0.0
    assert abs(reference_edge_score(model, clean, counterfactual, "qf.L1.H1 → qf.L2.mlp")) > 1e-6


def test_the_last_mlp_to_out_is_patching_its_output(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                                                    counterfactual: dict[str, torch.Tensor]) -> None:
    """OPT's last MLP feeds only ``out``, so path patching it there is plain activation patching of fc2's output."""
    fc2 = model.language_model.model.decoder.layers[-1].fc2
    store: dict[str, Any] = {}
    _plain(model, counterfactual, (fc2, _capture(store, "mlp", _whole), False))
    expected = _plain(model, clean, (fc2, lambda m, a, o: store["mlp"], False))
    assert_close(reference_path_patch(model, clean, counterfactual, [f"lm.L{LAYERS - 1}.mlp"], ["out"]), expected)
    assert abs(expected - _plain(model, clean)) > 1e-4


def _lm_head_to_mlp_by_hand(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                            corrupted: dict[str, torch.Tensor]) -> float:
    """lm.L0.H1 → lm.L2.mlp from the modules: layer 0's out_proj reads head 1's slice from the corrupted run;
    the residual stream up to layer 2's MLP is summed with every other node frozen at its clean output (layer 0's
    MLP, layers 1 and 2's attention); only layer 2's fc1 reads the result."""
    zero, one, two = model.language_model.model.decoder.layers[:3]
    size = zero.self_attn.head_dim
    store: dict[str, Any] = {}
    _plain(model, corrupted, (zero.self_attn.out_proj, _capture(store, "bad", _first), True))
    _plain(model, clean, (zero, _capture(store, "h0", _first), True),
           (zero.self_attn.out_proj, _capture(store, "ctx", _first), True),
           (zero.fc2, _capture(store, "m0", _whole), False), (one.self_attn, _capture(store, "a1", _first), False),
           (one.fc2, _capture(store, "m1", _whole), False), (two.self_attn, _capture(store, "a2", _first), False))
    context = store["ctx"].clone()
    context[..., size:2 * size] = store["bad"][..., size:2 * size]
    with torch.no_grad():
        h = store["h0"] + zero.self_attn.out_proj(context)
        h = h + store["m0"].view_as(h)
        h = h + store["a1"]
        h = h + store["m1"].view_as(h)
        h = h + store["a2"]
        mlp_input = two.final_layer_norm(h).reshape(-1, h.shape[-1])
    return _plain(model, clean, (two.fc1, lambda m, a: (mlp_input,), True))


def _cross_head_to_value_by_hand(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                                 corrupted: dict[str, torch.Tensor]) -> float:
    """qf.L2.X1 → lm.L1.H2.v by hand: the Q-Former's last layer recomputed with cross-attention head 1's context
    slice from the corrupted run (its self-attention output and MLP output frozen clean); its query rows projected
    into the language model's rows 0..Q-1 (plus their positional embeddings); OPT's layer 0 with its attention and
    MLP frozen clean; only head 2's value rows of layer 1 read the result."""
    last = model.qformer.encoder.layer[2]
    cross, size = last.crossattention, last.crossattention.attention.attention_head_size
    decoder = model.language_model.model.decoder
    zero, one = decoder.layers[:2]
    store: dict[str, Any] = {}
    _plain(model, corrupted, (cross.attention, _capture(store, "bad", _first), False))
    _plain(model, clean, (cross.attention, _capture(store, "ctx", _first), False),
           (last.attention, _capture(store, "after_self", _whole), False),
           (last.output_query.dense, _capture(store, "mlp", _whole), False),
           (decoder.embed_positions, _capture(store, "positions", _whole), False),
           (zero, _capture(store, "h0", _first), True), (zero.self_attn, _capture(store, "a0", _first), False),
           (zero.fc2, _capture(store, "m0", _whole), False))
    context = store["ctx"].clone()
    context[..., size:2 * size] = store["bad"][..., size:2 * size]
    rows = slice(2 * size, 3 * size)
    with torch.no_grad():
        after_cross = cross.output(context, store["after_self"][:, :QUERIES])
        queries = last.output_query.LayerNorm(store["mlp"] + after_cross)
        h = store["h0"].clone()
        h[:, :QUERIES] = model.language_projection(queries) + store["positions"][:, :QUERIES]
        h = h + store["a0"]
        h = h + store["m0"].view_as(h)
        patched_rows = one.self_attn.v_proj(one.self_attn_layer_norm(h))[..., rows]

    def value_hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[..., rows] = patched_rows
        return output

    return _plain(model, clean, (one.self_attn.v_proj, value_hook, False))


def _self_head_to_mlp_by_hand(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                              corrupted: dict[str, torch.Tensor]) -> float:
    """qf.L1.H0 → qf.L1.mlp by hand (layer 1 has no cross-attention): the self-attention output recomputed with
    head 0's slice corrupted; the MLP reads it at every row (the queries through intermediate_query, InstructBLIP's
    instruction through intermediate), the residual around the MLP stays clean."""
    layer = model.qformer.encoder.layer[1]
    attention, size = layer.attention, layer.attention.attention.attention_head_size
    store: dict[str, Any] = {}
    _plain(model, corrupted, (attention.attention, _capture(store, "bad", _first), False))
    _plain(model, clean, (attention.attention, _capture(store, "ctx", _first), False),
           (layer, _capture(store, "x", _first), True))
    context = store["ctx"].clone()
    context[..., :size] = store["bad"][..., :size]
    with torch.no_grad():
        mlp_input = attention.output(context, store["x"])
    hooks = [(layer.intermediate_query, lambda m, a: (mlp_input[:, :QUERIES],), True)]
    if getattr(layer, "intermediate", None) is not None:
        hooks.append((layer.intermediate, lambda m, a: (mlp_input[:, QUERIES:],), True))
    return _plain(model, clean, *hooks)


@pytest.mark.parametrize("edge, by_hand", [("lm.L0.H1 → lm.L2.mlp", _lm_head_to_mlp_by_hand),
                                           ("qf.L2.X1 → lm.L1.H2.v", _cross_head_to_value_by_hand),
                                           ("qf.L1.H0 → qf.L1.mlp", _self_head_to_mlp_by_hand)])
def test_single_edges_match_the_definition_worked_by_hand(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                                                          counterfactual: dict[str, torch.Tensor], edge: str,
                                                          by_hand: Callable[..., float]) -> None:
    expected = by_hand(model, clean, counterfactual) - _plain(model, clean)
    assert abs(expected) > 1e-5
    assert_close(reference_edge_score(model, clean, counterfactual, edge), expected, scale=10.0)
    denoised = by_hand(model, counterfactual, clean) - _plain(model, counterfactual)
    assert_close(reference_edge_score(model, clean, counterfactual, edge, direction="denoise"), denoised, scale=10.0)


def test_rows_of_a_batch_are_patched_independently_and_averaged(
        model: torch.nn.Module, clean: dict[str, torch.Tensor], noisy: dict[str, torch.Tensor],
        counterfactual: dict[str, torch.Tensor]) -> None:
    def stack(*rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: torch.cat([row[key] for row in rows]) for key in rows[0]}

    edge = "qf.L0.X1 → lm.L1.H2.v"
    both = reference_edge_score(model, stack(clean, clean), stack(noisy, counterfactual), edge)
    one, two = (reference_edge_score(model, clean, other, edge) for other in (noisy, counterfactual))
    assert one != two
    assert_close(both, (one + two) / 2, scale=10.0)


# ----------------------------------------------------------------------------------------------------------------
# Circuit runs


@pytest.mark.slow
def test_circuit_with_every_edge_is_the_clean_run_and_with_none_the_corrupted_run(
        model: torch.nn.Module, clean: dict[str, torch.Tensor], counterfactual: dict[str, torch.Tensor]) -> None:
    edges = reference_edges(model)
    assert_close(reference_circuit_score(model, clean, counterfactual, edges), reference_score(model, clean))
    assert_close(reference_circuit_score(model, clean, counterfactual, []), _plain(model, counterfactual))
    assert reference_faithfulness(model, clean, counterfactual, edges) == pytest.approx(1.0)
    assert reference_faithfulness(model, clean, counterfactual, []) == pytest.approx(0.0, abs=1e-4)


@pytest.mark.slow
def test_circuit_keeping_only_the_edges_into_out_is_the_corrupted_run(
        model: torch.nn.Module, clean: dict[str, torch.Tensor], counterfactual: dict[str, torch.Tensor]) -> None:
    """Kept edges carry the circuit run's own values: a language model whose every input is corrupted outputs
    corrupted values, whatever the edges into ``out`` keep."""
    into_out = [e for e in reference_edges(model) if parse_edge(e)[1] == "out"]
    assert_close(reference_circuit_score(model, clean, counterfactual, into_out), _plain(model, counterfactual))


@pytest.mark.slow
@pytest.mark.parametrize("edge", ["lm.L1.mlp → out", "img → qf.L2.X1.v", "qf.L1.H1 → qf.L2.mlp",
                                  "qf.L2.X0 → lm.L0.H3.k", "lm.L0.H2 → lm.L1.H0.v", "qf.L1.mlp → lm.L1.mlp"])
def test_dropping_one_edge_from_the_full_circuit_is_that_edges_path_patch(
        model: torch.nn.Module, clean: dict[str, torch.Tensor], counterfactual: dict[str, torch.Tensor],
        edge: str) -> None:
    kept = [e for e in reference_edges(model) if parse_edge(e) != parse_edge(edge)]
    effect = reference_edge_score(model, clean, counterfactual, edge)
    assert abs(effect) > 1e-6
    assert_close(reference_circuit_score(model, clean, counterfactual, kept), reference_score(model, clean) + effect,
                 scale=10.0)


# ================================================================================================================
# Part B: the package's engine against the reference

QUESTION, ANSWER = "what color is the circle?", "red"


@functools.lru_cache(maxsize=2)
def _bundle(family: str) -> Any:
    from blip_trace_widgets import load_model

    pair = ((tiny_blip2(seed=3), tiny_blip2_processor(queries=QUERIES)) if family == "blip2"
            else (tiny_instructblip(seed=3), tiny_instructblip_processor(queries=QUERIES)))
    return load_model(pair, device="cpu")


def _picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))


def _engine(function: Callable[..., Any], bundle: Any, *args: Any, **kwargs: Any) -> Any:
    """``function(bundle, ...)`` from the engine, or a skip while the engine refuses BLIP-2 models (a BlipTraceError
    on valid inputs: the engine does not cover them yet)."""
    try:
        return function(bundle, *args, **kwargs)
    except BlipTraceError as error:
        pytest.skip(f"the circuits engine does not cover {type(bundle.model).__name__} yet: "
                    f"{function.__name__} refuses it ({str(error)[:160]})")


def _engine_graph(bundle: Any) -> Any:
    from blip_trace_widgets.circuits import circuit_graph

    return _engine(circuit_graph, bundle)


@functools.lru_cache(maxsize=2)
def _engine_case(family: str) -> tuple[Any, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(bundle, clean, noisy, counterfactual): the reference's dicts on the bundle's model, the image embeddings
    from the bundle's own image processor; the noise (3 standard deviations, seeded) is handed to the engine as the
    corrupted embeddings themselves, the counterfactual as its picture."""
    bundle = _bundle(family)
    clean = blip2_inputs(bundle.model, bundle.processor, _picture(0), QUESTION, ANSWER)
    images = clean["image_embeds"]
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)) * 3 * images.std()
    noisy = dict(clean, image_embeds=images + noise)
    other = blip2_inputs(bundle.model, bundle.processor, _picture(1), QUESTION, ANSWER)
    return bundle, clean, noisy, dict(clean, image_embeds=other["image_embeds"])


def _corruption(kind: str, corrupted: dict[str, Any]) -> Any:
    return corrupted["image_embeds"] if kind == "noise" else _picture(1)


def _engine_edges(family: str, kind: str, direction: str, edges: list[str]) -> Any:
    from blip_trace_widgets.circuits import edge_scores

    bundle, clean, noisy, other = _engine_case(family)
    corrupted = noisy if kind == "noise" else other
    return _engine(edge_scores, bundle, _picture(0), QUESTION, method="exact", corruption=_corruption(kind, corrupted),
                       direction=direction, samples=1, answer=ANSWER,
                       edges=edges)


EDGES = ["img → qf.L0.X0.k", "img → qf.L2.X3.v", "qf.emb → qf.L0.H1.q", "qf.L0.X1 → qf.L1.H0.k",
         "qf.L1.H2 → qf.L2.X1.q", "qf.L1.mlp → qf.L2.mlp", "qf.L0.H2 → qf.L0.X1.q", "qf.L2.X1 → lm.L1.H2.v",
         "qf.L0.mlp → lm.L0.H3.k", "qf.L2.mlp → out", "lm.emb → lm.L0.H0.q", "lm.L0.H1 → lm.L2.mlp",
         "lm.L1.mlp → lm.L2.H0.q", "lm.L2.H3 → out"]


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
def test_engine_clean_and_corrupted_runs_are_the_references(family: str) -> None:
    """The inputs agree (image embeddings, prompt, instruction, answer token): the engine's clean and corrupted
    scores are the reference's, and one exact edge score is too (the fast subset's engine check)."""
    _engine_graph(_bundle(family))
    bundle, clean, noisy, _ = _engine_case(family)
    edge = "qf.L2.X1 → lm.L1.H2.v"
    result = _engine_edges(family, "noise", "noise", [edge])
    assert_close(result.clean_score, reference_score(bundle.model, clean), scale=10.0)
    assert_close(result.corrupted_score, reference_score(bundle.model, noisy), scale=10.0)
    assert list(result.edges) == [edge]
    assert_close(float(result.scores[0]), reference_edge_score(bundle.model, clean, noisy, edge), scale=10.0)


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
    assert max(abs(v) for v in theirs.values()) > 1e-3, "the edges chosen change nothing: the test would pass anyway"
    wrong = {e: (ours[e], theirs[e]) for e in EDGES
             if not close(ours[e], theirs[e], scale=10.0)}
    assert not wrong, f"engine vs reference (edge: (engine, reference)): {wrong}"


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_engine_path_from_several_senders_to_several_receivers_equals_the_reference(family: str) -> None:
    from blip_trace_widgets.circuits import path_patch

    _engine_graph(_bundle(family))
    bundle, clean, _, other = _engine_case(family)
    senders = ["img", "qf.L0.X2", "qf.L1.mlp", "lm.L0.H1"]
    receivers = ["qf.L2.X1.k", "qf.L2.H0.v", "lm.L1.H2.q", "lm.L2.mlp", "out"]
    result = _engine(path_patch, bundle, _picture(0), QUESTION, sender=senders, receivers=receivers,
                        corruption=_corruption("counterfactual", other), samples=1, answer=ANSWER)
    base = reference_score(bundle.model, clean)
    theirs = reference_path_patch(bundle.model, clean, other, senders, receivers) - base
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
        result = _engine(faithfulness, bundle, _picture(0), QUESTION, kept, corruption=_corruption("noise", noisy),
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

    graph = _engine_graph(_bundle("blip2"))
    bundle, clean, noisy, _ = _engine_case("blip2")
    images = clean["image_embeds"]
    second = images + torch.randn(images.shape, generator=torch.Generator().manual_seed(1)) * 3 * images.std()
    draws = torch.cat([noisy["image_embeds"], second])
    rows = {key: torch.cat([value, value]) for key, value in clean.items()}
    corrupted = dict(rows, image_embeds=draws)
    edges = ["qf.L2.X1 → lm.L1.H2.v", "img → qf.L0.X3.k", "lm.L0.H1 → lm.L2.mlp"]
    result = _engine(edge_scores, bundle, _picture(0), QUESTION, method="exact", corruption=draws, samples=2,
                     answer=ANSWER, edges=edges)
    ours = dict(zip(result.edges, np.asarray(result.scores, dtype=float)))
    for edge in edges:
        one, two = (reference_edge_score(bundle.model, clean, dict(clean, image_embeds=d[None]), edge) for d in draws)
        assert one != two
        assert_close(ours[edge], reference_edge_score(bundle.model, rows, corrupted, edge), scale=10.0,
                     err_msg=edge)
        assert_close(ours[edge], (one + two) / 2, scale=10.0, err_msg=edge)
    some = [e for e, keep in zip(graph.edges, np.random.default_rng(1).random(len(graph.edges)) < 0.3) if keep]
    circuit = _engine(faithfulness, bundle, _picture(0), QUESTION, some, corruption=draws, samples=2, answer=ANSWER)
    assert_close(circuit.circuit_score, reference_circuit_score(bundle.model, rows, corrupted, some), scale=10.0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["demo-blip2", "demo-instructblip"])
def test_engine_equals_the_reference_on_the_trained_demo_models(name: str) -> None:
    """The bundled demo models (trained on easy-VQA: 4 Q-Former layers, 6 OPT layers) on a demo question, with the
    image of a yellow rectangle as the counterfactual for "what is the color of the triangle?" (red): exact edges in
    both directions, and a circuit of 30% of the edges."""
    from blip_trace_widgets import demo_samples, load_model
    from blip_trace_widgets.circuits import edge_scores, faithfulness

    bundle = load_model(name)
    graph = _engine_graph(bundle)
    model = bundle.model
    samples = demo_samples()
    image, question, answer = samples[0]
    clean = blip2_inputs(model, bundle.processor, image, question, answer)
    other = dict(clean, image_embeds=blip2_inputs(model, bundle.processor, samples[3].image, question,
                                                  answer)["image_embeds"])
    assert sorted(graph.edges) == sorted(reference_edges(model))
    edges = ["img → qf.L0.X1.v", "qf.L0.X2 → qf.L1.H0.k", "qf.L1.mlp → qf.L2.X3.q", "qf.L2.X1 → lm.L0.H2.v",
             "qf.L3.mlp → lm.L3.H1.k", "lm.emb → lm.L1.mlp", "lm.L1.H3 → lm.L4.H0.v", "lm.L5.mlp → out"]
    for direction in ("noise", "denoise"):
        result = _engine(edge_scores, bundle, image, question, method="exact", corruption=samples[3].image,
                         direction=direction, samples=1, answer=answer,
                         edges=edges)
        base = reference_score(model, clean if direction == "noise" else other)
        assert_close(result.clean_score, reference_score(model, clean), scale=10.0)
        assert_close(result.corrupted_score, reference_score(model, other), scale=10.0)
        assert abs(result.clean_score - result.corrupted_score) > 1.0, "a counterfactual that matters"
        ours = dict(zip(result.edges, np.asarray(result.scores, dtype=float)))
        theirs = {e: reference_edge_score(model, clean, other, e, direction) for e in edges}
        assert max(abs(v) for v in theirs.values()) > 1e-3
        wrong = {e: (ours[e], theirs[e]) for e in edges if not close(ours[e], theirs[e], scale=10.0 + abs(base))}
        assert not wrong, f"{direction}: engine vs reference (edge: (engine, reference)): {wrong}"
    some = [e for e, keep in zip(graph.edges, np.random.default_rng(0).random(len(graph.edges)) < 0.3) if keep]
    circuit = _engine(faithfulness, bundle, image, question, some, corruption=samples[3].image, samples=1,
                      answer=answer)
    assert_close(circuit.circuit_score, reference_circuit_score(model, clean, other, some), scale=10.0)
