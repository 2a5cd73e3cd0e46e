"""Maps that sharpen live: an explorer's exact and verified maps drawn in rounds
(:mod:`~blip_trace_widgets.causal_trace.sharpen`), each round's map shown as it comes, under a status line with a stop
button.

    >>> from blip_trace_widgets.widgets.sharpening import Sharpening
    >>> status = Sharpening()
    >>> status.stop.description, status.stop.disabled, status.layout.display
    ('stop', True, 'none')

With the samples box on "auto", :func:`~blip_trace_widgets.widgets.live.trace_in_phases` hands :func:`sharpen_phase`
every phase that shows an exact or verified map (a verified map draws only the cells its estimate made exact):
each panel's first round is shown as soon as it is drawn, and each later round
replaces it (the heatmap redraws, its cells that are not significant hatched) until the map is stable, at its
budget, or the stop button ends it after the round in progress. A newer change cancels it as it cancels any
background trace. Maps that ran their course are kept, so that a configuration seen before is shown at once.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace
from html import escape
from typing import Any

import ipywidgets as W

from ..causal_trace.config import TraceConfig, cache_key
from ..causal_trace.results import TraceResult
from ..causal_trace.sharpen import AutoSampling, can_sharpen, sharpening, status_text
from ..core.cache import LRU
from ..core.names import KIND_SHORT_LABELS
from ..models.attention import Progress

#: Why a sharpening ended, for the maps that are kept and shown again without drawing: those that ran their course.
FINISHED = ("stable", "budget")


def drawn(config: TraceConfig, result: TraceResult) -> TraceConfig:
    """``config`` with the samples its map drew: a sharpened map's own count, else ``config`` as it is."""
    return replace(config, samples=int(result.config["samples"])) if result.config.get("auto") else config


def stability_text(result: TraceResult) -> str:
    """"top cell stable in 97% of resamples" (:meth:`~blip_trace_widgets.causal_trace.results.TraceResult.stability`); empty
    where the map has no draws to resample."""
    top = result.stability()["top"]
    return "" if top != top else f"top cell stable in {top:.0%} of resamples"


class Sharpening(W.HBox):
    """The status line of the maps that sharpen (:func:`~blip_trace_widgets.causal_trace.sharpen.status_text`, "8 samples · 3 of
    40 cells significant · top cell held 1 round · sharpening…"), the top cell's stability once they have ended,
    and a stop button that ends them after the round in progress, keeping the maps they have. Hidden while no
    sharpened map is shown. ``finished`` keeps the maps that ran their course."""

    def __init__(self) -> None:
        self.line = W.HTML()
        self.stability = W.HTML(layout=W.Layout(margin="0 0 0 12px"))
        self.stop = W.Button(description="stop", disabled=True, layout=W.Layout(width="64px", margin="0 0 0 12px"),
                             tooltip="end the sharpening after the round in progress, keeping the map it has")
        super().__init__([self.line, self.stability, self.stop],
                         layout=W.Layout(display="none", align_items="center", flex_flow="row wrap"))
        self.finished: LRU[TraceResult] = LRU(256)
        self._asked = threading.Event()
        self.stop.on_click(lambda _button: self._asked.set())

    def begin(self) -> threading.Event:
        """A new sharpening: the event that the stop button sets from now on."""
        self._asked = asked = threading.Event()
        self.stop.disabled = False
        return asked

    def end(self, asked: threading.Event) -> None:
        """The sharpening that ``asked`` belongs to is over (a newer one keeps the button)."""
        if self._asked is asked:
            self.stop.disabled = True

    def show(self, results: Sequence[TraceResult], configs: Sequence[TraceConfig]) -> None:
        """The line for the sharpened maps among ``results`` (by kind where there are several), and their
        stability once every one has ended."""
        sharpened = [(config, result) for config, result in zip(configs, results) if result.config.get("auto")]
        if not sharpened:
            self.hide()
            return
        named = len(sharpened) > 1

        def said(config: TraceConfig, text: str) -> str:
            return f"{escape(KIND_SHORT_LABELS.get(config.kind, config.kind))}: {text}" if named else text

        self.line.value = "<br>".join(said(c, escape(status_text(r))) for c, r in sharpened)
        ended = all(r.config["auto"]["stopped"] for _, r in sharpened)
        stable = [(c, stability_text(r)) for c, r in sharpened] if ended else []
        self.stability.value = "<br>".join(said(c, escape(text)) for c, text in stable if text)
        self.layout.display = None

    def hide(self) -> None:
        self.layout.display = "none"
        self.line.value = self.stability.value = ""


def sharpen_phase(view: Any, job: threading.Event, configs: Sequence[TraceConfig], plan: AutoSampling,
                  show: Callable[[list[TraceResult]], None], progress: Progress,
                  kept: dict[Hashable, TraceResult]) -> bool:
    """One phase's panels (``configs``): those that :func:`~blip_trace_widgets.causal_trace.sharpen.can_sharpen` drawn by
    ``plan`` in step (every panel's first round, then every panel's second, ...) and shown after each round, the
    others traced once. A map that this explorer finished before, or that this job (``kept``) drew in an earlier
    phase, is shown as it was. False when ``job`` was cancelled: nothing more is shown."""
    status: Sharpening = view.sharpening
    tracer = view.tracer
    keys = [(tracer.image_key, tracer.question, cache_key(c, "result"), plan) for c in configs]
    results: list[TraceResult | None] = [
        (kept[k] if k in kept else status.finished.get(k)) if can_sharpen(c) else tracer.trace(c, progress=progress)
        for c, k in zip(configs, keys)]
    if job.is_set():
        return False
    asked = status.begin()
    rounds = {j: sharpening(tracer, c, plan, lambda: asked.is_set() or job.is_set(), progress)
              for j, c in enumerate(configs) if results[j] is None}
    try:
        while True:
            for j in list(rounds):
                results[j] = result = next(rounds[j])
                if job.is_set():
                    return False
                if result.config["auto"]["stopped"]:
                    del rounds[j]
                    kept[keys[j]] = result
                    if result.config["auto"]["stopped"] in FINISHED:
                        status.finished.put(keys[j], result)
            shown = [r for r in results if r is not None]
            show(shown)
            if job.is_set():  # changed while it was drawn: the newer job's line stays
                return False
            status.show(shown, configs)
            if not rounds:
                return True
    finally:
        status.end(asked)
