"""Circuits: the graph, exact path patching, edge scores and circuit runs against the independent reference loops
(tests/circuit_reference.py, one hooked forward of the Hugging Face model at a time)."""
from __future__ import annotations

import functools
import json

import circuit_reference as ref
import numpy as np
import pytest
import torch
from tolerance import assert_close

from blip_trace_widgets.circuits.graph import circuit_graph
from blip_trace_widgets.circuits.inputs import CircuitInputs
from blip_trace_widgets.circuits.network import Network
from blip_trace_widgets.circuits.patching import Path, prepare, run_paths
from blip_trace_widgets.core.errors import BlipTraceError
from blip_trace_widgets.datasets.easy_vqa import demo_samples
from blip_trace_widgets.models.loading import load_model


@functools.lru_cache(maxsize=1)
def demo():
    return load_model("demo")


@functools.lru_cache(maxsize=1)
def dicts(seed: int = 0):
    """The reference's clean and corrupted inputs on a demo sample (noise on the image embeddings)."""
    bundle = demo()
    sample = demo_samples()[0]
    clean = ref.vqa_inputs(bundle.model, bundle.processor, sample.image, sample.question, sample.answer)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(clean["image_embeds"].shape, generator=generator) * 3 * clean["image_embeds"].std()
    return clean, dict(clean, image_embeds=clean["image_embeds"] + noise)


def pair_of(clean, corrupted, metric="logprob") -> CircuitInputs:
    """The engine's inputs from the reference's dicts: the same tensors."""
    return CircuitInputs(clean["image_embeds"], clean["input_ids"], clean["answer_ids"], int(clean["answer_ids"][0, 1]),
                         "", corrupted["image_embeds"], corrupted["input_ids"], {"name": "given", "samples": 1},
                         metric=metric)


def engine_edges(edges, direction="noise"):
    bundle = demo()
    graph, net = circuit_graph(bundle), Network(bundle)
    runs = prepare(net, pair_of(*dicts()), direction)
    paths = []
    for edge in edges:
        i = graph.edge_index(edge)
        paths.append(Path(frozenset([int(graph.senders[i])]), (int(graph.receivers[i]),)))
    return run_paths(runs, graph, paths)[0]


def test_the_graph_is_the_references():
    model = demo().model
    graph = circuit_graph(demo())
    assert sorted(graph.edges) == sorted(ref.reference_edges(model)) and len(set(graph.edges)) == len(graph.edges)
    assert graph.nodes == ref.reference_nodes(model)[:-1]
    assert sorted(graph.channels) == sorted(ref.reference_channels(model))
    assert json.loads(graph.to_json())["counts"]["qe → dec"] == 1184
    assert type(graph).from_json(graph.to_json()).edges == graph.edges


def test_selections_name_groups_and_refuse_nothing():
    graph = circuit_graph(demo())
    assert graph.select_nodes("qe.L1.cross") == [f"qe.L1.X{h}" for h in range(4)]
    assert len(graph.select_nodes("qe.heads")) == 32 and graph.select_nodes("image") == ["img"]
    assert set(graph.select_channels("dec.L2.X3")) == {"dec.L2.X3.q", "dec.L2.X3.k", "dec.L2.X3.v"}
    assert all(e.startswith("img") for e in graph.edges_between("img", "qe"))
    assert graph.edge_index("qe.emb -> qe.L0.H0.q") == 0
    with pytest.raises(BlipTraceError, match="names no node"):
        graph.select_nodes("qe.L9.H0")
    with pytest.raises(BlipTraceError, match="not an edge"):
        graph.edge_index("dec.L0.mlp → qe.L1.mlp")


EDGES = ["img → qe.L0.X0.k", "img → qe.L2.X1.v", "qe.emb → qe.L0.H2.q", "qe.L0.X1 → qe.L1.H0.k",
         "qe.L1.mlp → qe.L3.mlp", "qe.L2.X3 → dec.L1.X0.v", "qe.L3.mlp → dec.L3.X2.k", "dec.emb → dec.L0.X1.q",
         "dec.L0.X1 → dec.L2.mlp", "dec.L3.X0 → out", "qe.L0.H1 → qe.L0.X2.q"]


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_exact_edge_scores_equal_the_reference(direction):
    clean, corrupted = dicts()
    ours = engine_edges(EDGES, direction)
    theirs = [ref.reference_edge_score(demo().model, clean, corrupted, e, "noise" if direction == "noise" else "denoise")
              for e in EDGES]
    assert np.abs(theirs).max() > 1e-3, "the edges chosen change nothing: the test would pass on any engine"
    assert_close(ours, theirs, scale=10.0)


