"""CircuitExplorer: the circuit of one image and question, live: a slider for the circuit's size redraws the graph
and measures its faithfulness; the method and the corruption rescore the edges.

    >>> from blip_trace_widgets import load_model, demo_samples
    >>> from blip_trace_widgets.widgets.circuit import CircuitExplorer
    >>> image, question, _ = demo_samples()[0]
    >>> explorer = CircuitExplorer(load_model("demo"), image, question, samples=2)
    >>> explorer.result.method, explorer.k.value
    ('eap-ig', 50)
    >>> explorer.k.value = 400                       # the figure and the faithfulness follow
    >>> explorer.faithfulness.edges
    400

Edge scores are computed once per (method, corruption) and kept; moving the slider runs one circuit run (every
draw in one batch). Picking a node of the circuit (``explorer.node``) shows its own causal map from ``trace()``: its
block's map of its kind (a head's row among its layer's heads, an MLP's layer), under the circuit's corruption and
direction, priced first (a map over ``WARN_SECONDS`` waits for its "trace it" button). Errors (a counterfactual
image missing, exact scores too slow for this model, a node with no map) show inside the explorer, which keeps its
last good figure.
"""
from __future__ import annotations

import html
from typing import Any

import ipywidgets as W

from ..causal_trace.cost import duration, trace_cost
from ..causal_trace.plots import HeatmapRenderer
from ..causal_trace.results import TraceResult
from ..causal_trace.tracer import TraceConfig, Tracer, default_config
from ..circuits.faithfulness import Curve, Faithfulness, circuit, faithfulness, faithfulness_curve
from ..circuits.inputs import CircuitInputs, circuit_inputs
from ..circuits.names import DEFAULT_SAMPLES, DEFAULT_TOP, METHOD_LABELS, METHODS, OUT, split_edge
from ..circuits.nodes import node_cell
from ..circuits.plots import circuit_png
from ..circuits.result import EdgeResult
from ..circuits.scores import edge_scores
from ..core.errors import BlipTraceError
from ..core.names import BLOCK_LABELS, KIND_LABELS
from ..corruptions.kinds import ImageSwap

NOISE, PAIR = "noise", "counterfactual image"


