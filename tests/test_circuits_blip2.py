"""Circuits of BLIP-2 and InstructBLIP (OPT): the graph against an enumeration written here from the definition,
keeping every edge (the clean run) and none (the corrupted run), JSON round trips, and exact edge scores against a
hand-written path-patching computation on the tiny model's own Hugging Face modules (forward hooks)."""
from __future__ import annotations

import functools
import json
from collections import Counter

import numpy as np
import pytest
import torch
from fast_subset import lengthy
from tiny_blip import tiny_blip2, tiny_blip2_processor, tiny_instructblip, tiny_instructblip_processor

from blip_trace_widgets.circuits.faithfulness import faithfulness, faithfulness_curve
from blip_trace_widgets.circuits.graph import CircuitGraph, circuit_graph
from blip_trace_widgets.circuits.inputs import circuit_inputs
from blip_trace_widgets.circuits.patching import path_patch
from blip_trace_widgets.circuits.plots import plot_circuit
from blip_trace_widgets.circuits.result import EdgeResult
from blip_trace_widgets.circuits.scores import edge_scores
from blip_trace_widgets.core.errors import BlipTraceError
from blip_trace_widgets.datasets.easy_vqa import demo_samples
from blip_trace_widgets.models.loading import load_model

QUESTION = "what color is the shape?"


@functools.lru_cache(maxsize=2)
def tiny(instruct: bool = False):
    if instruct:
        return load_model((tiny_instructblip(seed=3), tiny_instructblip_processor()), device="cpu")
    return load_model((tiny_blip2(seed=3), tiny_blip2_processor()), device="cpu")


@functools.lru_cache(maxsize=2)
def corrupted(instruct: bool = False) -> torch.Tensor:
    """Noised image embeddings of the first demo image: one draw, given as a tensor."""
    clean = circuit_inputs(tiny(instruct), demo_samples()[0].image, QUESTION, answer="red", samples=1).img
    generator = torch.Generator().manual_seed(1)
    return clean + 3 * clean.std() * torch.randn(clean.shape, generator=generator)


# ----- the graph, from the definition ------------------------------------------------------------------------
def spec_edges(qf_layers: int, every: int, lm_layers: int, heads: int) -> set[str]:
    """Every edge as the definition lists them, enumerated independently of the engine."""
    edges: set[str] = set()
    qf_nodes = ["qf.emb"]  # in order; senders of a channel are the nodes before it
    for layer in range(qf_layers):
        cross = layer % every == 0
        for h in range(heads):
            edges |= {f"{u} → qf.L{layer}.H{h}.{p}" for u in qf_nodes for p in "qkv"}
        selfs = [f"qf.L{layer}.H{h}" for h in range(heads)]
        crosses = [f"qf.L{layer}.X{h}" for h in range(heads)] if cross else []
        for h in range(heads if cross else 0):
            edges |= {f"{u} → qf.L{layer}.X{h}.q" for u in qf_nodes + selfs}
            edges |= {f"img → qf.L{layer}.X{h}.{p}" for p in "kv"}
        edges |= {f"{u} → qf.L{layer}.mlp" for u in qf_nodes + selfs + crosses}
        qf_nodes += selfs + crosses + [f"qf.L{layer}.mlp"]
    lm_nodes = ["lm.emb"]
    for layer in range(lm_layers):
        selfs = [f"lm.L{layer}.H{h}" for h in range(heads)]
        for h in range(heads):
            edges |= {f"{u} → lm.L{layer}.H{h}.{p}" for u in qf_nodes + lm_nodes for p in "qkv"}
        edges |= {f"{u} → lm.L{layer}.mlp" for u in qf_nodes + lm_nodes + selfs}
        lm_nodes += selfs + [f"lm.L{layer}.mlp"]
    return edges | {f"{u} → out" for u in qf_nodes + lm_nodes}


def test_the_graph_is_the_definitions():
    graph = circuit_graph(tiny())
    assert set(graph.edges) == spec_edges(3, 2, 3, 4) and len(set(graph.edges)) == len(graph.edges)
    blocks = Counter(" → ".join(part.strip().split(".")[0] for part in e.split("→")) for e in spec_edges(3, 2, 3, 4))
    assert graph.counts() == dict(blocks) and set(blocks) == {"qf → qf", "img → qf", "qf → lm", "lm → lm",
                                                               "qf → out", "lm → out"}
    assert len(graph.edges_between("qf", "lm")) == blocks["qf → lm"] == 936
    with pytest.raises(BlipTraceError, match="names no channel"):
        graph.edges_between("img", "qf.L1.X0")
    assert circuit_graph(tiny(instruct=True)).edges == graph.edges  # the instruction adds rows, not nodes


