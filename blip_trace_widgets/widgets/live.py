"""What every explorer shares: the image and its gallery, one cached tracer per (image, text), and background
tracing where a newer change cancels an older trace and an error shows inside the widget.

    >>> from blip_trace_widgets.widgets.live import png_width, image_png
    >>> from PIL import Image
    >>> png_width(image_png(Image.new("RGB", (64, 32)), 96))
    96
"""
from __future__ import annotations

import atexit
import io
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace
from html import escape
from typing import Any

import ipywidgets as W
import traitlets
from PIL import Image

from ..causal_trace.results import TraceResult
from ..causal_trace.sharpen import AutoSampling, can_sharpen
from ..causal_trace.tracer import TraceConfig, Tracer
from ..core.cache import LRU
from ..core.errors import BlipTraceError
from ..core.inputs import image_digest, to_rgb_image
from ..core.names import EXPLORER_MODES
from ..core.roles import first_content_word
from ..models import heads
from ..models.loading import BlipBundle
from .controls import (
    AUTO_PLAN,
    check_gallery,
    default_gallery,
    explorer_mode,
    phases,
    samples_setting,
    set_tooltip,
    shown_words,
    starting_mode,
)
from .sharpening import Sharpening, drawn, sharpen_phase


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


def reporter(view: Any, job: threading.Event, timed: bool = True) -> Callable[[int, int], None]:
    """Progress of one trace in ``view``'s bar, and (``timed``) after a few seconds the time left in its status
    line; a cancelled ``job`` ends the trace."""
    import time

    started = time.perf_counter()
    notice = view.status.value if "large" in view.status.value else ""

    def report(done: int, total: int) -> None:
        if job.is_set():
            raise Cancelled
        view.progress.max, view.progress.value = max(total, 1), done
        elapsed = time.perf_counter() - started
        if timed and 0 < done < total and elapsed > 2:
            left = elapsed * (total - done) / done
            view.status.value = f"<i>tracing… {done} of {total} cells, about {left:.0f} s left</i>{notice}"

    return report


def cost_notice(tracer: Tracer, config: TraceConfig) -> str:
    """The status line before a trace: a warning naming its size when it is large, else "tracing…"."""
    from ..causal_trace.cost import trace_cost

    warning = trace_cost(tracer, config).warning()
    return "<i>tracing…</i>" + (f"<br><b>{escape(warning)}</b>" if warning else "")


def status_text(result: TraceResult) -> str:
    """The status line under a map: what was scored, the clean and corrupted scores and the total effect."""
    return (f"scored {escape(result.scored)}: clean {result.high_score:.3f}, "
            f"corrupted {result.low_score:.3f}, total effect {result.total_effect:.3f}")


def trace_in_phases(view: Any, job: threading.Event, panels: Callable[[TraceConfig], list[TraceConfig]],
                    show: Callable[[list[TraceResult]], None]) -> None:
    """A trace explorer's work: the controls' configuration and its panels (one map, or one per kind), then each
    panel's phases for the method control (the estimate, then the verified or exact map), traced and shown as they
    come, unless a newer change has cancelled ``job``. A panel with fewer phases shows its last one throughout
    (from the tracer's cache). With the samples box on "auto" a phase's exact and verified maps sharpen, each round
    shown as it comes (:func:`~.sharpening.sharpen_phase`)."""
    tracer = view.tracer
    view.answer_view.value = answer_html(tracer)
    view.sync_words(tracer)
    view.counterfactual.sync(int(view.gallery.value or 0))
    view.config = config = view.controls_config()
    plan = sampling_plan(view)
    steps = [phases(panel, view.method.value) for panel in panels(config)]
    count = max(len(s) for s in steps)
    kept: dict[Hashable, TraceResult] = {}  # this job's sharpened maps, for its later phases
    for i in range(count):
        now = [s[min(i, len(s) - 1)] for s in steps]

        def shown(results: list[TraceResult], now: list[TraceConfig] = now, last: bool = i == count - 1) -> None:
            show(results)
            view.config = drawn(config, results[0])
            configs = [drawn(c, r) for c, r in zip(now, results)]
            view.status.value = status_text(results[0]) + "<br>" + shown_words(configs, last, view.method.value)

        if plan is not None and any(can_sharpen(c) for c in now):
            first = replace(now[-1], samples=plan.round_samples) if can_sharpen(now[-1]) else now[-1]
            view.status.value = cost_notice(tracer, first)  # priced at its first round
            if not sharpen_phase(view, job, now, plan, shown, reporter(view, job, timed=False), kept):
                return
            continue
        view.status.value = cost_notice(tracer, now[-1])
        results = [tracer.trace(step, progress=reporter(view, job)) for step in now]
        if job.is_set():
            return
        view.sharpening.hide()
        shown(results)


def sampling_plan(view: Any) -> AutoSampling | None:
    """How ``view``'s exact and verified maps sharpen: :data:`~.controls.AUTO_PLAN` when its samples box says "auto",
    else None (a whole number of samples, or an explorer without a samples box)."""
    box = getattr(view, "noise_samples", None)
    return AUTO_PLAN if box is not None and samples_setting(box.value) is None else None


#: The method control's tooltip; the explorer adds why it opened on the method it shows.
METHOD_TIP = ("exact: the whole map, every cell restored; estimate (attribution patching): at once, labelled ESTIMATE, "
              "then its top cells made exact (outlined) or the whole exact map in its place.")


def exact_seconds(view: Any, config: TraceConfig) -> float | None:
    """The cost module's estimate of ``config``'s exact map for ``view``'s (image, text), in seconds (None where it
    cannot tell)."""
    from ..causal_trace.cost import trace_cost

    try:
        return trace_cost(view.tracer, replace(config, method="exact")).seconds
    except Exception:  # a bad question or setting: the first trace shows it inside the widget
        return None