class CircuitExplorer(W.VBox):
    """Live circuit of one (image, question) of a BLIP VQA bundle (see the module's notes). ``counterfactual``: an
    image to offer as the corruption beside noise."""

    def __init__(self, bundle: Any, image: Any, question: str, *, method: str = "eap-ig", k: int = DEFAULT_TOP,
                 samples: int = DEFAULT_SAMPLES, counterfactual: Any = None) -> None:
        super().__init__()
        self.bundle, self.image, self.question, self.counterfactual = bundle, image, question, counterfactual
        self.samples = samples
        style = {"description_width": "initial"}
        self.method = W.ToggleButtons(options=[(METHOD_LABELS[m], m) for m in METHODS], value=method,
                                      style={"button_width": "auto"})
        self.corruption = W.ToggleButtons(options=[NOISE, PAIR] if counterfactual is not None else [NOISE], value=NOISE)
        self.k = W.IntSlider(value=k, min=1, max=max(k, 10**6), description="edges kept", style=style, continuous_update=False,
                             layout=W.Layout(width="520px"))
        self.figure = W.Image(format="png")
        self.status, self.error = W.HTML(), W.HTML()
        self._cache: dict[tuple[str, str], tuple[EdgeResult, Curve, CircuitInputs]] = {}
        self.result: EdgeResult | None = None
        self.faithfulness: Faithfulness | None = None
        self.node = W.Dropdown(options=[("(pick a node of the circuit)", "")], value="", description="node's map",
                               style=style, layout=W.Layout(width="420px"))
        self.node_note, self.node_map = W.HTML(), W.Image(format="png", layout=W.Layout(display="none"))
        self.node_go = W.Button(description="trace it", layout=W.Layout(display="none"))
        self.node_result: TraceResult | None = None
        self._tracer: Tracer | None = None
        self._renderer = HeatmapRenderer()
        self.children = [W.HBox([self.method, self.corruption]), self.k, self.status, self.error, self.figure,
                         W.HBox([self.node, self.node_go]), self.node_note, self.node_map]
        self.node.observe(lambda _: self.show_node(), "value")
        self.node_go.on_click(lambda _: self.show_node(confirmed=True))
        self.method.observe(lambda _: self.rescore(), "value")
        self.corruption.observe(lambda _: self.rescore(), "value")
        self.k.observe(lambda _: self.redraw(), "value")
        self.rescore()

    def _scored(self) -> tuple[EdgeResult, Curve, CircuitInputs]:
        key = (self.method.value, self.corruption.value)
        if key not in self._cache:
            corruption = self.counterfactual if self.corruption.value == PAIR else None
            pair = circuit_inputs(self.bundle, self.image, self.question, corruption=corruption, samples=self.samples)
            result = edge_scores(self.bundle, self.image, self.question, method=self.method.value, inputs=pair)
            curve = faithfulness_curve(self.bundle, self.image, self.question, result, inputs=pair)
            self._cache[key] = (result, curve, pair)
        return self._cache[key]

    def rescore(self) -> None:
        """Score the edges by the chosen method and corruption (kept), then redraw."""
        try:
            result, _, _ = self._scored()
        except BlipTraceError as error:
            self.error.value = f"<span style='color:#b2182b'>{html.escape(str(error))}</span>"
            return
        self.error.value = ""
        self.result = result
        with self.k.hold_trait_notifications():
            self.k.max = len(result.edges)
            self.k.value = min(self.k.value, len(result.edges))
        self.redraw()
        if self.node.value:  # the picked node's map follows the corruption and direction
            self.show_node()

    def redraw(self) -> None:
        """The figure of the top-k edges and the faithfulness of that circuit."""
        if self.result is None:
            return
        result, curve, pair = self._scored()
        kept = circuit(result, k=int(self.k.value))
        try:
            self.faithfulness = faithfulness(self.bundle, self.image, self.question, kept, inputs=pair)
        except BlipTraceError as error:
            self.error.value = f"<span style='color:#b2182b'>{html.escape(str(error))}</span>"
            return
        f = self.faithfulness
        self.status.value = (f"{kept.k} of {kept.total} edges ({100 * kept.fraction:.1f}%): faithfulness "
                             f"{f.value:.2f} [{f.low:.2f}, {f.high:.2f}] over {pair.samples} draw"
                             f"{'s' if pair.samples != 1 else ''}; curve area {curve.area:.2f}")
        self.figure.value = circuit_png(result, min(kept.k, 200), curve)
        nodes = list(dict.fromkeys(n for edge in kept.edges for n in _ends(edge) if n != OUT))
        with self.node.hold_trait_notifications():
            chosen = self.node.value if self.node.value in nodes else ""
            self.node.options = [("(pick a node of the circuit)", ""), *[(n, n) for n in nodes]]
            self.node.value = chosen

    def node_config(self, node: str) -> tuple[TraceConfig, str]:
        """The trace configuration of ``node``'s own map (the circuit's corruption and direction, its samples) and
        where the node sits in it."""
        cell = node_cell(self.bundle, node)
        corruption = ImageSwap(self.counterfactual) if self.corruption.value == PAIR else None
        direction = self.result.direction if self.result is not None else "noise"
        config = default_config(self.bundle, block=cell.block, kind=cell.kind, window=1, samples=self.samples,
                                direction=direction, **({"corruption": corruption} if corruption else {}))
        where = f"layer {cell.layer}" + (f", head {cell.head} (row {cell.head})" if cell.head is not None else "")
        label = f"{BLOCK_LABELS.get(cell.block, cell.block)}, {KIND_LABELS.get(cell.kind, cell.kind)}"
        return config, f"{node}: {label}, {where}"

    def show_node(self, confirmed: bool = False) -> None:
        """The picked node's own causal map, priced first: one over ``WARN_SECONDS`` waits for the button."""
        self.node_go.layout.display = self.node_map.layout.display = "none"
        self.node_result = None
        node = str(self.node.value)
        if not node:
            self.node_note.value = ""
            return
        try:
            config, where = self.node_config(node)
            if self._tracer is None:
                self._tracer = Tracer(self.bundle, self.image, self.question)
            cost = trace_cost(self._tracer, config)
            if cost.heavy and not confirmed:
                self.node_note.value = f"<b>{html.escape(cost.warning() or '')}</b>"
                self.node_go.description = f"trace it (about {duration(cost.seconds)})"
                self.node_go.layout.display = None
                return
            self.node_result = self._tracer.trace(config)
        except BlipTraceError as error:
            self.node_note.value = f"<span style='color:#b2182b'>{html.escape(str(error))}</span>"
            return
        self.node_note.value = f"<i>{html.escape(where)}; {html.escape(cost.describe())}</i>"
        self.node_map.value = self._renderer.png(self.node_result)
        self.node_map.layout.display = None


def _ends(edge: str) -> tuple[str, str]:
    """An edge's sender node and receiver node (the receiver's channel without its q/k/v)."""
    sender, receiver = split_edge(edge)
    return sender, receiver.rsplit(".", 1)[0] if receiver.endswith((".q", ".k", ".v")) else receiver
