"""Edge sweeps: the average over questions against each question's own edge scores and statistics written here in
numpy, the comparison of two averages on hand-made results, strict JSON, the command line's --dataset, refusals."""
from __future__ import annotations

import functools
import itertools
import json
import math
import warnings

import numpy as np
import pytest

from blip_trace_widgets.causal_trace.cost import LongTraceWarning
from blip_trace_widgets.circuits import sweep as sweep_module
from blip_trace_widgets.circuits.faithfulness import circuit, faithfulness
from blip_trace_widgets.circuits.graph import circuit_graph
from blip_trace_widgets.circuits.result import EdgeResult
from blip_trace_widgets.circuits.scores import edge_scores
from blip_trace_widgets.circuits.sweep import EdgeAverage, edge_sweep, plot_edge_average
from blip_trace_widgets.circuits.universal import dataset_faithfulness, node_scores, universal_heads
from blip_trace_widgets.core.errors import BlipTraceError
from blip_trace_widgets.datasets.easy_vqa import demo_samples, easy_vqa_pairs
from blip_trace_widgets.models.loading import load_model

#: Student's t, two-sided 95%, on 2 degrees of freedom (three questions).
T_95_DF2 = 4.302652729749464


@functools.lru_cache(maxsize=1)
def demo():
    return load_model("demo")


@functools.lru_cache(maxsize=1)
def three():
    """The demo's three questions (one colour, one shape, one yes/no) and their EAP sweep."""
    items = demo_samples(per_type=1)
    return items, edge_sweep(demo(), items, method="eap", samples=2, seed=3)