def test_eap_is_the_first_order_term_of_exact_edges():
    """Under a small corruption EAP and EAP-IG equal the exact edge scores to first order (relative error shrinks
    with the corruption), and each is far from a shuffled copy."""
    from blip_trace_widgets.circuits.attribution import attribution_draws

    bundle = demo()
    graph, net = circuit_graph(bundle), Network(bundle)
    clean, _ = dicts()
    errors = []
    for size in (0.02, 0.01):
        noise = torch.randn(clean["image_embeds"].shape, generator=torch.Generator().manual_seed(1)) * size
        pair = pair_of(clean, dict(clean, image_embeds=clean["image_embeds"] + noise))
        runs = prepare(net, pair, "noise")
        chosen = graph.edge_indices_between("img", "qe")
        exact = run_paths(runs, graph, [Path(frozenset([int(graph.senders[i])]), (int(graph.receivers[i]),))
                                        for i in chosen])[0]
        for steps in (None, 3):
            approx = attribution_draws(runs, graph, steps)[0, chosen]
            errors.append(np.abs(approx - exact).max() / np.abs(exact).max())
    assert max(errors[2:]) < 0.5 * max(errors[:2]) or max(errors) < 1e-3, errors
    assert max(errors) < 0.05, errors


@pytest.mark.slow
def test_circuit_runs_equal_the_reference_and_span_clean_to_corrupted():
    from blip_trace_widgets.circuits.faithfulness import circuit_scores

    bundle = demo()
    graph, net = circuit_graph(bundle), Network(bundle)
    clean, corrupted = dicts()
    pair = pair_of(clean, corrupted)
    rng = np.random.default_rng(0)
    some = rng.random(len(graph)) < 0.3
    masks = [np.zeros(len(graph), bool), np.ones(len(graph), bool), some]
    ours = circuit_scores(net, graph, pair, masks)[0]
    model = bundle.model
    assert_close(ours[0], ref.reference_score(model, corrupted), scale=10.0)
    assert_close(ours[1], ref.reference_score(model, clean), scale=10.0)
    kept = [graph.edges[i] for i in np.flatnonzero(some)]
    assert_close(ours[2], ref.reference_circuit_score(model, clean, corrupted, kept), scale=10.0)
    assert abs(ours[2] - ours[0]) > 1e-3 and abs(ours[2] - ours[1]) > 1e-3, "the circuit is neither run: a real test"


@functools.lru_cache(maxsize=1)
def demo_scores():
    from blip_trace_widgets.circuits.scores import edge_scores

    image, question, _ = demo_samples()[0]
    return edge_scores(demo(), image, question, method="eap", samples=2)


def test_edge_results_round_trip_strict_json_and_rank_by_size():
    from blip_trace_widgets.circuits.result import EdgeResult

    result = demo_scores()
    text = result.to_json()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in strict JSON"))
    again = EdgeResult.from_json(text)
    assert again == result and np.array_equal(again.scores, result.scores)
    top = result.top(5)
    assert [abs(result.scores[result.edges.index(e)]) for e in top] == sorted(
        (abs(result.scores[result.edges.index(e)]) for e in top), reverse=True)
    frame = result.to_dataframe()
    assert len(frame) == len(result.edges) and frame.loc[frame["rank"] == 1, "edge"].item() == top[0]
    assert (result.low <= result.scores + 1e-12).all() and (result.high >= result.scores - 1e-12).all()
    assert result.samples == 2 and np.isfinite(result.stderr).any()
    with pytest.raises(BlipTraceError, match="not an edge result"):
        EdgeResult.from_json(json.dumps({"kind": "trace"}))