def start_mode(view: Any, mode: str | None, config: TraceConfig) -> None:
    """An explorer's method control's first value: ``mode``, or when None the whole exact map where the cost estimate
    says it is quick here (controls.QUICK_SECONDS; the demo models) and the estimate with its top cells exact where
    it is not; the tooltip says which and why."""
    if mode is not None:
        view.method.value = explorer_mode(mode)
        set_tooltip(view.method, METHOD_TIP)
        return
    view.method.value, why = starting_mode(exact_seconds(view, config))
    set_tooltip(view.method, f"{METHOD_TIP} {why}")


#: Background traces still running, with their cancel events, so that the interpreter's exit cancels them and waits
#: for them first: a thread left inside torch as the interpreter exits aborts the process.
_RUNNING: dict[threading.Thread, threading.Event] = {}
_RUNNING_LOCK = threading.Lock()
#: How long the interpreter's exit waits, in all, for background traces to notice they were cancelled.
EXIT_WAIT = 60.0


def cancel_background_work(timeout: float = EXIT_WAIT) -> int:
    """Cancel every explorer's background traces and wait for them to return (at most ``timeout`` seconds in all);
    the number still running after. Registered to run at interpreter exit."""
    with _RUNNING_LOCK:
        running = list(_RUNNING.items())
    for _thread, job in running:
        job.set()
    deadline = time.monotonic() + timeout
    for thread, _job in running:
        if thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))
    return sum(thread.is_alive() for thread, _job in running)


atexit.register(cancel_background_work)


class LiveView(W.VBox):
    """What the explorers share: an (image, question) with a gallery, one cached Tracer per pair,
    and background tracing where newer changes cancel older traces and errors show inside."""

    #: The result on screen and the configuration it was traced with, as traitlets: ``explorer.observe(callback,
    #: names="result")`` is called with every new map (estimates and exact maps alike). ``controls_config()`` is
    #: what the controls describe now, before any trace.
    result = traitlets.Union([traitlets.Instance("blip_trace_widgets.causal_trace.results.TraceResult"),
                              traitlets.Instance("blip_trace_widgets.attention_knockout.result.KnockoutResult")],
                             default_value=None, allow_none=True)
    config = traitlets.Union([traitlets.Instance("blip_trace_widgets.causal_trace.config.TraceConfig"),
                              traitlets.Instance("blip_trace_widgets.attention_knockout.knockout.KnockoutConfig")],
                             default_value=None, allow_none=True)
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
        from ..core.threads import use_sensible_threads

        use_sensible_threads()  # on a shared CPU, one thread per core makes every trace wait
        self.bundle = bundle
        self.head = bundle.head
        self.task = heads.of(bundle)
        self.captions = self.task.scores_words  # a caption's words are scored, one at a time
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
        self.sharpening = Sharpening()  # the status line and stop button of maps that sharpen
        self.error = W.HTML()
        self.method = W.ToggleButtons(options=[(label, mode) for mode, label in EXPLORER_MODES.items()], value="exact",
                                      description="method", style={"button_width": "auto", **style},
                                      layout=W.Layout(flex_flow="row wrap"))  # labels in full, not cut
        self._start_word: int | None = None  # a captioner's word to score first (else its first content word)
        self.gallery.observe(self._on_sample, names="value")

    def _header(self) -> W.HBox:
        return W.HBox([self.image_view, W.VBox([self.gallery, self.question_box, self.answer_view, self.caption_box,
                                                self.word, W.HBox([self.progress, self.status]), self.sharpening])])

    @property
    def scored(self) -> dict[str, Any]:
        """The TraceConfig fields that say what is scored: a captioner's caption and word; nothing otherwise."""
        if not self.captions:
            return {}
        return {"answer": self.caption_box.value.strip() or None, "word": int(self.word.value or 0)}

    def sync_words(self, tracer: Tracer) -> None:
        """A captioner's word dropdown lists the words of the caption scored (keeping the chosen index if it exists;
        the starting configuration's word is kept, or refused when the caption has no such word, never moved)."""
        if not self.captions:
            return
        words = tracer.caption_words(self.caption_box.value.strip() or None)
        options = [(f"{i}: {w}", i) for i, w in enumerate(words)]
        start, self._start_word = self._start_word, None
        if list(self.word.options) == options and start is None:
            return
        keep = int(self.word.value or 0) if len(self.word.options) > 1 else first_content_word(words)
        self._syncing = True
        try:
            self.word.options = options
            self.word.value = start if start is not None and start < len(options) else keep if keep < len(options) else 0
        finally:
            self._syncing = False
        if start is not None and start >= len(options):
            raise BlipTraceError(f"word {start} is past the caption's {len(options)} words (0 to {len(options) - 1}): "
                                 "pick one in the word dropdown")

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
            with _RUNNING_LOCK:  # the interpreter's exit cancels it and waits for it (cancel_background_work)
                _RUNNING[thread] = job
            thread.start()
        else:
            self._work(job)

    def wait(self, timeout: float | None = 60) -> None:
        """Block until background traces, the latest included, have finished (for scripts and tests)."""
        for thread in list(self._threads):
            thread.join(timeout)

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
            with _RUNNING_LOCK:
                _RUNNING.pop(threading.current_thread(), None)

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
        self.sharpening.hide()
        self._dim(True)

    def _dim(self, stale: bool) -> None:
        """Hide the shown maps while they do not match the controls (after an error)."""
        for view in self._maps():
            view.layout.visibility = "hidden" if stale else "visible"

    def _maps(self) -> list[W.Widget]:
        return []


