"""What it carries, what it says: the toggle both explorers share between a block's causal map (what restoring each
state brings back) and its lens (what each state already says), on the same positions x layers.

    >>> from blip_trace_widgets import load_model
    >>> from blip_trace_widgets.widgets.toggle import no_lens_note, shows_toggle
    >>> shows_toggle("says").options
    (('what it carries', 'carries'), ('what it says', 'says'))
    >>> no_lens_note(load_model("demo"), "question_encoder")
    'the question encoder ends in no vocabulary, so it has no lens: the answer decoder has one (pick it in the block dropdown)'

:class:`LensPanel` is ``TraceExplorer``'s "what it says": the lens of the traced block's states, checked cell for
cell against the causal map (the same tokens, the same layers), and a selected cell's top 10 tokens beside its causal
value. ``LensExplorer`` (:mod:`.lens`) has the same toggle the other way. A block that ends in no vocabulary (BLIP's
question encoder) is refused with a note naming the block that has a lens; the block is never switched.
"""
from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ipywidgets as W
import torch

from ..causal_trace.results import TraceResult
from ..core.cache import LRU
from ..core.errors import BlipTraceError
from ..core.inputs import image_digest
from ..core.names import BLOCK_LABELS, KIND_SHORT_LABELS, is_head_kind
from ..lenses.core import lens_log_probs, summarise, token_texts
from ..lenses.names import CELL_TOP, DEFAULT_TOP, LENS_BLOCKS, LENS_KINDS, LENS_LABELS, LOGIT, SAYS, SHOWS, SHOWS_LABELS
from ..lenses.plots import lens_png
from ..lenses.reading import read
from ..lenses.result import LensResult
from ..lenses.tuned import TunedLens
from ..models.heads import head_of_model

STYLE = {"description_width": "initial"}


def shows_toggle(value: str) -> W.ToggleButtons:
    """The toggle, on ``value`` ("carries" or "says"); anything else is refused, naming the choices."""
    if value not in SHOWS:
        raise BlipTraceError(f"shows={value!r}: use one of {', '.join(repr(s) for s in SHOWS)} "
                             f"({', '.join(SHOWS_LABELS[s] for s in SHOWS)})")
    return W.ToggleButtons(options=[(SHOWS_LABELS[s], s) for s in SHOWS], value=value, style={"button_width": "auto"})


def no_lens_note(bundle: Any, block: str) -> str | None:
    """None where ``block`` of ``bundle`` ends in a vocabulary; else why it has no lens, naming the block that has
    one."""
    task = head_of_model(bundle.model)
    blocks = LENS_BLOCKS.get(task.name, ())
    if block in blocks:
        return None
    if not blocks:
        return (f"{task.a_model} ends in no vocabulary (it scores p(match)), so none of its blocks has a lens: "
                "what it says needs a question-answering, captioning or BLIP-2 model")
    has = " or ".join(f"the {BLOCK_LABELS.get(b, b)}" for b in blocks)
    return (f"the {BLOCK_LABELS.get(block, block)} ends in no vocabulary, so it has no lens: {has} has one (pick it "
            "in the block dropdown)")


def misaligned(result: TraceResult, lensed: LensResult) -> str | None:
    """None where the causal map and the lens have the same cells (tokens and layers); else what differs."""
    if is_head_kind(result.kind):
        return ("a head map's rows are attention heads, not positions: the lens lines up with the hidden-state, MLP "
                "and attention maps (pick one in the kind dropdown)")
    if list(result.tokens) != list(lensed.labels) or result.num_layers != lensed.layers:
        return (f"the causal map's cells ({len(result.tokens)} positions x {result.num_layers} layers: "
                f"{' '.join(result.tokens)[:80]}) and the lens's ({len(lensed.labels)} x {lensed.layers}: "
                f"{' '.join(lensed.labels)[:80]}) do not line up, so they are not shown side by side")
    return None


def lens_of(bundle: Any, image: Any, text: str, block: str, kind: str = LOGIT, *, top: int = DEFAULT_TOP,
            answer: str | None = None, tuned: TunedLens | None = None) -> tuple[LensResult, torch.Tensor]:
    """The lens of ``block`` on (image, text), as :func:`~..lenses.core.lens` computes it, with its
    log-probabilities [layers, positions, vocabulary] (for a cell's top tokens)."""
    reading = read(bundle, image, text, block)
    logp = lens_log_probs(bundle, reading, kind, tuned)
    return summarise(bundle, reading, logp, kind=kind, text=text, top=top, answer=answer), logp