@pytest.mark.slow
def test_circuits_and_faithfulness_refuse_nonsense_and_span_zero_to_one():
    from blip_trace_widgets.circuits.faithfulness import Curve, circuit, faithfulness, faithfulness_curve

    image, question, _ = demo_samples()[0]
    result = demo_scores()
    with pytest.raises(BlipTraceError, match="one of them"):
        circuit(result)
    with pytest.raises(BlipTraceError, match="at most"):
        circuit(result, k=len(result.edges) + 1)
    everything = faithfulness(demo(), image, question, circuit(result, fraction=1.0), samples=2)
    nothing = faithfulness(demo(), image, question, circuit(result, k=0), samples=2)
    assert_close(everything.value, 1.0, scale=100.0)
    assert_close(nothing.value, 0.0, scale=100.0)
    curve = faithfulness_curve(demo(), image, question, result, fractions=(0.0, 0.1, 1.0), samples=2)
    assert curve.ks == [0, round(0.1 * len(result.edges)), len(result.edges)]
    assert 0.0 < curve.area <= 1.5 and Curve.from_json(curve.to_json()).values == curve.values


def test_bad_settings_are_refused_naming_the_fix():
    from blip_trace_widgets.circuits.scores import edge_scores

    image, question, _ = demo_samples()[0]
    with pytest.raises(BlipTraceError, match="unknown method"):
        edge_scores(demo(), image, question, method="acdc")
    with pytest.raises(BlipTraceError, match="'noise'"):
        edge_scores(demo(), image, question, direction="sideways")
    with pytest.raises(BlipTraceError, match="as many tokens"):
        edge_scores(demo(), image, question, corruption="what color?")
    with pytest.raises(BlipTraceError, match="samples"):
        edge_scores(demo(), image, question, samples=0)


def test_the_figure_draws_the_top_edges_and_the_curve():
    from blip_trace_widgets.circuits.faithfulness import Curve
    from blip_trace_widgets.circuits.plots import plot_circuit

    result = demo_scores()
    curve = Curve([0, 10, 100], [0.0, 0.1, 1.0], [0.0, 0.5, 1.0], [0.0, 0.4, 1.0], [0.0, 0.6, 1.0], 100)
    figure = plot_circuit(result, k=7, curve=curve)
    graph_ax, curve_ax = figure.axes
    assert len(graph_ax.lines) == 7 and "gaussian 10σ" in graph_ax.get_title() and "total effect" in graph_ax.get_title()
    colours = {line.get_color() for line in graph_ax.lines}
    assert colours <= {"#2166ac", "#b2182b"}
    assert "area 0.70" in curve_ax.get_title()  # trapezoids: 0.1 * 0.25 + 0.9 * 0.75


@pytest.mark.slow
def test_the_command_writes_png_json_and_csv(tmp_path, capsys):
    from blip_trace_widgets.circuits.result import EdgeResult
    from blip_trace_widgets.cli import main

    image = tmp_path / "shape.png"
    demo_samples()[0].image.save(image)
    out = tmp_path / "out"
    code = main(["circuit", "--image", str(image), "--question", demo_samples()[0].question, "--method", "eap",
                 "--samples", "2", "--top", "10", "--out", str(out)])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"circuit-eap.png", "circuit-eap.json", "circuit-eap.csv",
                                             "circuit-eap-faithfulness.json"}
    assert len(EdgeResult.from_json((out / "circuit-eap.json").read_text()).edges) == 3417
    assert "faithfulness area" in capsys.readouterr().out
    assert main(["circuit", "--image", str(tmp_path / "none.png"), "--question", "q?", "--out", str(out)]) == 2


def test_path_patching_of_sets_equals_the_reference():
    """Several senders to several receivers in several blocks, in one run: the reference's m(run B)."""
    from blip_trace_widgets.circuits.patching import path_patch

    clean, corrupted = dicts()
    senders, receivers = ["img", "qe.L1.X2", "qe.L2.mlp"], ["qe.L2.X2.k", "qe.L3.H1.v", "dec.L0.X3.v", "dec.L2.X1.k"]
    result = path_patch(demo(), None, "", sender=senders, receivers=receivers, inputs=pair_of(clean, corrupted))
    model = demo().model
    theirs = ref.reference_path_patch(model, clean, corrupted, senders, receivers) - ref.reference_score(model, clean)
    assert abs(theirs) > 1e-3
    assert_close(result.effect, theirs, scale=10.0)
    assert result.samples == 1 and result.senders == senders


