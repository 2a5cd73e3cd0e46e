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

A lens is one forward pass, so every change runs at once, in the foreground. Errors (an answer the vocabulary
cannot spell, a model without translators for the tuned lens) show inside the explorer, which carries on with
the last good grid.
"""
from __future__ import annotations

import html
from typing import Any

import ipywidgets as W
import torch

from ..core.errors import BlipTraceError
from ..core.names import BLOCK_LABELS
from ..lenses.core import lens_log_probs, summarise, token_texts
from ..lenses.names import CELL_TOP, DEFAULT_TOP, LENS_BLOCKS, LENS_KINDS, LENS_LABELS, LOGIT, MAX_TOP
from ..lenses.plots import lens_png
from ..lenses.reading import Reading, lens_block, read
from ..lenses.result import LensResult
from ..lenses.tuned import TunedLens
from ..models.heads import head_of_model


class LensExplorer(W.VBox):
    """Live lens of one (image, text) of a bundle (see the module's notes). ``tuned``: a trained lens to use for
    ``kind="tuned"`` (default: the translators shipped with a demo model)."""

    def __init__(self, bundle: Any, image: Any, text: str = "", *, block: str | None = None, kind: str = LOGIT,
                 top: int = DEFAULT_TOP, answer: str | None = None, tuned: TunedLens | None = None) -> None:
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
        self.position = W.Dropdown(description="position", style=style)
        self.layer = W.Dropdown(description="layer", style=style)
        self.error = W.HTML()
        self.grid = W.Image(format="png")
        self.cell = W.HTML()
        self.result: LensResult | None = None
        self._reading: Reading | None = None
        self._logp: torch.Tensor | None = None
        for control in (self.text, self.block, self.kind, self.top, self.answer):
            control.observe(self._on_change, names="value")
        for control in (self.position, self.layer):
            control.observe(lambda _change: self._show_cell(), names="value")
        self.children = [W.HBox([self.text, self.block]), W.HBox([self.kind, self.top, self.answer]), self.error,
                         self.grid, W.HBox([self.position, self.layer]), self.cell]
        self.refresh()

    def _on_change(self, _change: dict) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Run the lens the controls describe; an error is shown, and the last good grid kept."""
        try:
            self._run()
            self.error.value = ""
        except BlipTraceError as error:
            self.error.value = f"<span style='color:#a00'>{html.escape(str(error))}</span>"
        except Exception as error:  # noqa: BLE001 (a bug shows here too: the kernel and the explorer carry on)
            self.error.value = (f"<span style='color:#a00'>unexpected {type(error).__name__}: "
                                f"{html.escape(str(error))}</span>")

    def _run(self) -> None:
        kind, block = str(self.kind.value), str(self.block.value)
        reading = read(self.bundle, self.image, self.text.value, block)
        logp = lens_log_probs(self.bundle, reading, kind, self.tuned)
        result = summarise(self.bundle, reading, logp, kind=kind, text=self.text.value, top=int(self.top.value),
                           answer=self.answer.value.strip() or None)
        self._reading, self._logp, self.result = reading, logp, result
        self.grid.value = lens_png(result, "grid")
        positions = [(f"{p}: {label}", p) for p, label in enumerate(result.labels)]
        if list(self.position.options) != positions:
            self.position.options = positions
            self.position.value = len(positions) - 1
        layers = [(str(layer), layer) for layer in range(result.layers)]
        if list(self.layer.options) != layers:
            self.layer.options = layers
            self.layer.value = result.layers - 1
        self._show_cell()

    def cell_tokens(self, position: int, layer: int, k: int = CELL_TOP) -> list[tuple[str, float]]:
        """The top ``k`` tokens and their probabilities at (position, layer) of the current lens."""
        if self._logp is None:
            raise BlipTraceError("no lens has run yet: fix the error shown above")
        probs, ids = self._logp[layer, position].exp().topk(min(k, self._logp.shape[-1]))
        return list(zip(token_texts(self.bundle.tokenizer, ids.tolist()), probs.tolist()))

    def _show_cell(self) -> None:
        if self.result is None or self.position.value is None or self.layer.value is None:
            self.cell.value = ""
            return
        position, layer = int(self.position.value), int(self.layer.value)
        rows = "".join(f"<tr><td>{i + 1}</td><td>{html.escape(token)}</td><td>{p:.3f}</td></tr>"
                       for i, (token, p) in enumerate(self.cell_tokens(position, layer)))
        self.cell.value = (f"<b>{html.escape(self.result.labels[position])}</b> at layer {layer}: top {CELL_TOP} "
                           f"tokens<table>{rows}</table>")