def top_tokens(bundle: Any, logp: torch.Tensor, position: int, layer: int, k: int = CELL_TOP) -> list[tuple[str, float]]:
    """The top ``k`` tokens and their probabilities at (position, layer)."""
    probs, ids = logp[layer, position].exp().topk(min(k, logp.shape[-1]))
    return list(zip(token_texts(bundle.tokenizer, ids.tolist()), probs.tolist()))


def causal_rows(results: Sequence[TraceResult], position: int, layer: int) -> list[tuple[str, float]]:
    """Each map's score at (position, layer): (its kind's label, the score with that state restored)."""
    return [(KIND_SHORT_LABELS.get(r.kind, r.kind), float(r.scores[position, layer])) for r in results]


def cell_html(label: str, layer: int, tokens: Sequence[tuple[str, float]], causal: Sequence[tuple[str, float]],
              result: TraceResult | None) -> str:
    """A cell's top tokens (what it says) beside its causal value (what it carries)."""
    said = "".join(f"<tr><td>{i + 1}</td><td>{html.escape(t)}</td><td>{p:.3f}</td></tr>" for i, (t, p) in enumerate(tokens))
    box = "display:inline-block;vertical-align:top;margin-right:24px"
    out = (f"<b>{html.escape(label)}</b> at layer {layer}<br><div style='{box}'>what it says: top {len(tokens)} "
           f"tokens<table>{said}</table></div>")
    if result is not None and causal:
        rows = "".join(f"<tr><td>{html.escape(kind)}</td><td>{'n/a' if math.isnan(v) else f'{v:.3f}'}</td></tr>"
                       for kind, v in causal)
        out += (f"<div style='{box}'>what it carries: {html.escape(result.scored)} with this state restored "
                f"(clean {result.high_score:.3f}, corrupted {result.low_score:.3f})<table>{rows}</table></div>")
    return out


def refusal(note: str) -> str:
    return f"<span style='color:#a00'>{html.escape(note)}</span>"