def test_the_hand_written_chain_backward_equals_autograd_through_the_chain():
    """EAP's g_r·J_{r,u}Δc_u (Network.chain_scores, LayerNorm statistics included) against autograd on the gated
    chain, for channels that stop at three depths of the question encoder and at its final state."""
    from blip_trace_widgets.circuits.graph import Point
    from blip_trace_widgets.circuits.network import state_index

    bundle = demo()
    net = Network(bundle)
    runs = prepare(net, pair_of(*dicts()), "noise")
    base = runs.contributions("base", "qe")
    delta = runs.contributions("source", "qe") - base
    torch.manual_seed(0)
    points = [Point("qe", 1, "in"), Point("qe", 2, "mid"), Point("qe", 3, "post"), Point("qe", 4, "in")]
    grads = [torch.randn(1, 3, *base.shape[2:]) for _ in points]
    ours = net.chain_scores("qe", base, delta, [(state_index(p), g) for p, g in zip(points, grads)])
    for point, grad, mine in zip(points, grads, ours):
        gates = torch.zeros(1, 3, base.shape[1], requires_grad=True)
        (net.chain("qe", base, delta, gates, point) * grad).sum().backward()
        assert_close(mine.detach().numpy(), gates.grad.numpy(), scale=float(gates.grad.abs().max()))
        assert gates.grad.abs().max() > 1e-3


@pytest.mark.slow
def test_probabilities_are_scored_as_the_reference_scores_them():
    from blip_trace_widgets.circuits.faithfulness import circuit_scores

    bundle = demo()
    graph, net = circuit_graph(bundle), Network(bundle)
    clean, corrupted = dicts()
    pair = pair_of(clean, corrupted, "prob")
    edges = ["img → qe.L2.X1.v", "qe.L1.mlp → qe.L3.mlp"]
    paths = [Path(frozenset([int(graph.senders[graph.edge_index(e)])]), (int(graph.receivers[graph.edge_index(e)]),))
             for e in edges]
    ours = run_paths(prepare(net, pair, "noise"), graph, paths)[0]
    theirs = [ref.reference_edge_score(bundle.model, clean, corrupted, e, score="prob") for e in edges]
    assert_close(ours, theirs)
    assert abs(theirs[0]) > 1e-4
    empty = circuit_scores(net, graph, pair, [np.zeros(len(graph), bool)])[0, 0]
    assert_close(empty, ref.reference_score(bundle.model, corrupted, "prob"))
    with pytest.raises(BlipTraceError, match="unknown metric"):
        from blip_trace_widgets.circuits.inputs import circuit_inputs

        circuit_inputs(bundle, demo_samples()[0].image, demo_samples()[0].question, metric="logit")


@pytest.mark.slow
def test_exact_scores_are_priced_and_warned_about_before_a_long_run(monkeypatch):
    from blip_trace_widgets.circuits import scores

    image, question, _ = demo_samples()[0]
    monkeypatch.setattr(scores, "WARN_SECONDS", 0.0)  # any run is "long"
    with pytest.warns(UserWarning, match=r"exact scores of 2 edges × 1 draws should take about"):
        result = scores.edge_scores(demo(), image, question, method="exact", samples=1,
                                    edges=["img → qe.L0.X0.k", "dec.L3.mlp → out"])
    assert result.edges == ["img → qe.L0.X0.k", "dec.L3.mlp → out"] and np.isfinite(result.scores).all()
    monkeypatch.setattr(scores, "WARN_SECONDS", 1e9)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores.edge_scores(demo(), image, question, method="exact", samples=1, edges=("dec.L3", "out"))


def test_directions_are_the_traces_and_the_older_name_still_reads():
    from blip_trace_widgets.causal_trace import directions
    from blip_trace_widgets.circuits.names import DIRECTIONS, NOISING, check_direction
    from blip_trace_widgets.circuits.result import EdgeResult

    assert set(DIRECTIONS) == {"noise", "denoise"} and check_direction("restore") == "denoise"
    assert all(NOISING[name] is not directions.of(name).restores for name in DIRECTIONS)
    result = EdgeResult(["img → qe.L0.X0.k"], np.array([0.5]), np.array([0.1]), direction="denoise",
                        clean_score=-0.1, corrupted_score=-2.0)
    older = json.loads(result.to_json())
    older["direction"] = "restore"  # a file written before the circuits took the trace's word
    loaded = EdgeResult.from_json(json.dumps(older))
    assert loaded.direction == "denoise" and loaded.total_effect == pytest.approx(1.9) == result.total_effect
    with pytest.raises(BlipTraceError, match="'noise'.*'denoise'"):
        check_direction("sideways")
