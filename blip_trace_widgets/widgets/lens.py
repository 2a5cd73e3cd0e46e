"""LensExplorer: the logit or tuned lens of one image and question, live: pick the block, the lens, how many top
tokens, and the answer to follow; pick a cell (position and layer) to see its top 10 tokens.

    >>> from blip_trace_widgets import load_model, demo_samples
    >>> from blip_trace_widgets.widgets.lens import LensExplorer
    >>> image, question, _ = demo_samples()[0]
    >>> explorer = LensExplorer(load_model("demo-blip2"), image, question)
    >>> explorer.result.answer, explorer.kind.value
    ('red', 'logit')
    >>> explorer.kind.value = "tuned"                   # the grid follows
    >>> explorer.result.kind
    'tuned'
    >>> explorer.shows.value = "carries"              # the causal map of the same block and cells
    >>> explorer.trace_result.tokens == explorer.result.labels
    True

A lens is one forward pass, so every change runs at once, in the foreground. Errors (an answer the vocabulary
cannot spell, a model without translators for the tuned lens) show inside the explorer, which carries on with
the last good grid. "What it carries" (:mod:`.toggle`) shows instead the causal map of the same block and cells,
from ``trace()`` with its defaults (a captioner's first caption word, the word the lens follows); a map priced over
``causal_trace.cost.WARN_SECONDS`` waits for its button, its cost said beside it.
"""
from __future__ import annotations

import html
from typing import Any

import ipywidgets as W
import torch

from ..causal_trace.cost import duration, trace_cost
from ..causal_trace.plots import HeatmapRenderer
from ..causal_trace.results import TraceResult
from ..causal_trace.tracer import TraceConfig, Tracer, default_config
from ..core.cache import LRU
from ..core.errors import BlipTraceError
from ..core.inputs import image_digest
from ..core.names import BLOCK_LABELS
from ..lenses.core import lens_log_probs, summarise
from ..lenses.names import CELL_TOP, DEFAULT_TOP, LENS_BLOCKS, LENS_KINDS, LENS_LABELS, LOGIT, MAX_TOP, SAYS
from ..lenses.plots import lens_png
from ..lenses.reading import lens_block, read
from ..lenses.result import LensResult
from ..lenses.tuned import TunedLens
from ..models import heads
from ..models.heads import head_of_model
from .toggle import causal_rows, cell_html, misaligned, pick, refusal, shows_toggle, top_tokens


def carried_config(bundle: Any, block: str, answer: str | None) -> TraceConfig:
    """The causal map's configuration beside a lens: ``trace()``'s defaults on ``block``, scoring the answer the
    lens follows (a captioner: the first caption word, whose prediction the prompt's positions carry)."""
    word = 0 if heads.of(bundle).scores_words else None
    return default_config(bundle, block=block, answer=answer, word=word)