def test_the_demo_graph_counts():
    graph = circuit_graph(load_model("demo-blip2"))
    assert (len(graph.nodes), len(graph.channels), len(graph.edges)) == (61, 155, 4185)
    assert set(graph.edges) == spec_edges(4, 2, 6, 4)


def test_the_graph_round_trips_through_json():
    graph = circuit_graph(tiny())
    again = CircuitGraph.from_json(graph.to_json())
    assert again.edges == graph.edges and again.nodes == graph.nodes and json.loads(graph.to_json())["shape"] == {
        "qf_layers": 3, "qf_heads": 4, "cross_every": 2, "lm_layers": 3, "lm_heads": 4}


def test_other_language_models_are_refused():
    with pytest.raises(BlipTraceError, match="OPT language model only.*llama"):
        circuit_graph(tiny_instructblip(language="llama"))


def test_a_counterfactual_prompt_is_refused():
    with pytest.raises(BlipTraceError, match="corrupt the image only"):
        circuit_inputs(tiny(), demo_samples()[0].image, QUESTION, answer="red", corruption="what color is the circle?")


# ----- circuit runs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("instruct", [False, True])
def test_every_edge_is_the_clean_run_and_none_the_corrupted(instruct):
    bundle, image = tiny(instruct), demo_samples()[0].image
    graph = circuit_graph(bundle)
    full = faithfulness(bundle, image, QUESTION, graph.edges, answer="red", samples=3)
    empty = faithfulness(bundle, image, QUESTION, [], answer="red", samples=3)
    assert abs(full.circuit_score - full.clean_score) < 1e-5 and abs(full.value - 1) < 1e-4
    assert abs(empty.circuit_score - empty.corrupted_score) < 1e-5 and abs(empty.value) < 1e-4
    assert full.clean_score != full.corrupted_score


