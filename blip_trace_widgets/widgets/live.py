"""What every explorer shares: the image and its gallery, one cached tracer per (image, text), and background
tracing where a newer change cancels an older trace and an error shows inside the widget.

    >>> from blip_trace_widgets.widgets.live import png_width, image_png
    >>> from PIL import Image
    >>> png_width(image_png(Image.new("RGB", (64, 32)), 96))
    96
"""
from __future__ import annotations

import io
import threading
import traceback
from collections.abc import Callable, Sequence
from html import escape
from typing import Any

import ipywidgets as W
import traitlets
from PIL import Image

from .. import heads
from ..cache import LRU
from ..errors import BlipTraceError
from ..inputs import image_digest, to_rgb_image
from ..loading import BlipBundle
from ..names import (
    EXPLORER_MODES,
)
from ..results import TraceResult
from ..roles import first_content_word
from ..tracing import TraceConfig, Tracer
from .controls import check_gallery, default_gallery, method_note, phases, set_tooltip


def answer_html(tracer: Tracer) -> str:
    """The model's answer (its caption, or whether it matches), and a warning when the text has words the model
    cannot read."""
    text = tracer.task.describe(tracer, html=True)
    unknown = tracer.unknown_words
    if unknown:
        text += (f"<br><span style='color:#a60'>the model's vocabulary lacks {escape(', '.join(unknown))}: "
                 "it reads [UNK] there, so its answer may not be about these words</span>")
    return text


def tiny_warning(result: TraceResult) -> str:
    """HTML that says a map is noise, when the corruption barely changed the answer; else empty."""
    reason = result.tiny_reason()
    if reason is None:
        return ""
    return ("<div style='color:#a00;border:1px solid #a00;padding:2px 8px;border-radius:4px'>"
            f"<b>corruption has almost no effect; this map is noise</b>: {escape(reason)}.</div>")


#: An explorer keeps one Tracer per (image, question) it has shown, within this many bytes of tensors
#: (the current one always); the least recently shown are released first.
TRACER_MEMORY = 512 << 20


class Cancelled(Exception):
    pass