class LensPanel(W.VBox):
    """``TraceExplorer``'s "what it says": the lens of the traced block (logit or tuned) on the causal map's own
    positions x layers, coloured by p(answer) with each cell's top token, and a picked cell's top 10 tokens beside
    its causal value. The explorer calls :meth:`follow` with each map; the toggle (``shows``) switches between the
    maps (``carried``) and this panel."""

    def __init__(self, bundle: Any, shows: str, tuned: TunedLens | None = None) -> None:
        super().__init__()
        self.bundle, self.tuned = bundle, tuned
        self.shows = shows_toggle(shows)
        self.kind = W.ToggleButtons(options=[(LENS_LABELS[k], k) for k in LENS_KINDS], value=LOGIT,
                                    style={"button_width": "auto"})
        self.note = W.HTML()
        self.grid = W.Image(format="png")
        self.position = W.Dropdown(description="position", style=STYLE)
        self.layer = W.Dropdown(description="layer", style=STYLE)
        self.cell = W.HTML()
        self.carried: W.Widget | None = None
        self.result: LensResult | None = None
        self._logp: torch.Tensor | None = None
        self._lenses: LRU[tuple[LensResult, torch.Tensor]] = LRU(16)
        self._view: Any = None
        self._results: list[TraceResult] = []
        self._pickers = W.HBox([self.position, self.layer])
        self.children = [self.kind, self.note, self.grid, self._pickers, self.cell]
        for control in (self.shows, self.kind):
            control.observe(lambda _change: self.redraw(), names="value")
        for control in (self.position, self.layer):
            control.observe(lambda _change: self.show_cell(), names="value")
        self.layout.display = None if shows == SAYS else "none"

    def beside(self, carried: W.Widget) -> W.Widget:
        """``carried`` (the explorer's maps), shown for "what it carries" and hidden for "what it says"."""
        self.carried = carried
        carried.layout.display = "none" if self.shows.value == SAYS else None
        return carried

    def follow(self, view: Any, results: Sequence[TraceResult]) -> None:
        """The explorer's new maps (one, or one per kind): the lens follows them."""
        self._view, self._results = view, list(results)
        self.redraw()

    def redraw(self) -> None:
        """Show what the toggle says; in "what it says", the lens of the current map's block, or why not."""
        says = self.shows.value == SAYS
        self.layout.display = None if says else "none"
        if self.carried is not None:
            self.carried.layout.display = "none" if says else None
        if not says or self._view is None:
            return
        try:
            self._show_lens()
        except BlipTraceError as error:
            self._refuse(str(error))
        except Exception as error:  # noqa: BLE001 (a bug shows here too: the kernel and the explorer carry on)
            self._refuse(f"unexpected {type(error).__name__}: {error}")

    def _refuse(self, note: str) -> None:
        self.note.value = refusal(note)
        self.result, self._logp = None, None
        for part in (self.grid, self._pickers, self.cell):
            part.layout.display = "none"

    def _show_lens(self) -> None:
        view = self._view
        note = no_lens_note(self.bundle, str(view.block.value))
        if note is not None or not self._results:
            self._refuse(note or "no causal map yet: the lens follows the first one")
            return
        result = self._results[0]
        text = lens_text(view)
        key = (image_digest(view.image), text, result.block, str(self.kind.value), result.answer)
        lensed, logp = self._lenses.get_or_make(key, lambda: lens_of(self.bundle, view.image, text, result.block,
                                                                     str(self.kind.value), answer=result.answer,
                                                                     tuned=self.tuned))
        note = misaligned(result, lensed)
        if note is not None:
            self._refuse(note)
            return
        if lensed is not self.result:  # a sharpening round's new map, on the same lens: drawn once
            self.grid.value = lens_png(lensed, "grid")
        self.result, self._logp = lensed, logp
        self.note.value = ""
        for part in (self.grid, self._pickers, self.cell):
            part.layout.display = None
        pick(self.position, [(f"{p}: {label}", p) for p, label in enumerate(lensed.labels)])
        pick(self.layer, [(str(layer), layer) for layer in range(lensed.layers)])
        self.show_cell()

    def save(self, path: Path, fmt: str) -> None:
        """Write the lens shown to ``path``: its grid (png), its result (json, :meth:`LensResult.from_json` reads it
        back) or its table (csv, one row per position x layer). Refused while no lens is shown."""
        if self.result is None:
            raise BlipTraceError("no lens is shown to save: pick 'what it carries' to save the causal map, or a block "
                                 "that has a lens")
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "png":
            path.write_bytes(lens_png(self.result, "grid"))
        elif fmt == "json":
            path.write_text(self.result.to_json())
        elif fmt == "csv":
            self.result.to_dataframe().to_csv(path, index=False)
        else:
            raise BlipTraceError(f"unknown format {fmt!r}: use png, json or csv")

    def cell_tokens(self, position: int, layer: int, k: int = CELL_TOP) -> list[tuple[str, float]]:
        """The top ``k`` tokens and their probabilities at (position, layer) of the lens shown."""
        if self._logp is None:
            raise BlipTraceError("no lens is shown: pick 'what it says' on a block that has one")
        return top_tokens(self.bundle, self._logp, position, layer, k)

    def show_cell(self) -> None:
        """The picked cell's top tokens beside its causal value (each kind's, in the "compare kinds" view)."""
        if self.result is None or self.position.value is None or self.layer.value is None:
            self.cell.value = ""
            return
        position, layer = int(self.position.value), int(self.layer.value)
        if position >= len(self.result.labels) or layer >= self.result.layers:  # a picker between its options
            return
        self.cell.value = cell_html(self.result.labels[position], layer, self.cell_tokens(position, layer),
                                    causal_rows(self._results, position, layer), self._results[0])


def pick(dropdown: W.Dropdown, options: list[tuple[str, int]]) -> None:
    """New options for a cell picker, the last one picked (a picker whose options are unchanged keeps its value)."""
    if list(dropdown.options) != options:
        dropdown.options = options
        dropdown.value = options[-1][1]


def lens_text(view: Any) -> str:
    """The text whose lens has the causal map's positions: the question, or a captioner's prompt followed by the
    caption's words before the scored one (the positions a caption word's map restores)."""
    text = str(view.question_box.value)
    if not view.captions:
        return text
    words = view.tracer.caption_words(view.caption_box.value.strip() or None)[:int(view.word.value or 0)]
    return " ".join([text.strip(), *words]).strip()
