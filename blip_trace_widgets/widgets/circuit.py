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
draw in one batch). Errors (a counterfactual image missing, exact scores too slow for this model) show inside the
explorer, which keeps its last good figure.
"""
from __future__ import annotations

import html
from typing import Any

import ipywidgets as W

from ..circuits.faithfulness import Curve, Faithfulness, circuit, faithfulness, faithfulness_curve
from ..circuits.inputs import CircuitInputs, circuit_inputs
from ..circuits.names import DEFAULT_SAMPLES, DEFAULT_TOP, METHOD_LABELS, METHODS
from ..circuits.plots import circuit_png
from ..circuits.result import EdgeResult
from ..circuits.scores import edge_scores
from ..core.errors import BlipTraceError

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
        self.children = [W.HBox([self.method, self.corruption]), self.k, self.status, self.error, self.figure]
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
