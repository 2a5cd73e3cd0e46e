"""KnockoutExplorer: pick edge groups, an image region and a window, and watch the knockout's line plot update.

    >>> from blip_trace_widgets import load_model
    >>> from blip_trace_widgets.widgets import KnockoutExplorer
    >>> explorer = KnockoutExplorer(load_model("demo"), background=False)   # demo samples in a gallery
    >>> explorer.result.labels[:2]
    ['image → question', 'box (0, 0, 0.5, 0.5) → question']
    >>> explorer.groups.value = ("image", "cls")
    >>> explorer.result.labels
    ['image → question', 'image [CLS] → question']

The region is picked on the patch grid painted over the image (columns and rows of patches); "region" cuts
the question's cross-attention to its patches, "outside" to every other patch. "queries" picks which tokens
stop reading: every token, one token, or each token in turn (a tokens x layers map). "empty" picks what a query
with every key cut reads: nothing (zero) or the mean of the values cut. Knockouts run on the clean input, exactly
by default (cheap: every (group, layer) row is one batch row) or as a first-order estimate; either is
deterministic. Errors show inside the explorer, which carries on; a window the block cannot hold is refused when
the explorer is made, never changed.
"""
from __future__ import annotations

import threading
from typing import Any

import ipywidgets as W
import numpy as np
from PIL import Image, ImageDraw

from ..attention_knockout.edges import Edges, decoder_edges
from ..attention_knockout.knockout import KNOCKOUT_METHODS, Knockout, KnockoutConfig
from ..causal_trace.plots import figure_png
from ..core.cache import LRU
from ..core.errors import BlipTraceError, renamed
from ..core.names import BLOCK_LABELS, EACH_TOKEN, IMAGE_CLS, KNOCKOUT_WINDOW, LANGUAGE_MODEL, LM_DECODER
from ..core.regions import Box, Outside, patch_grid_size
from ..models import heads
from ..models.attention import DEFAULT_EMPTY, EMPTY_ROWS, check_empty
from .controls import set_tooltip
from .live import LiveView, answer_html, image_png, png_width

#: The explorer's edge groups: (label, name).
GROUP_OPTIONS = [("whole image", "image"), ("region", "region"), ("outside region", "outside"),
                 ("image [CLS]", "cls"), ("answer ↛ question", "decoder")]
#: The queries dropdown's value for every token (a dropdown reads None as nothing picked, and shows a blank).
EVERY_TOKEN = "every"