def numpy_bh(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg, written out: q_(i) = min over j >= i of p_(j) * m / j, capped at 1."""
    order = np.argsort(p, kind="stable")
    m = len(p)
    ranked = p[order] * m / np.arange(1, m + 1)
    q = np.empty(m)
    running = 1.0
    for i in range(m - 1, -1, -1):
        running = min(running, ranked[i])
        q[order[i]] = running
    return q


@pytest.mark.slow
def test_the_average_is_each_question_s_own_scores_with_t_intervals_and_bh_qvalues():
    items, average = three()
    own = np.stack([edge_scores(demo(), item.image, item.question, method="eap", samples=2, seed=3).scores
                    for item in items])
    np.testing.assert_array_equal(average.scores, own)  # each question kept, as edge_scores gives it
    assert [r.question for r in average.results] == [item.question for item in items]
    mean = own.mean(0)
    stderr = own.std(0, ddof=1) / math.sqrt(3)
    np.testing.assert_allclose(average.mean, mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(average.stderr, stderr, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(average.low, mean - T_95_DF2 * stderr, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(average.high, mean + T_95_DF2 * stderr, rtol=1e-6, atol=1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.abs(mean / stderr)
        p = 1.0 - t / np.sqrt(t * t + 2.0)  # Student's t on 2 degrees of freedom, two-sided, in closed form
    p = np.where(stderr == 0, np.where(mean == 0, 1.0, 0.0), p)
    np.testing.assert_allclose(average.pvalues, p, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(average.qvalues, numpy_bh(p), rtol=1e-6, atol=1e-12)
    assert (average.significant() == (numpy_bh(p) < 0.05)).all()
    frame = average.to_dataframe()
    assert len(frame) == len(average.edges) and frame["rank"].min() == 1
    assert frame.loc[frame["rank"] == 1, "edge"].item() == average.top(1)[0]
    assert len(average.question_table()) == 3 * len(average.edges)


def hand_average(rows: list[list[float]], edges: list[str]) -> EdgeAverage:
    return EdgeAverage([EdgeResult(edges, np.array(r, dtype=float), np.zeros(len(edges)), question=f"q{i}")
                        for i, r in enumerate(rows)])


EDGES = ["img → qe.L0.X0.k", "img → qe.L0.X1.v", "qe.emb → qe.L0.H0.q", "qe.L0.H0 → qe.L0.mlp",
         "qe.L0.X0 → qe.L0.mlp", "qe.L0.X1 → qe.L0.mlp", "qe.L0.mlp → dec.L0.X0.k", "dec.L0.X0 → out"]


def brute_force_tail(seen: int, total: int, k1: int, k2: int) -> float:
    """P(overlap >= seen) over every k2-set of ``total`` items against a fixed k1-set."""
    fixed = set(range(k1))
    hits = [len(fixed & set(chosen)) >= seen for chosen in itertools.combinations(range(total), k2)]
    return sum(hits) / len(hits)


def test_universal_edges_and_heads_of_hand_made_averages():
    colour = hand_average([[5, 0, 1, 0, 4, 0, 3, 2], [7, 0, -1, 0, 4, 0, 3, 2]], EDGES)
    shape = hand_average([[-6, 1, 0, 2, 0, 0, 5, 0], [-6, 1, 0, 2, 0, 0, 5, 0]], EDGES)
    found = universal_heads(colour, shape, k=3, heads=2)
    assert found.edges.first == ["img → qe.L0.X0.k", "qe.L0.X0 → qe.L0.mlp", "qe.L0.mlp → dec.L0.X0.k"]
    assert found.edges.second == ["img → qe.L0.X0.k", "qe.L0.mlp → dec.L0.X0.k", "qe.L0.H0 → qe.L0.mlp"]
    assert found.edges.shared == ["img → qe.L0.X0.k", "qe.L0.mlp → dec.L0.X0.k"]
    assert found.edges.expected == pytest.approx(3 * 3 / 8)
    assert found.edges.p_value == pytest.approx(brute_force_tail(2, 8, 3, 3))
    # a head's score: |mean| of the edges it sends plus those into its q, k, v
    scores = node_scores(colour)
    assert scores["qe.L0.X0"] == pytest.approx(6 + 4) and scores["qe.L0.H0"] == pytest.approx(0 + 0)
    assert scores["dec.L0.X0"] == pytest.approx(3 + 2) and scores["qe.L0.mlp"] == pytest.approx(4 + 3)
    assert found.heads.first == ["qe.L0.X0", "dec.L0.X0"]
    assert found.heads.second == ["qe.L0.X0", "dec.L0.X0"]  # X0: 6, dec X0: 5, H0: 2, X1: 1
    assert found.heads.total == 4 and found.heads.shared == ["qe.L0.X0", "dec.L0.X0"]
    assert found.heads.p_value == pytest.approx(brute_force_tail(2, 4, 2, 2))
    table = found.table.set_index("node")
    assert table.loc["qe.L0.X0", "colour_rank"] == 1 and bool(table.loc["qe.L0.X0", "shared"])
    assert not bool(table.loc["qe.L0.mlp", "head"]) and bool(table.loc["dec.L0.X0", "head"])
    json.loads(found.to_json())
    assert "2 of the top 3 edges shared" in found.describe()


def test_strict_json_round_trip_keeps_every_question():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        average = hand_average([[1.0, 2.0, 0.0, 0.5, 0, 0, 0, 0]], EDGES)  # one question: no interval, no test
    assert np.isnan(average.low).all() and np.isnan(average.qvalues).all()
    text = average.to_json()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in strict JSON"))
    again = EdgeAverage.from_json(text)
    assert again == average and again.results[0].question == "q0"
    two = hand_average([[1, 2, 0, 0.5, 0, 0, 0, 0], [3, -2, 0, 0.5, 0, 0, 0, 0]], EDGES)
    again = EdgeAverage.from_json(two.to_json())
    assert again == two and np.array_equal(again.scores, two.scores) and again != average
    np.testing.assert_array_equal(again.qvalues, two.qvalues)
    with pytest.raises(BlipTraceError, match="not an edge average"):
        EdgeAverage.from_json(two.results[0].to_json())


def test_bad_input_is_refused_naming_the_fix():
    with pytest.raises(BlipTraceError, match="at least one question"):
        EdgeAverage([])
    with pytest.raises(BlipTraceError, match="same edges"):
        EdgeAverage([EdgeResult(EDGES, np.zeros(8), np.zeros(8)), EdgeResult(EDGES[:2], np.zeros(2), np.zeros(2))])
    with pytest.raises(BlipTraceError, match="no questions"):
        edge_sweep(demo(), [], method="eap")
    with pytest.raises(BlipTraceError, match="needs its items"):
        edge_sweep(demo(), None, method="eap")  # type: ignore[arg-type]
    with pytest.raises(BlipTraceError, match="unknown method"):
        edge_sweep(demo(), demo_samples(per_type=1), method="lrp")
    with pytest.raises(BlipTraceError, match="scored must be"):
        edge_sweep(demo(), demo_samples(per_type=1), scored="theirs")
    with pytest.raises(BlipTraceError, match="has no answer"):
        edge_sweep(demo(), [(demo_samples()[0].image, "what color is the shape?")], scored="expected")
    with pytest.raises(BlipTraceError, match="pairs bring their own corruption"):
        edge_sweep(demo(), easy_vqa_pairs("color", limit=1), corruption=demo_samples()[1].image)
    colour = hand_average([[1, 0, 0, 0, 0, 0, 0, 0]], EDGES)
    with pytest.raises(BlipTraceError, match="from 1 to 8"):
        universal_heads(colour, colour, k=9)
    with pytest.raises(BlipTraceError, match="different edges"):
        universal_heads(colour, hand_average([[1, 0]], EDGES[:2]))
    with pytest.raises(BlipTraceError, match="two edge averages"):
        universal_heads(colour, colour.results[0])  # type: ignore[arg-type]


def test_the_sweep_is_priced_before_the_rest_and_warned_about(monkeypatch):
    monkeypatch.setattr(sweep_module, "WARN_SECONDS", 0.0)  # any sweep is "long"
    done = []
    with pytest.warns(LongTraceWarning, match=r"this edge sweep should take about \d+ s .*2 questions, EAP"):
        edge_sweep(demo(), demo_samples(per_type=1), method="eap", samples=1, limit=2, progress=done.append)
    assert done == [1, 2]
    monkeypatch.setattr(sweep_module, "WARN_SECONDS", 1e9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LongTraceWarning)
        edge_sweep(demo(), demo_samples(per_type=1), method="eap", samples=1, limit=1)


def test_the_figure_greys_what_is_not_significant():
    from blip_trace_widgets.circuits.graph import circuit_graph

    graph = circuit_graph(demo())
    rng = np.random.default_rng(0)
    average = EdgeAverage([EdgeResult(graph.edges, rng.normal(size=len(graph)), np.zeros(len(graph)),
                                      shape=dict(vars(graph.shape))) for _ in range(3)])
    significant = np.zeros(len(graph), dtype=bool)
    significant[average.order()[:4]] = True
    average.qvalues = np.where(significant, 0.001, 0.5)  # four of the top edges made significant
    figure = plot_edge_average(average, k=10)
    ax = figure.axes[0]
    assert ax.get_title().startswith("4 of 3417 edges significant (q < 0.05, 3 questions)")
    lines = [line for line in ax.get_lines() if len(line.get_xdata()) == 2]
    assert [line.get_linestyle() for line in lines].count("--") == 6
    solid = [line.get_color() for line in lines if line.get_linestyle() == "-"]
    assert len(solid) == 4 and "#a0a0a0" not in solid


@pytest.mark.slow
def test_the_command_averages_a_dataset(tmp_path, capsys):
    from blip_trace_widgets.cli import main

    out = tmp_path / "out"
    code = main(["circuit", "--dataset", "easy-vqa-shape", "--limit", "2", "--method", "eap", "--samples", "2",
                 "--top", "10", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    stem = out / "circuit-eap-easy-vqa-shape"
    average = EdgeAverage.from_json((stem.parent / f"{stem.name}.json").read_text())
    assert average.questions == 2 and len(average.edges) == 3417
    import pandas as pd

    table = pd.read_csv(f"{stem}.csv")
    assert len(table) == 3417 and {"mean", "low", "high", "p_value", "q_value", "significant"} <= set(table.columns)
    assert len(pd.read_csv(f"{stem}-questions.csv")) == 2 * 3417
    assert (stem.parent / f"{stem.name}.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "edges significant (q < 0.05, 2 questions)" in printed and f"wrote {stem}.json" in printed
    assert main(["circuit", "--dataset", "easy-vqa-shape", "--question", "q?", "--out", str(out)]) == 2
    assert "for one image" in capsys.readouterr().err
    assert main(["circuit", "--dataset", "easy-vqa-shape", "--pairs", "color", "--out", str(out)]) == 2
    assert "give one of --image" in capsys.readouterr().err
    assert main(["circuit", "--pairs", "color", "--limit", "0", "--out", str(out)]) == 2
    assert "--limit must be 1 or more" in capsys.readouterr().err


@pytest.mark.slow
def test_pairs_are_corrupted_by_their_own_partner_and_faithfulness_is_per_question():
    pairs = easy_vqa_pairs("shape", limit=3)
    average = edge_sweep(demo(), pairs, method="eap-ig", steps=3)
    for pair, result in zip(pairs, average.results):
        own = edge_scores(demo(), pair.image, pair.question, method="eap-ig", steps=3,
                          corruption=pair.counterfactual_image)
        np.testing.assert_array_equal(result.scores, own.scores)
        assert result.corruption["name"] == "image_swap" and result.samples == 1
    from blip_trace_widgets.datasets.subsets import hf_pairs

    rows = [{"image": p.image, "counterfactual_image": p.counterfactual_image, "question": p.question,
             "answer": p.answer, "counterfactual_answer": p.counterfactual_answer} for p in pairs]
    again = edge_sweep(demo(), hf_pairs(rows), method="eap-ig", steps=3)  # a dataset's pairs, read alike
    np.testing.assert_array_equal(again.scores, average.scores)
    np.testing.assert_array_equal(again.qvalues, average.qvalues)
    kept = circuit(average.as_result(), fraction=0.15)
    found = dataset_faithfulness(demo(), pairs, average)  # 15% by default
    assert found.edges == kept.k
    own_values = np.array([faithfulness(demo(), p.image, p.question, kept, corruption=p.counterfactual_image).value
                           for p in pairs])
    np.testing.assert_allclose(found.values, own_values, rtol=1e-12)
    half = T_95_DF2 * own_values.std(ddof=1) / math.sqrt(3)
    assert found.mean == pytest.approx(own_values.mean())
    assert (found.low, found.high) == pytest.approx((own_values.mean() - half, own_values.mean() + half), rel=1e-6)
    assert "over 3 questions" in found.describe()


def test_an_exact_sweep_of_blip2_is_each_question_s_own_exact_scores():
    """BLIP-2's graph sweeps as BLIP's does (the network is the model family's own)."""
    bundle = load_model("demo-blip2")
    items = demo_samples(per_type=1)[:2]
    edges = circuit_graph(bundle).edges_between("qf.L3.*", "lm.L0.*")[:4]
    average = edge_sweep(bundle, items, method="exact", samples=2, seed=3, edges=edges)
    own = np.stack([edge_scores(bundle, item.image, item.question, method="exact", samples=2, seed=3,
                                edges=edges).scores for item in items])
    assert len(edges) == 4 and average.edges == edges
    np.testing.assert_allclose(average.scores, own, rtol=1e-6, atol=1e-7)
