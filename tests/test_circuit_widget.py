"""CircuitExplorer: the slider measures the circuit it draws; the method and corruption rescore, kept per choice."""
from __future__ import annotations

import pytest

from blip_trace_widgets.datasets.easy_vqa import easy_vqa_pairs
from blip_trace_widgets.models.loading import load_model


@pytest.mark.slow
def test_the_explorer_follows_its_controls():
    from blip_trace_widgets.widgets.circuit import NOISE, PAIR, CircuitExplorer

    pair = easy_vqa_pairs("color", limit=1)[0]
    explorer = CircuitExplorer(load_model("demo"), pair.image, pair.question, method="eap", samples=2,
                               counterfactual=pair.counterfactual_image)
    first = explorer.figure.value
    assert explorer.k.max == len(explorer.result.edges) and explorer.faithfulness.edges == 50
    explorer.k.value = 300
    assert explorer.faithfulness.edges == 300 and explorer.figure.value != first
    assert "300 of 3417 edges" in explorer.status.value
    explorer.corruption.value = PAIR
    assert explorer.result.corruption["name"] == "image_swap" and explorer.result.samples == 1
    explorer.method.value = "eap-ig"
    assert explorer.result.method == "eap-ig" and len(explorer._cache) == 3  # noqa: SLF001
    explorer.corruption.value = NOISE
    assert explorer.result.samples == 2 and len(explorer._cache) == 4  # noqa: SLF001
    assert explorer.error.value == ""


def test_a_node_names_its_place_in_a_causal_map_for_each_family():
    from blip_trace_widgets.circuits.nodes import NodeCell, node_cell
    from blip_trace_widgets.core.errors import BlipTraceError

    blip, blip2 = load_model("demo"), load_model("demo-blip2")
    assert node_cell(blip, "dec.L2.H3") == NodeCell("answer_decoder", "self_attn_head", 2, 3)
    assert node_cell(blip, "qe.emb") == NodeCell("question_encoder", "hidden", 0, None)
    assert node_cell(blip2, "qf.L0.X1") == NodeCell("qformer", "cross_attn_head", 0, 1)
    assert node_cell(blip2, "lm.L5.mlp") == NodeCell("language_model", "mlp", 5, None)
    with pytest.raises(BlipTraceError, match="vision encoder"):
        node_cell(blip, "img")
    with pytest.raises(BlipTraceError, match="not a node"):
        node_cell(blip2, "qe.L0.H0")  # BLIP's names are not BLIP-2's


@pytest.mark.slow
def test_a_picked_node_shows_its_own_causal_map(monkeypatch):
    import numpy as np

    from blip_trace_widgets import trace
    from blip_trace_widgets.causal_trace import cost
    from blip_trace_widgets.circuits.faithfulness import circuit
    from blip_trace_widgets.widgets.circuit import PAIR, CircuitExplorer

    bundle = load_model("demo")
    pair = easy_vqa_pairs("color", limit=1)[0]
    explorer = CircuitExplorer(bundle, pair.image, pair.question, method="eap", samples=2,
                               counterfactual=pair.counterfactual_image)
    kept = circuit(explorer.result, k=int(explorer.k.value))
    named = {v for _, v in explorer.node.options if v}
    assert named and all(any(node in edge for edge in kept.edges) for node in named)  # the circuit's own nodes
    head = next(n for n in named if ".X" in n or ".H" in n)
    explorer.node.value = head
    block = "question_encoder" if head.startswith("qe.") else "answer_decoder"
    kind = "cross_attn_head" if ".X" in head else "self_attn_head"
    expected = trace(bundle, pair.image, pair.question, block=block, kind=kind, window=1, samples=2,
                     direction="noise")
    got = explorer.node_result
    assert got.block == block and got.kind == kind and got.direction == "noise"
    np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-6, atol=1e-7)
    assert head in explorer.node_note.value and bytes(explorer.node_map.value).startswith(b"\x89PNG")
    explorer.corruption.value = PAIR  # the node's map follows the circuit's corruption
    if explorer.node.value == head:
        assert explorer.node_result.config["corruption"]["type"] == "image_swap"
    explorer.node.value = next(v for _, v in explorer.node.options if v and v != "img")
    assert explorer.node_result.config["corruption"]["type"] == "image_swap"
    explorer.node.value = "img"  # no map of its own: said inside, the explorer carries on
    assert explorer.node_result is None and "vision encoder" in explorer.node_note.value
    monkeypatch.setattr(cost, "WARN_SECONDS", 0.0)  # every map is "long" now: it waits for its button
    explorer.node.value = head
    assert explorer.node_result is None and explorer.node_go.layout.display is None
    explorer.node_go.click()
    assert explorer.node_result is not None and explorer.node_map.layout.display is None