class LensExplorer(W.VBox):
    """Live lens of one (image, text) of a bundle (see the module's notes). ``tuned``: a trained lens to use for
    ``kind="tuned"`` (default: the translators shipped with a demo model). ``shows``: "says" (the lens) or
    "carries" (the causal map of the same block and cells)."""

    def __init__(self, bundle: Any, image: Any, text: str = "", *, block: str | None = None, kind: str = LOGIT,
                 top: int = DEFAULT_TOP, answer: str | None = None, tuned: TunedLens | None = None,
                 shows: str = SAYS) -> None:
        super().__init__()
        self.bundle, self.image, self.tuned = bundle, image, tuned
        block = lens_block(bundle, block)
        blocks = LENS_BLOCKS[head_of_model(bundle.model).name]
        style = {"description_width": "initial"}
        self.text = W.Text(value=text, description="text", style=style, continuous_update=False,
                           layout=W.Layout(width="420px"))
        self.block = W.Dropdown(options=[(BLOCK_LABELS.get(b, b), b) for b in blocks], value=block, description="block",
                                style=style)
        self.kind = W.ToggleButtons(options=[(LENS_LABELS[k], k) for k in LENS_KINDS], value=kind,
                                    style={"button_width": "auto"})
        self.top = W.IntSlider(value=top, min=1, max=MAX_TOP, description="top tokens", style=style,
                               continuous_update=False)
        self.answer = W.Text(value=answer or "", description="answer to follow", placeholder="the model's own",
                             style=style, continuous_update=False)
        self.shows = shows_toggle(shows)
        self.position = W.Dropdown(description="position", style=style)
        self.layer = W.Dropdown(description="layer", style=style)
        self.error = W.HTML()
        self.grid = W.Image(format="png")
        self.map, self.cost, self.go = W.Image(format="png"), W.HTML(), W.Button(description="trace it")
        self.cell = W.HTML()
        self.result: LensResult | None = None
        self.trace_result: TraceResult | None = None  # the causal map shown for "what it carries"
        self._logp: torch.Tensor | None = None
        self._tracers: LRU[Tracer] = LRU(4)
        self._renderer = HeatmapRenderer()
        self._confirmed: set[tuple[Any, ...]] = set()  # long maps the button was pressed for
        for control in (self.text, self.block, self.kind, self.top, self.answer, self.shows):
            control.observe(self._on_change, names="value")
        for control in (self.position, self.layer):
            control.observe(lambda _change: self._show_cell(), names="value")
        self.go.on_click(lambda _button: self.refresh(confirmed=True))
        self.children = [W.HBox([self.text, self.block]), W.HBox([self.shows, self.kind, self.top, self.answer]),
                         self.error, self.grid, W.HBox([self.cost, self.go]), self.map,
                         W.HBox([self.position, self.layer]), self.cell]
        self.refresh()

    def _on_change(self, _change: dict) -> None:
        self.refresh()

    def refresh(self, confirmed: bool = False) -> None:
        """Run the lens the controls describe (and for "what it carries" the causal map, once its cost allows or
        ``confirmed``); an error is shown, and the last good grid kept."""
        try:
            self._run()
            self.error.value = ""
            self._carry(confirmed)
        except BlipTraceError as error:
            self.error.value = refusal(str(error))
        except Exception as error:  # noqa: BLE001 (a bug shows here too: the kernel and the explorer carry on)
            self.error.value = refusal(f"unexpected {type(error).__name__}: {error}")

    def _run(self) -> None:
        kind, block = str(self.kind.value), str(self.block.value)
        reading = read(self.bundle, self.image, self.text.value, block)
        logp = lens_log_probs(self.bundle, reading, kind, self.tuned)
        result = summarise(self.bundle, reading, logp, kind=kind, text=self.text.value, top=int(self.top.value),
                           answer=self.answer.value.strip() or None)
        self._logp, self.result = logp, result
        self.grid.value = lens_png(result, "grid")
        pick(self.position, [(f"{p}: {label}", p) for p, label in enumerate(result.labels)])
        pick(self.layer, [(str(layer), layer) for layer in range(result.layers)])
        self._show_cell()

    def _carry(self, confirmed: bool) -> None:
        """"What it carries": the causal map of the lens's block and cells, priced first; a long one waits for
        the button."""
        carries = self.shows.value != SAYS
        self.grid.layout.display = "none" if carries else None
        self.map.layout.display = self.cost.layout.display = None if carries else "none"
        self.go.layout.display = "none"
        if not carries or self.result is None:
            return
        text, block = self.text.value, str(self.block.value)
        config = carried_config(self.bundle, block, self.answer.value.strip() or None)
        tracer = self._tracers.get_or_make((image_digest(self.image), text),
                                           lambda: Tracer(self.bundle, self.image, text))
        cost, key = trace_cost(tracer, config), (image_digest(self.image), text, config)
        confirmed = confirmed or key in self._confirmed
        self.cost.value = f"<i>the causal map: {html.escape(cost.describe())}</i>"
        if cost.heavy and not confirmed:
            self.cost.value = f"<b>{html.escape(cost.warning() or '')}</b>"
            self.go.description = f"trace it (about {duration(cost.seconds)})"
            self.go.layout.display = None
            self.map.layout.display = "none"
            self.trace_result = None
            return
        self._confirmed.add(key)
        self.trace_result = tracer.trace(config)
        note = misaligned(self.trace_result, self.result)
        if note is not None:
            self.error.value = refusal(note)
        self.map.value = self._renderer.png(self.trace_result)
        self._show_cell()

    def cell_tokens(self, position: int, layer: int, k: int = CELL_TOP) -> list[tuple[str, float]]:
        """The top ``k`` tokens and their probabilities at (position, layer) of the current lens."""
        if self._logp is None:
            raise BlipTraceError("no lens has run yet: fix the error shown above")
        return top_tokens(self.bundle, self._logp, position, layer, k)

    def _show_cell(self) -> None:
        if self.result is None or self.position.value is None or self.layer.value is None:
            self.cell.value = ""
            return
        position, layer = int(self.position.value), int(self.layer.value)
        if position >= len(self.result.labels) or layer >= self.result.layers:  # a picker between its options
            return
        shown = self.trace_result if self.shows.value != SAYS else None
        lined_up = shown is not None and misaligned(shown, self.result) is None
        self.cell.value = cell_html(self.result.labels[position], layer, self.cell_tokens(position, layer),
                                    causal_rows([shown], position, layer) if shown is not None and lined_up else [],
                                    shown)