def image_png(image: Image.Image, width: int = 192) -> bytes:
    scale = width / image.width
    shown = image.resize((width, max(1, round(image.height * scale))),
                         Image.Resampling.NEAREST if image.width < 128 else Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    shown.save(buffer, format="PNG")
    return buffer.getvalue()


def png_width(png: bytes) -> int:
    """Pixel width from a PNG header, so the widget shows the heatmap at its natural size."""
    return int.from_bytes(png[16:20], "big")


def image_key(image: Image.Image) -> str:
    return image_digest(image)


def reporter(view: Any, job: threading.Event) -> Callable[[int, int], None]:
    """Progress of one trace in ``view``'s bar, and after a few seconds the time left in its status line."""
    import time

    started = time.perf_counter()
    notice = view.status.value if "large" in view.status.value else ""

    def report(done: int, total: int) -> None:
        if job.is_set():
            raise Cancelled
        view.progress.max, view.progress.value = max(total, 1), done
        elapsed = time.perf_counter() - started
        if 0 < done < total and elapsed > 2:
            left = elapsed * (total - done) / done
            view.status.value = f"<i>tracing… {done} of {total} cells, about {left:.0f} s left</i>{notice}"

    return report


def cost_notice(tracer: Tracer, config: TraceConfig) -> str:
    """The status line before a trace: a warning naming its size when it is large, else "tracing…"."""
    from ..cost import trace_cost

    warning = trace_cost(tracer, config).warning()
    return "<i>tracing…</i>" + (f"<br><b>{escape(warning)}</b>" if warning else "")


def status_text(result: TraceResult) -> str:
    """The status line under a map: what was scored, the clean and corrupted scores and the total effect."""
    return (f"scored {escape(result.scored)}: clean {result.high_score:.3f}, "
            f"corrupted {result.low_score:.3f}, total effect {result.total_effect:.3f}")


def trace_in_phases(view: Any, job: threading.Event, trace: Callable[[Any, TraceConfig], list[TraceResult]],
                    show: Callable[[list[TraceResult]], None]) -> None:
    """A trace explorer's work: the controls' configuration, then its phases for the method control (the estimate,
    then the verified or exact map), each traced by ``trace`` and shown by ``show`` as it comes, unless a newer
    change has cancelled ``job``."""
    tracer = view.tracer
    view.answer_view.value = answer_html(tracer)
    view.sync_words(tracer)
    view.counterfactual.sync(int(view.gallery.value or 0))
    view.config = config = view.controls_config()
    steps = phases(config, view.method.value)
    for i, step in enumerate(steps):
        view.status.value = cost_notice(tracer, step)
        results = trace(tracer, step)
        if job.is_set():
            return
        show(results)
        view.status.value = status_text(results[0]) + method_note(step, i == len(steps) - 1)


class LiveView(W.VBox):
    """What the explorers share: an (image, question) with a gallery, one cached Tracer per pair,
    and background tracing where newer changes cancel older traces and errors show inside."""

    #: The result on screen and the configuration it was traced with, as traitlets: ``explorer.observe(callback,
    #: names="result")`` is called with every new map (estimates and exact maps alike). ``controls_config()`` is
    #: what the controls describe now, before any trace.
    result = traitlets.Any(None, allow_none=True)
    config = traitlets.Any(None, allow_none=True)
    background: bool
    progress: W.IntProgress
    status: W.HTML
    error: W.HTML
    preview_width = 192
    _run: Callable[[threading.Event], None]  # each explorer's trace-and-show step, run by _work

    def __init__(self, bundle: BlipBundle, image: Any, question: str | None, *,
                 gallery: Sequence[tuple] | None, background: bool) -> None:
        """The parts both explorers share; each explorer then adds its controls and sets ``children``."""
        super().__init__()
        if not isinstance(bundle, BlipBundle):
            raise BlipTraceError("pass the bundle returned by load_model(...)")
        from ..threads import use_sensible_threads

        use_sensible_threads()  # on a shared CPU, one thread per core makes every trace wait
        self.bundle = bundle
        self.head = bundle.head
        self.task = heads.of(bundle)
        self.captions = isinstance(self.task, heads.CaptionHead)  # a caption's words are scored, one at a time
        if image is None and gallery is None:
            gallery = default_gallery(self.head)
        self.gallery_items = check_gallery(gallery, self.head)
        if image is None:
            image, question = self.gallery_items[0][0], self.gallery_items[0][1]
        self.background = background
        self._tracers: LRU[Tracer] = LRU(64, max_weight=TRACER_MEMORY, weigh=lambda tracer: tracer.held_bytes())
        self._image = to_rgb_image(image)
        self._image_id = image_key(self._image)
        self._job: threading.Event | None = None
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        style = {"description_width": "initial"}
        self.gallery = W.Dropdown(description="sample", style=style,
                                  options=[(f"{i + 1}: {s[1] or (s[2] if len(s) > 2 else '')}", i)
                                           for i, s in enumerate(self.gallery_items)]
                                  or [("(none)", -1)], disabled=not self.gallery_items,
                                  layout=W.Layout(width="340px", display=None if self.gallery_items else "none"))
        self.image_view = W.Image(value=image_png(self._image, self.preview_width), format="png",
                                  layout=W.Layout(width=f"{self.preview_width}px"))
        self.question_box = W.Text(value=question or "", description=self.task.text, style=style,
                                   continuous_update=False, layout=W.Layout(width="340px"))
        captioning = {} if self.captions else {"display": "none"}
        self.caption_box = W.Text(value="", description="caption to score", placeholder="(the model's own)",
                                  style=style, continuous_update=False, layout=W.Layout(width="340px", **captioning))
        self.word = W.Dropdown(options=[("0", 0)], value=0, description="word", style=style,
                               layout=W.Layout(width="220px", **captioning))
        set_tooltip(self.word, "the word of the caption whose probability is scored, given the words before it")
        set_tooltip(self.caption_box, "a caption of your own, scored word by word (teacher-forced); empty: the "
                                      "model's own greedy caption")
        self._syncing = False
        self.answer_view = W.HTML()
        self.progress = W.IntProgress(value=0, min=0, max=1, description="", layout=W.Layout(width="240px"))
        self.status = W.HTML()
        self.error = W.HTML()
        self.method = W.ToggleButtons(options=[(label, mode) for mode, label in EXPLORER_MODES.items()], value="verified",
                                      style={"button_width": "auto"})  # labels in full, not cut
        set_tooltip(self.method, "an estimate (attribution patching) appears at once, labelled ESTIMATE; then its top "
                                 "cells are made exact (outlined), or the whole exact map replaces it")
        self.gallery.observe(self._on_sample, names="value")

    def _header(self) -> W.HBox:
        return W.HBox([self.image_view, W.VBox([self.gallery, self.question_box, self.answer_view, self.caption_box,
                                                self.word, W.HBox([self.progress, self.status])])])

    @property
    def scored(self) -> dict[str, Any]:
        """The TraceConfig fields that say what is scored: a captioner's caption and word; nothing otherwise."""
        if not self.captions:
            return {}
        return {"answer": self.caption_box.value.strip() or None, "word": int(self.word.value or 0)}

    def sync_words(self, tracer: Tracer) -> None:
        """A captioner's word dropdown lists the words of the caption scored (keeping the chosen index if it exists)."""
        if not self.captions:
            return
        words = tracer.caption_words(self.caption_box.value.strip() or None)
        options = [(f"{i}: {w}", i) for i, w in enumerate(words)]
        if list(self.word.options) == options:
            return
        self._syncing = True
        try:
            keep = int(self.word.value or 0) if len(self.word.options) > 1 else first_content_word(words)
            self.word.options = options
            self.word.value = keep if keep < len(options) else 0
        finally:
            self._syncing = False

    def _watch(self, controls: Sequence[W.Widget]) -> None:
        for control in (*controls, self.caption_box, self.word):
            control.observe(self._on_change, names="value")

    @property
    def image(self) -> Image.Image:
        return self._image

    @property
    def tracer(self) -> Tracer:
        """The tracer of the current (image, question); raises ValueError for a bad question."""
        key = (self._image_id, self.question_box.value.strip())
        return self._tracers.get_or_make(key, lambda: Tracer(self.bundle, self._image, self.question_box.value))

    def set_sample(self, image: Any, question: str) -> None:
        """Show a new (image, question); the clean pass is computed for it once."""
        try:
            self._image = to_rgb_image(image)
        except ValueError as error:
            self._show_error(error)
            return
        self._image_id = image_key(self._image)
        self.image_view.value = image_png(self._image, self.preview_width)
        if self.question_box.value != question:
            self.question_box.value = question  # its observer refreshes
        else:
            self.refresh()

    def _on_sample(self, change: dict) -> None:
        if change["new"] is not None and change["new"] >= 0:
            self.set_sample(*self.gallery_items[change["new"]][:2])

    def refresh(self) -> None:
        """Trace the current configuration and show it (in a thread when ``background``)."""
        with self._lock:
            if self._job is not None:
                self._job.set()  # cancel the trace in flight
            job = threading.Event()
            self._job = job
        if self.background:
            self._threads = [t for t in self._threads if t.is_alive()]
            thread = threading.Thread(target=self._work, args=(job,), daemon=True)
            self._threads.append(thread)
            thread.start()
        else:
            self._work(job)

    def wait(self, timeout: float | None = 60) -> None:
        """Block until background traces, the latest included, have finished (for scripts and tests)."""
        for thread in list(self._threads):
            thread.join(timeout)

    def _progress(self, job: threading.Event):
        return reporter(self, job)

    def _work(self, job: threading.Event) -> None:
        self.status.value = "<i>tracing…</i>"
        self.progress.value = 0
        try:
            self._run(job)
            if not job.is_set():
                self.error.value = ""
        except Cancelled:
            return
        except Exception as error:  # shown in the widget; the kernel and the widget carry on
            if not job.is_set():
                self._show_error(error)
        finally:
            if not job.is_set():
                self.progress.value = self.progress.max

    def _show_error(self, error: Exception) -> None:
        """One line for a user's mistake (a BlipTraceError); the full traceback for anything else.
        The map under it is hidden, since it no longer matches the controls."""
        self.error.value = (
            "<div style='color:#a00;border:1px solid #a00;padding:4px 8px;border-radius:4px'>"
            f"<b>{escape(type(error).__name__)}</b>: {escape(str(error))}</div>"
        )
        if not isinstance(error, BlipTraceError):
            self.error.value += f"<details><pre>{escape(traceback.format_exc())}</pre></details>"
        self.status.value = ""
        self._dim(True)

    def _dim(self, stale: bool) -> None:
        """Hide the shown maps while they do not match the controls (after an error)."""
        for view in self._maps():
            view.layout.visibility = "hidden" if stale else "visible"

    def _maps(self) -> list[W.Widget]:
        return []


