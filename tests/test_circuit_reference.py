"""Tests of the reference loops in circuit_reference.py on a tiny random BLIP VQA model (3 layers, 4 heads): the
graph against the computation, identities of path patching and circuit runs, and single edges worked out by hand
from the model's modules."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from blip_trace_widgets.errors import BlipTraceError
from circuit_reference import (
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
    vqa_inputs,
)
from tiny_blip import VOCAB, tiny_model
from tolerance import assert_close

LAYERS, HEADS = 3, 4


def _ids(*words: str) -> torch.Tensor:
    return torch.tensor([[VOCAB["[CLS]"], *(VOCAB[w] for w in words), VOCAB["[SEP]"]]])


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model(seed=0, layers=LAYERS).eval()


def _image(model: torch.nn.Module, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.vision_model(pixel_values=torch.randn(1, 3, 32, 32))[0]


@pytest.fixture(scope="module")
def clean(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {"input_ids": _ids("what", "color", "is", "the", "circle", "?"), "image_embeds": _image(model, 1),
            "answer_ids": torch.tensor([[VOCAB["[DEC]"], VOCAB["red"], VOCAB["[SEP]"]]])}


@pytest.fixture(scope="module")
def noisy(clean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image embeddings with Gaussian noise (seeded), the question and answer as in the clean inputs."""
    generator = torch.Generator().manual_seed(7)
    images = clean["image_embeds"]
    return dict(clean, image_embeds=images + torch.randn(images.shape, generator=generator))