class KnockoutExplorer(LiveView):
    """Live attention knockout of one (image, text) of a BLIP bundle (see the module's notes)."""

    def __init__(self, bundle: Any, image: Any = None, text: str | None = None, *,
                 gallery: Any = None, window: int = KNOCKOUT_WINDOW, background: bool = True,
                 question: str | None = None, empty: str = DEFAULT_EMPTY) -> None:
        text = renamed(text, question, "question", "text")
        check_empty(empty)
        super().__init__(bundle, image, text, gallery=gallery, background=background)
        self._knockouts: LRU[Knockout] = LRU(16)
        style = {"description_width": "initial"}
        decoder = heads.of(self.head).decoder
        # the decoder group, as each decoder reads what its reader made
        reading: dict[str, str] = {LANGUAGE_MODEL: "language model ↛ image", LM_DECODER: "T5 decoder ↛ image"}
        options = [(reading.get(str(decoder), o[0]), o[1]) if o[1] == "decoder" else o
                   for o in GROUP_OPTIONS if o[1] != "decoder" or decoder is not None]
        self.groups = W.SelectMultiple(options=options, value=("image", "region", "outside"), rows=len(options),
                                       description="cut", style=style, layout=W.Layout(width="260px"))
        set_tooltip(self.groups, "edge groups to cut, one line each (ctrl/cmd-click for several)")
        side = self._side()
        self.columns = W.IntRangeSlider(value=(0, side // 2), min=0, max=side, description="region columns",
                                        style=style, continuous_update=False)
        self.rows = W.IntRangeSlider(value=(0, side // 2), min=0, max=side, description="region rows", style=style,
                                     continuous_update=False)
        self.queries = W.Dropdown(description="queries", style=style, layout=W.Layout(width="260px"))
        layers = len(self.tracer.blocks.reader.stack)
        self.window = W.IntSlider(value=self._check_window(window, layers), min=1, max=layers, description="window",
                                  style=style, continuous_update=False)
        self.empty = W.ToggleButtons(options=[(name, name) for name in EMPTY_ROWS], value=empty, description="empty",
                                     style={"button_width": "auto", "description_width": "initial"})
        set_tooltip(self.empty, "what a query with every key cut reads: " + "; ".join(
            f"{rule.name}: {rule.help}" for rule in EMPTY_ROWS.values()))
        self.method = W.ToggleButtons(options=list(KNOCKOUT_METHODS), value="exact", style={"button_width": "auto"})
        set_tooltip(self.method, "exact: cut runs (cheap); estimate: one forward and backward pass, first order")
        self.plot = W.Image(format="png")
        self._sync_queries()
        for control in (self.groups, self.columns, self.rows, self.queries, self.window, self.method, self.empty,
                        self.question_box, self.caption_box, self.word):
            control.observe(self._on_change, names="value")
        self.children = [self._header(), W.HBox([self.groups, W.VBox([self.columns, self.rows, self.queries,
                                                                      self.window, self.method, self.empty])]),
                         self.error, self.plot]
        self.refresh()

    def _check_window(self, window: Any, layers: int) -> int:
        """``window`` if the slider can hold it (1 to the reader's layers); a clear error otherwise, never a
        silently changed setting."""
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= layers:
            raise BlipTraceError(f"window={window!r}: this explorer cuts 1 to {layers} layers around each layer (the "
                                 f"{BLOCK_LABELS[self.tracer.blocks.reader.name]} has {layers}); pass one of those")
        return window

    def _side(self) -> int:
        return patch_grid_size(int(self.tracer.clean.image_embeds.shape[1]))

    def _sync_queries(self) -> None:
        tokens = self.tracer.bundle.tokenizer.convert_ids_to_tokens(list(self.tracer.question_ids))
        options = [("every token", EVERY_TOKEN), *((f"{i}: {t}", i) for i, t in enumerate(tokens)),
                   ("each token (map)", EACH_TOKEN)]
        if list(self.queries.options) != options:
            keep = self.queries.value
            self._syncing = True
            try:
                self.queries.options = options
                self.queries.value = keep if keep in [v for _, v in options] else EVERY_TOKEN
            finally:
                self._syncing = False

    @property
    def region(self) -> Box:
        """The region picked on the patch grid, in fractions of the image."""
        side = self._side()
        (left, right), (top, bottom) = self.columns.value, self.rows.value
        if right <= left or bottom <= top:
            raise BlipTraceError("the region is empty: give it at least one column and one row of patches")
        return Box(left / side, top / side, right / side, bottom / side)

    def controls_config(self) -> KnockoutConfig:
        """The knockout the controls describe."""
        queries = None if self.queries.value in (EVERY_TOKEN, None) else self.queries.value
        by_name = {"image": lambda: Edges(queries), "cls": lambda: Edges(queries, IMAGE_CLS),
                   "region": lambda: Edges(queries, self.region), "outside": lambda: Edges(queries, Outside(self.region)),
                   "decoder": lambda: decoder_edges(str(self.task.decoder))}
        edges = tuple(by_name[name]() for name in self.groups.value)
        return KnockoutConfig(edges=edges, window=int(self.window.value), method=str(self.method.value),
                              empty=str(self.empty.value), **self.scored)

    def _on_change(self, _change: dict) -> None:
        if not self._syncing:
            self.refresh()

    def _run(self, job: threading.Event) -> None:
        tracer = self.tracer
        self.answer_view.value = answer_html(tracer)
        self.sync_words(tracer)
        self._sync_queries()
        self.image_view.value = image_png(self._painted(), self.preview_width)
        key = (self._image_id, self.question_box.value.strip())
        knock = self._knockouts.get_or_make(key, lambda: Knockout(tracer))
        self.config = config = self.controls_config()
        result = knock.run(config)
        if job.is_set():
            return
        self.result = result
        figure = (result.plot_tokens() if self.queries.value == EACH_TOKEN else result.plot()).figure
        self.plot.value = png = figure_png(figure)
        self.plot.layout.width = f"{png_width(png)}px"
        self._dim(False)
        strongest = ", ".join(f"{label}: {change:+.0%} at layer {layer}"
                              for (label, layer, change), tiny in zip(result.strongest(), result.tiny()) if not tiny)
        self.status.value = (f"clean p({result.answer}) {result.clean_score:.3f}; strongest: {strongest or 'none'}"
                             f" · window {result.window} of the {BLOCK_LABELS[tracer.blocks.reader.name]}")

    def _painted(self) -> Image.Image:
        """The image with the patch grid and the picked region drawn on it."""
        image = self.image.convert("RGB").resize((384, 384))
        draw = ImageDraw.Draw(image)
        side = self._side()
        for k in np.linspace(0, 384, side + 1):
            draw.line([(k, 0), (k, 384)], fill=(200, 200, 200), width=1)
            draw.line([(0, k), (384, k)], fill=(200, 200, 200), width=1)
        (left, right), (top, bottom) = self.columns.value, self.rows.value
        if right > left and bottom > top:
            cell = 384 / side
            draw.rectangle([left * cell, top * cell, right * cell, bottom * cell], outline=(255, 0, 0), width=4)
        return image

    def _maps(self) -> list[W.Widget]:
        return [self.plot]
