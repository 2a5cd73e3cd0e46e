"""Circuits of BLIP VQA, and of BLIP-2 and InstructBLIP with an OPT or a Flan-T5 language model: which nodes feed
which, scored by edge attribution (EAP, EAP-IG) or exact path patching, kept as the top edges, and checked for faithfulness.

    >>> from blip_trace_widgets import load_model, demo_samples
    >>> from blip_trace_widgets.circuits import circuit, circuit_graph, edge_scores, faithfulness
    >>> bundle = load_model("demo")
    >>> image, question, _ = demo_samples()[0]
    >>> scores = edge_scores(bundle, image, question, method="eap-ig", samples=2)
    >>> kept = circuit(scores, fraction=0.15)
    >>> round(kept.fraction, 2), len(circuit_graph(bundle).edges)
    (0.15, 3417)

The graph and what patching an edge means are in :mod:`~.graph` and :mod:`~.patching`; scores in :mod:`~.scores`
(:mod:`~.attribution` for EAP and EAP-IG); circuit runs and faithfulness in :mod:`~.faithfulness`; averages over a
dataset in :mod:`~.sweep`, and what two of them share in :mod:`~.universal`; figures in :mod:`~.plots`; the command
line in :mod:`~.command`.
"""
from __future__ import annotations

from .faithfulness import Circuit, Curve, Faithfulness, circuit, faithfulness_curve
from .faithfulness import faithfulness as faithfulness  # the function, not its module
from .graph import CircuitGraph, circuit_graph
from .inputs import CircuitInputs, circuit_inputs
from .patching import PathResult, path_patch
from .plots import plot_circuit
from .result import EdgeResult
from .scores import edge_scores
from .sweep import EdgeAverage, edge_sweep, plot_edge_average
from .universal import Overlap, QuestionFaithfulness, Universal, dataset_faithfulness, node_scores, universal_heads

__all__ = ["Circuit", "CircuitGraph", "CircuitInputs", "Curve", "EdgeAverage", "EdgeResult", "Faithfulness", "Overlap",
           "PathResult", "QuestionFaithfulness", "Universal", "circuit", "circuit_graph", "circuit_inputs",
           "dataset_faithfulness", "edge_scores", "edge_sweep", "faithfulness", "faithfulness_curve", "node_scores",
           "path_patch", "plot_circuit", "plot_edge_average", "universal_heads"]