@pytest.fixture(scope="module")
def counterfactual(model: torch.nn.Module, clean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Another image and another question of the same length."""
    return dict(clean, input_ids=_ids("what", "shape", "is", "the", "red", "?"), image_embeds=_image(model, 2))


def _score(logits: torch.Tensor, answer: torch.Tensor) -> float:
    return float(torch.log_softmax(logits[:, 0], -1)[0, answer[0, 1]])


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
    """The score of the model's own modules under the given hooks, without circuit_reference's machinery."""
    images = inputs["image_embeds"]
    with torch.no_grad(), _hooks(*pairs):
        question = model.text_encoder(input_ids=inputs["input_ids"], encoder_hidden_states=images,
                                      encoder_attention_mask=torch.ones(images.shape[:-1], dtype=torch.long))[0]
        logits = model.text_decoder(input_ids=inputs["answer_ids"], encoder_hidden_states=question,
                                    use_cache=False).logits
    return _score(logits, inputs["answer_ids"])


def _capture(store: dict[str, Any], key: str, pick: Callable[[Any, Any], Any]) -> Callable[..., None]:
    def hook(module: torch.nn.Module, args: Any, output: Any = None) -> None:
        store[key] = pick(args, output)

    return hook


# ----------------------------------------------------------------------------------------------------------------
# The graph


def test_graph_counts_follow_the_architecture(model: torch.nn.Module) -> None:
    per_layer = 2 * HEADS + 1
    block = 1 + LAYERS * per_layer
    assert len(reference_nodes(model)) == 1 + 2 * block + 1
    assert len(reference_channels(model)) == 2 * LAYERS * (6 * HEADS + 1) + 1
    within = sum(3 * HEADS * (1 + per_layer * n) + HEADS * (1 + per_layer * n + HEADS)
                 + (1 + per_layer * n + 2 * HEADS) for n in range(LAYERS))
    expected = 2 * within + 2 * HEADS * LAYERS * 1 + 2 * HEADS * LAYERS * block + block
    edges = reference_edges(model)
    assert len(edges) == len(set(edges)) == expected


@pytest.mark.parametrize("edge, present", [
    ("img → qe.L0.X0.k", True), ("img → qe.L2.X3.v", True), ("img → qe.L0.X0.q", False),
    ("img → dec.L0.X0.k", False), ("qe.emb → dec.L0.X0.k", True), ("qe.L2.mlp → dec.L1.X1.v", True),
    ("qe.L2.mlp → dec.L1.X1.q", False), ("dec.L0.H1 → dec.L0.H2.q", False), ("dec.L0.H1 → dec.L0.X2.q", True),
    ("dec.L0.X1 → dec.L0.X2.q", False), ("dec.L0.X1 → dec.L0.mlp", True), ("dec.L0.mlp → dec.L1.H0.k", True),
    ("dec.L1.mlp → dec.L0.H0.k", False), ("dec.L2.mlp → out", True), ("qe.L2.mlp → out", False),
    ("dec.emb → out", True), ("qe.L0.H0 → qe.L0.H0.q", False),
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


@pytest.mark.parametrize("edge", ["dec.L2.H0 → dec.L1.H0.q", "img → qe.L1.H0.q", "dec.L0.H0 → dec.L0.H1.q",
                                  "dec.L0.X0 → dec.L0.H1.q", "out → dec.L0.mlp", "qe.L0.mlp → dec.L0.mlp",
                                  "img → dec.L0.X0.k", "qe.L9.H0 → out", "qe.L0.H0 → qe.L9.mlp",
                                  "qe.L0.H0 → qe.L1.H0", "qe.L0.H0", "qe.L0.H0 → → out"])
def test_an_edge_the_receiver_cannot_reach_is_refused(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                                                      noisy: dict[str, torch.Tensor], edge: str) -> None:
    with pytest.raises(BlipTraceError):
        reference_edge_score(model, clean, noisy, edge)


def test_arrows(model: torch.nn.Module) -> None:
    assert parse_edge("qe.L1.H0 -> dec.L2.X3.k") == parse_edge("qe.L1.H0 → dec.L2.X3.k") == ("qe.L1.H0",
                                                                                               "dec.L2.X3.k")
    assert check_edge(model, "qe.L1.H0->dec.L2.X3.k") == ("qe.L1.H0", "dec.L2.X3.k")


def test_path_patch_refuses_receivers_no_sender_reaches(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                                                        noisy: dict[str, torch.Tensor]) -> None:
    with pytest.raises(BlipTraceError, match="reaches"):
        reference_path_patch(model, clean, noisy, ["img"], ["qe.L0.X0.k", "qe.L1.H0.q"])
    with pytest.raises(BlipTraceError, match="sender"):
        reference_path_patch(model, clean, noisy, ["out"], ["out"])
    with pytest.raises(BlipTraceError, match="shape"):
        reference_path_patch(model, clean, dict(clean, input_ids=_ids("what")), ["qe.emb"], ["out"])


def test_hooks_are_removed_even_when_a_forward_fails(model: torch.nn.Module, clean: dict[str, torch.Tensor]) -> None:
    with pytest.raises(RuntimeError):
        run(model, prepare_inputs(model, clean), Plan(channels={"qe.L0.H0.q": torch.zeros(1, 1, 3)}))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------------------------------------------
# Path patching identities


def test_patching_nothing_returns_the_base_score(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                                                 noisy: dict[str, torch.Tensor]) -> None:
    assert reference_score(model, clean) == _plain(model, clean)
    assert reference_path_patch(model, clean, noisy, [], []) == reference_score(model, clean)
    assert reference_path_patch(model, clean, noisy, [], [], direction="denoise") == reference_score(model, noisy)
    assert abs(reference_score(model, clean) - reference_score(model, noisy)) > 0.05  # a corruption that matters


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_every_node_to_every_channel_is_the_source_run(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                                                       counterfactual: dict[str, torch.Tensor],
                                                       direction: str) -> None:
    senders = reference_nodes(model)[:-1]
    source = counterfactual if direction == "noise" else clean
    for receivers in (reference_channels(model), ["out"]):
        assert_close(reference_path_patch(model, clean, counterfactual, senders, receivers, direction),
                     reference_score(model, dict(source, answer_ids=clean["answer_ids"])))


def test_img_to_every_question_cross_kv_corrupts_the_image_for_the_question_encoder_only(
        model: torch.nn.Module, clean: dict[str, torch.Tensor], counterfactual: dict[str, torch.Tensor]) -> None:
    receivers = [c for c in reference_channels(model) if c.startswith("qe.") and c[-2:] in (".k", ".v")
                 and ".X" in c]
    assert len(receivers) == 2 * HEADS * LAYERS
    patched = reference_path_patch(model, clean, counterfactual, ["img"], receivers)
    assert_close(patched, _plain(model, dict(clean, image_embeds=counterfactual["image_embeds"])))
    assert abs(patched - reference_score(model, clean)) > 1e-3


def test_question_encoder_to_every_decoder_cross_kv_is_the_corrupted_question_encoding(
        model: torch.nn.Module, clean: dict[str, torch.Tensor], counterfactual: dict[str, torch.Tensor]) -> None:
    senders = [n for n in reference_nodes(model) if n.startswith("qe.")]
    receivers = [c for c in reference_channels(model) if c.startswith("dec.") and ".X" in c and c[-1] in "kv"]
    assert_close(reference_path_patch(model, clean, counterfactual, senders, receivers),
                 _plain(model, counterfactual))


@pytest.mark.parametrize("block, receivers", [("dec", ["out"]), ("qe", None)])
def test_the_last_mlp_to_all_it_feeds_is_patching_its_output(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                                                             counterfactual: dict[str, torch.Tensor], block: str,
                                                             receivers: list[str] | None) -> None:
    """The last MLP of a block feeds nothing but its block's readers, so path patching it to all of them is plain
    activation patching of its output (hooks on the model's own modules)."""
    node = f"{block}.L{LAYERS - 1}.mlp"
    receivers = receivers or [r for u, r in map(parse_edge, reference_edges(model)) if u == node]
    dense = (model.text_encoder if block == "qe" else model.text_decoder.bert).encoder.layer[-1].output.dense
    store: dict[str, Any] = {}
    _plain(model, counterfactual, (dense, _capture(store, "mlp", lambda a, o: o), False))
    expected = _plain(model, clean, (dense, lambda m, a, o: store["mlp"], False))
    assert_close(reference_path_patch(model, clean, counterfactual, [node], receivers), expected)
    assert abs(expected - _plain(model, clean)) > 1e-4


def _cross_to_mlp_by_hand(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                          corrupted: dict[str, torch.Tensor]) -> float:
    """dec.L2.X1 → dec.L2.mlp worked out from the modules: the cross-attention sublayer recomputed with head 1's
    context slice from the corrupted run; the MLP reads it, the residual around the MLP stays clean."""
    layer = model.text_decoder.bert.encoder.layer[2]
    attention, size = layer.crossattention, layer.crossattention.self.attention_head_size
    store: dict[str, Any] = {}
    _plain(model, corrupted, (attention.self, _capture(store, "bad", lambda a, o: o[0]), False))
    _plain(model, clean, (attention.self, _capture(store, "ctx", lambda a, o: o[0]), False),
           (attention, _capture(store, "x", lambda a, o: a[0]), True))
    context = store["ctx"].clone()
    context[..., size:2 * size] = store["bad"][..., size:2 * size]
    with torch.no_grad():
        mlp_input = attention.output(context, store["x"])
    return _plain(model, clean, (layer.intermediate, lambda m, a: (mlp_input,), True))


def _head_to_value_by_hand(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                           corrupted: dict[str, torch.Tensor]) -> float:
    """dec.L1.H0 → dec.L2.H3.v by hand: layer 1 recomputed with head 0's slice corrupted and every other node
    (layer 1's cross-attention heads, its MLP) frozen at its clean output; only head 3's value rows of layer 2
    read the result."""
    one, two = model.text_decoder.bert.encoder.layer[1], model.text_decoder.bert.encoder.layer[2]
    size = one.attention.self.attention_head_size
    store: dict[str, Any] = {}
    _plain(model, corrupted, (one.attention.self, _capture(store, "bad", lambda a, o: o[0]), False))
    _plain(model, clean, (one.attention.self, _capture(store, "ctx", lambda a, o: o[0]), False),
           (one.attention, _capture(store, "h0", lambda a, o: a[0]), True),
           (one.crossattention.self, _capture(store, "xctx", lambda a, o: o[0]), False),
           (one.output.dense, _capture(store, "mlp", lambda a, o: o), False))
    context = store["ctx"].clone()
    context[..., :size] = store["bad"][..., :size]
    with torch.no_grad():
        after_self = one.attention.output(context, store["h0"])
        after_cross = one.crossattention.output(store["xctx"], after_self)
        h1 = one.output.LayerNorm(store["mlp"] + after_cross)
        rows = slice(3 * size, 4 * size)
        patched_rows = two.attention.self.value(h1)[..., rows]

    def value_hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[..., rows] = patched_rows
        return output

    return _plain(model, clean, (two.attention.self.value, value_hook, False))


@pytest.mark.parametrize("edge, by_hand", [("dec.L2.X1 → dec.L2.mlp", _cross_to_mlp_by_hand),
                                           ("dec.L1.H0 → dec.L2.H3.v", _head_to_value_by_hand)])
def test_single_edges_match_the_definition_worked_by_hand(model: torch.nn.Module, clean: dict[str, torch.Tensor],
                                                          counterfactual: dict[str, torch.Tensor], edge: str,
                                                          by_hand: Callable[..., float]) -> None:
    expected = by_hand(model, clean, counterfactual) - _plain(model, clean)
    assert abs(expected) > 1e-5
    assert_close(reference_edge_score(model, clean, counterfactual, edge), expected)
    assert_close(reference_edge_score(model, counterfactual, clean, edge, direction="denoise"), expected)


# ----------------------------------------------------------------------------------------------------------------
# Circuit runs


def test_circuit_with_every_edge_is_the_clean_run_and_with_none_the_corrupted_run(
        model: torch.nn.Module, clean: dict[str, torch.Tensor], noisy: dict[str, torch.Tensor]) -> None:
    assert_close(reference_circuit_score(model, clean, noisy, reference_edges(model)), reference_score(model, clean))
    assert_close(reference_circuit_score(model, clean, noisy, []), reference_score(model, noisy))


@pytest.mark.slow
def test_circuit_full_and_empty_with_a_counterfactual_question_and_image(
        model: torch.nn.Module, clean: dict[str, torch.Tensor], counterfactual: dict[str, torch.Tensor]) -> None:
    assert_close(reference_circuit_score(model, clean, counterfactual, reference_edges(model)),
                 reference_score(model, clean))
    assert_close(reference_circuit_score(model, clean, counterfactual, []), _plain(model, counterfactual))
    assert reference_faithfulness(model, clean, counterfactual, reference_edges(model)) == pytest.approx(1.0)
    assert reference_faithfulness(model, clean, counterfactual, []) == pytest.approx(0.0, abs=1e-4)


def test_circuit_keeping_only_the_edges_into_out_is_the_corrupted_run(
        model: torch.nn.Module, clean: dict[str, torch.Tensor], counterfactual: dict[str, torch.Tensor]) -> None:
    """Kept edges carry the circuit run's own values: a decoder whose every input is corrupted outputs corrupted
    values, whatever the edges into ``out`` keep."""
    into_out = [e for e in reference_edges(model) if parse_edge(e)[1] == "out"]
    assert_close(reference_circuit_score(model, clean, counterfactual, into_out), _plain(model, counterfactual))


@pytest.mark.slow
@pytest.mark.parametrize("edge", ["dec.L1.mlp → out", "img → qe.L1.X2.v", "qe.L0.H1 → qe.L2.mlp",
                                  "qe.L1.X0 → dec.L0.X3.k", "dec.L0.X2 → dec.L1.H0.v"])
def test_dropping_one_edge_from_the_full_circuit_is_that_edges_path_patch(
        model: torch.nn.Module, clean: dict[str, torch.Tensor], counterfactual: dict[str, torch.Tensor],
        edge: str) -> None:
    kept = [e for e in reference_edges(model) if parse_edge(e) != parse_edge(edge)]
    effect = reference_edge_score(model, clean, counterfactual, edge)
    assert abs(effect) > 1e-6
    assert_close(reference_circuit_score(model, clean, counterfactual, kept), reference_score(model, clean) + effect)


def test_senders_of_a_channel(model: torch.nn.Module) -> None:
    assert reference_senders(model, "qe.L0.H2.k") == ["qe.emb"]
    assert reference_senders(model, "qe.L0.X2.q") == ["qe.emb", *(f"qe.L0.H{h}" for h in range(HEADS))]
    assert reference_senders(model, "qe.L1.X0.v") == ["img"]
    assert len(reference_senders(model, "dec.L0.X0.k")) == 1 + LAYERS * (2 * HEADS + 1)
    with pytest.raises(BlipTraceError, match="receiver channel"):
        reference_senders(model, "dec.L0.H0")


def test_a_decoder_self_attention_query_cannot_move_the_first_answer_token(
        model: torch.nn.Module, clean: dict[str, torch.Tensor], counterfactual: dict[str, torch.Tensor]) -> None:
    """The first answer token is read at decoder position 0, whose causal self-attention has one key: its query
    does not matter, so the edge scores exactly 0 while the same sender's value edge does not."""
    assert reference_edge_score(model, clean, counterfactual, "dec.L0.X2 → dec.L1.H0.q") == 0.0
    assert reference_edge_score(model, clean, counterfactual, "dec.L0.X2 → dec.L1.H0.v") != 0.0


def test_rows_of_a_batch_are_patched_independently_and_averaged(
        model: torch.nn.Module, clean: dict[str, torch.Tensor], noisy: dict[str, torch.Tensor],
        counterfactual: dict[str, torch.Tensor]) -> None:
    def stack(*rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: torch.cat([row[key] for row in rows]) for key in rows[0]}

    edge = "qe.L0.X1 → dec.L1.X2.v"
    both = reference_edge_score(model, stack(clean, clean), stack(noisy, counterfactual), edge)
    one, two = (reference_edge_score(model, clean, other, edge) for other in (noisy, counterfactual))
    assert one != two
    assert_close(both, (one + two) / 2)


def test_pixel_values_go_through_the_vision_encoder(model: torch.nn.Module, clean: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 32, 32)
    from_pixels = {k: v for k, v in clean.items() if k != "image_embeds"} | {"pixel_values": pixels}
    assert_close(reference_score(model, from_pixels), reference_score(model, clean))
    assert reference_score(model, clean, score="prob") == pytest.approx(float(torch.tensor(
        reference_score(model, clean)).exp()), rel=1e-6)


@pytest.mark.slow
def test_demo_model_full_and_empty_circuits_and_one_dropped_edge() -> None:
    """On the trained demo model (4 layers, 4 heads) with an easy-VQA sample and Gaussian image noise of standard
    deviation ``bundle.noise_scale`` (seeded)."""
    from blip_trace_widgets.data import demo_samples
    from blip_trace_widgets.loading import load_model

    bundle = load_model("demo")
    sample = demo_samples()[0]
    clean = vqa_inputs(bundle.model, bundle.processor, sample.image, sample.question, sample.answer)
    images = clean["image_embeds"]
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    noisy = dict(clean, image_embeds=images + bundle.noise_scale * noise)
    edges = reference_edges(bundle.model)
    full, empty = reference_score(bundle.model, clean), reference_score(bundle.model, noisy)
    assert abs(full - empty) > 0.1
    assert_close(reference_circuit_score(bundle.model, clean, noisy, edges), full)
    assert_close(reference_circuit_score(bundle.model, clean, noisy, []), empty)
    edge = "qe.L3.X0 → dec.L0.X1.v"
    kept = [e for e in edges if e != edge]
    assert_close(reference_circuit_score(bundle.model, clean, noisy, kept),
                 full + reference_edge_score(bundle.model, clean, noisy, edge))