def test_the_clean_score_is_the_models_own():
    """The hand-written forward scores log p(answer) as transformers' Blip2ForConditionalGeneration does."""
    bundle, image = tiny(), demo_samples()[0].image
    pair = circuit_inputs(bundle, image, QUESTION, answer="red", samples=1)
    model = bundle.model
    with torch.no_grad():
        pixels = bundle.processor.image_processor(image, return_tensors="pt")["pixel_values"]
        ids = torch.cat([torch.full((1, 4), model.config.image_token_index), pair.question_ids], 1)
        logits = model(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    expected = torch.log_softmax(logits[0, pair.offset].float(), -1)[pair.answer]
    result = path_patch(bundle, image, QUESTION, sender="img", receivers="out", answer="red", samples=1,
                        corruption=corrupted())  # img sends nothing to out: the base run's score
    assert abs(result.effect) < 1e-5 and abs(result.base_score - float(expected)) < 1e-5


# ----- exact edge scores against hooks on the model's own modules -----------------------------------------------
class Hooks:
    """Forward hooks on the tiny model's modules, always removed."""

    def __init__(self) -> None:
        self.handles: list = []

    def add(self, module, fn, pre: bool = False) -> None:
        self.handles.append(module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def hf_run(model, img, ids, answer, offset, hooks: Hooks | None = None):
    """A forward of the model's own Q-Former, projection and OPT on image embeddings: log p(answer) and every
    node's output (head contexts as the output denses read them, MLP outputs, embeddings)."""
    found: dict[str, torch.Tensor] = {}
    hooks = hooks or Hooks()

    def context(name):
        return lambda module, args: found.__setitem__(name, args[0][0])

    def output(name):
        return lambda module, args, out: found.__setitem__(name, out.reshape(-1, out.shape[-1]))

    for j, layer in enumerate(model.qformer.encoder.layer):
        hooks.add(layer.attention.output.dense, context(f"qf.L{j}.H"), pre=True)
        if layer.has_cross_attention:
            hooks.add(layer.crossattention.output.dense, context(f"qf.L{j}.X"), pre=True)
        hooks.add(layer.output_query.dense, output(f"qf.L{j}.mlp"))
    hooks.add(model.qformer.layernorm, output("qf.emb"))
    decoder = model.language_model.model.decoder
    for j, layer in enumerate(decoder.layers):
        hooks.add(layer.self_attn.out_proj, context(f"lm.L{j}.H"), pre=True)
        hooks.add(layer.fc2, output(f"lm.L{j}.mlp"))
    hooks.add(decoder.embed_positions, output("positions"))
    with hooks, torch.no_grad():
        states = model.qformer(query_embeds=model.query_tokens, encoder_hidden_states=img).last_hidden_state
        text = decoder.embed_tokens(ids)
        embeds = torch.cat([model.language_projection(states), text], 1)
        logits = model.language_model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).logits
    found["lm.emb"] = torch.cat([torch.zeros_like(states[0, :, :text.shape[-1]]), text[0]]) + found["positions"]
    return float(torch.log_softmax(logits[0, offset].float(), -1)[answer]), found


def contribution(model, found, node: str) -> torch.Tensor:
    """A node's contribution to its block's residual stream [T, D]: a head's context through its slice of the
    output dense (no bias), an MLP's output, an embedding."""
    if node.endswith((".emb", ".mlp")):
        return found[node]
    block, layer, unit = node.split(".")
    j, h = int(layer[1:]), int(unit[1:])
    if block == "qf":
        mods = model.qformer.encoder.layer[j]
        dense = (mods.attention if unit[0] == "H" else mods.crossattention).output.dense
    else:
        dense = model.language_model.model.decoder.layers[j].self_attn.out_proj
    z = found[f"{block}.L{j}.{unit[0]}"]
    width = z.shape[-1] // 4
    return z[:, h * width:(h + 1) * width] @ dense.weight[:, h * width:(h + 1) * width].T


def residual(model, found, patched: dict[str, torch.Tensor], upto: tuple[str, int, str]) -> torch.Tensor:
    """The residual a channel at ``upto`` = (block, layer, "in"/"mid"/"post"/"out") reads, recomputed from node
    contributions (``patched`` replacing some), LayerNorms, biases and the projection recomputed."""
    def c(node):
        return patched.get(node, contribution(model, found, node))

    def heads(block, j, kind):
        return sum(c(f"{block}.L{j}.{kind}{h}") for h in range(4))

    h = c("qf.emb")
    for j, layer in enumerate(model.qformer.encoder.layer):
        if upto == ("qf", j, "in"):
            return h
        h = layer.attention.output.LayerNorm(h + heads("qf", j, "H") + layer.attention.output.dense.bias)
        if layer.has_cross_attention:
            if upto == ("qf", j, "mid"):
                return h
            out = layer.crossattention.output
            h = out.LayerNorm(h + heads("qf", j, "X") + out.dense.bias)
        if upto == ("qf", j, "post"):
            return h
        h = layer.output_query.LayerNorm(h + c(f"qf.L{j}.mlp"))
    projected = model.language_projection(h)
    x = c("lm.emb") + torch.cat([projected, torch.zeros_like(c("lm.emb")[projected.shape[0]:])])
    for j, layer in enumerate(model.language_model.model.decoder.layers):
        if upto == ("lm", j, "in"):
            return x
        x = x + heads("lm", j, "H") + layer.self_attn.out_proj.bias
        if upto == ("lm", j, "post"):
            return x
        x = x + c(f"lm.L{j}.mlp")
    return x


def hooked_edge_score(bundle, edge: str, clean: torch.Tensor, noisy: torch.Tensor) -> float:
    """m(run B) − m(clean) for one edge, noising: run A recomputes the receiver's input with the sender's
    contribution from the noisy run; run B is the clean forward with only the receiver reading it."""
    model = bundle.model
    pair = circuit_inputs(bundle, demo_samples()[0].image, QUESTION, answer="red", samples=1)
    args = (pair.question_ids, pair.answer, pair.offset)
    base, found = hf_run(model, clean, *args)
    _, source = hf_run(model, noisy, *args)
    sender, receiver = (s.strip() for s in edge.split("→"))
    hooks = Hooks()
    if sender == "img":  # a cross-attention head's k or v rows read the noisy image
        j, h, part = int(receiver.split(".")[1][1:]), int(receiver.split(".")[2][1:]), receiver[-1]
        linear = getattr(model.qformer.encoder.layer[j].crossattention.attention, {"k": "key", "v": "value"}[part])
        replace_rows(hooks, linear, h, linear(noisy)[0])
    else:
        parts = receiver.split(".")
        patched = {sender: contribution(model, source, sender)}
        if receiver == "out":
            x = residual(model, found, patched, ("lm", 99, "out"))
            normed = model.language_model.model.decoder.final_layer_norm(x)
            hooks.add(model.language_model.lm_head, lambda m, a: (normed.reshape(a[0].shape),), pre=True)
        elif parts[2] == "mlp":
            x = residual(model, found, patched, (parts[0], int(parts[1][1:]), "post"))
            if parts[0] == "qf":
                hooks.add(model.qformer.encoder.layer[int(parts[1][1:])].intermediate_query, lambda m, a: (x[None],),
                          pre=True)
            else:
                layer = model.language_model.model.decoder.layers[int(parts[1][1:])]
                normed = layer.final_layer_norm(x)
                hooks.add(layer.fc1, lambda m, a: (normed.reshape(a[0].shape),), pre=True)
        else:
            block, j, h, part = parts[0], int(parts[1][1:]), int(parts[2][1:]), parts[3]
            name = {"q": "query", "k": "key", "v": "value"}[part]
            if block == "qf":
                where = "mid" if parts[2][0] == "X" else "in"
                x = residual(model, found, patched, (block, j, where))
                attention = model.qformer.encoder.layer[j]
                module = (attention.crossattention if where == "mid" else attention.attention).attention
                replace_rows(hooks, getattr(module, name), h, getattr(module, name)(x))
            else:
                layer = model.language_model.model.decoder.layers[j]
                linear = getattr(layer.self_attn, f"{part}_proj")
                replace_rows(hooks, linear, h, linear(layer.self_attn_layer_norm(residual(model, found, patched,
                                                                                          (block, j, "in")))))
    patched_score, _ = hf_run(model, clean, *args, hooks=hooks)
    return patched_score - base


def replace_rows(hooks: Hooks, linear, head: int, values: torch.Tensor) -> None:
    """The projection's output for one head's rows taken from ``values`` [T, D]."""
    width = values.shape[-1] // 4

    def hook(module, args, out):
        out = out.clone()
        out[..., head * width:(head + 1) * width] = values[..., head * width:(head + 1) * width]
        return out

    hooks.add(linear, hook)


EDGES = ["img → qf.L2.X1.v", "qf.L0.X2 → qf.L1.H0.k", "qf.L1.H3 → qf.L2.X0.q", "qf.L0.H1 → qf.L0.mlp",
         "qf.L1.mlp → lm.L1.H2.q", "qf.emb → lm.L0.mlp", "lm.L0.mlp → lm.L2.H1.v", "lm.L1.H0 → lm.L1.mlp",
         "qf.L2.X0 → out", "lm.L2.mlp → out"]


def test_exact_edge_scores_are_the_hooked_computation():
    bundle = tiny()
    clean = circuit_inputs(bundle, demo_samples()[0].image, QUESTION, answer="red", samples=1).img
    noisy = corrupted()
    result = edge_scores(bundle, demo_samples()[0].image, QUESTION, method="exact", corruption=noisy, answer="red",
                         samples=1, edges=EDGES)
    expected = [hooked_edge_score(bundle, edge, clean, noisy) for edge in EDGES]
    assert result.edges == EDGES and any(abs(e) > 1e-3 for e in expected)
    np.testing.assert_allclose(result.scores, np.array(expected), atol=2e-5, rtol=1e-4)


def test_path_patch_of_one_edge_is_its_exact_score_both_ways():
    bundle, image = tiny(), demo_samples()[0].image
    for direction in ("noise", "denoise"):
        scores = edge_scores(bundle, image, QUESTION, method="exact", corruption=corrupted(), answer="red", samples=1,
                             edges=EDGES[:4], direction=direction)
        for edge, score in zip(EDGES[:4], scores.scores):
            sender, receiver = (s.strip() for s in edge.split("→"))
            one = path_patch(bundle, image, QUESTION, sender=sender, receivers=receiver, corruption=corrupted(),
                             answer="red", samples=1, direction=direction)
            assert abs(one.effect - score) < 1e-5


# ----- estimates -------------------------------------------------------------------------------------------------
@lengthy
@pytest.mark.parametrize("instruct", [False, True])
def test_eap_is_the_exact_score_s_first_order(instruct):
    """With a corruption a thousandth of the noise, exact path patching is linear in it: EAP (and EAP-IG) agree
    with the exact scores to first order on every edge."""
    bundle, image = tiny(instruct), demo_samples()[0].image
    clean = circuit_inputs(bundle, image, QUESTION, answer="red", samples=1).img
    small = clean + 1e-3 * (corrupted(instruct) - clean)
    kwargs = dict(corruption=small, answer="red", samples=1)
    exact = edge_scores(bundle, image, QUESTION, method="exact", **kwargs).scores
    scale = np.abs(exact).max()
    assert scale > 1e-6
    for method in ("eap", "eap-ig"):
        estimate = edge_scores(bundle, image, QUESTION, method=method, **kwargs).scores
        assert np.abs(estimate - exact).max() < 0.02 * scale, method


@lengthy
def test_edge_results_round_trip_and_draw():
    bundle, image = tiny(), demo_samples()[0].image
    result = edge_scores(bundle, image, QUESTION, method="eap", answer="red", samples=2)
    assert EdgeResult.from_json(result.to_json()) == result and result.shape["qf_layers"] == 3
    curve = faithfulness_curve(bundle, image, QUESTION, result, answer="red", samples=2, fractions=(0.0, 0.1, 1.0))
    assert abs(curve.values[0]) < 1e-4 and abs(curve.values[-1] - 1) < 1e-4
    figure = plot_circuit(result, k=20, curve=curve)
    labels = {t.get_text() for t in figure.axes[0].texts}
    assert {"ViT image input", "Q-Former", "language model"} <= labels
