"""TraceExplorer: ipywidgets controls that drive a live causal-trace heatmap.

    >>> from blip_trace_widgets import load_model
    >>> from blip_trace_widgets.widgets import TraceExplorer
    >>> explorer = TraceExplorer(load_model("demo"), background=False)   # demo samples in a gallery
    >>> explorer.result.kind
    'hidden'
    >>> captions = TraceExplorer(load_model("demo-caption"), background=False)
    >>> captions.word.options, captions.result.answer   # it starts at the first content word
    ((('0: a', 0), ('1: red', 1), ('2: triangle', 2)), 'red')

The explorers work with all three of BLIP's heads. For a captioner the text box holds the
prompt, the answer box shows the caption, a dropdown picks the caption word that is scored,
and a second box takes a caption of your own to score (teacher-forced). For an image-text
matcher the text box holds the text matched against the image, and p(match) is scored.

In a notebook, end a cell with ``explorer`` to show it. Only core ipywidgets are used
(no ipympl, no custom JavaScript): heatmaps are PNG bytes in ``Image`` widgets, which
render the same in JupyterLab, Notebook 7, VS Code and Colab, with ipywidgets 7.7 or 8.

The explorer calls the tracing core (:class:`~blip_trace_widgets.tracing.Tracer`) and the
plotting module; it never touches the model. One ``Tracer`` per (image, question) keeps
the clean pass, the corrupted runs and every finished heatmap, so returning to a
configuration already seen is instant and only a new image or question recomputes the
clean pass.
"""
from __future__ import annotations

import io
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from html import escape
from pathlib import Path
from typing import Any

import ipywidgets as W
import numpy as np
import traitlets
from PIL import Image

from . import heads
from .cache import LRU
from .config import MAX_SAMPLES, MAX_SEED, check_int, parse_position
from .corruption import BY_NAME, NOISE_NAMES, from_name
from .counterfactual_controls import Counterfactual
from .errors import BlipTraceError
from .heads import BLOCKS_OF, metric_label
from .inputs import image_digest, to_rgb_image
from .loading import BlipBundle
from .names import (
    ANSWER_DECODER,
    BLOCK_LABELS,
    EXPLORER_MODES,
    HIDDEN,
    KIND_SHORT_LABELS,
    SUBLAYER_KINDS,
    TEXT_HEAD_KINDS,
    TEXT_KINDS,
    VISION_ENCODER,
    VISION_KINDS,
    is_head_kind,
    window_for,
)
from .plotting import HeatmapRenderer, figure_png, plot_traces
from .procedures import default_corruption
from .results import TraceResult
from .tracing import TraceConfig, Tracer, default_config

IPYWIDGETS_MAJOR = int(W.__version__.split(".")[0])
KIND_OPTIONS = [(KIND_SHORT_LABELS[k], k) for k in (*TEXT_KINDS, *TEXT_HEAD_KINDS)]
#: The text blocks TraceExplorer offers for each head (the vision encoder has its own explorer).
BLOCK_OPTIONS = {head: [(BLOCK_LABELS[b], b) for b in blocks if b != VISION_ENCODER] for head, blocks in BLOCKS_OF.items()}
CORRUPTION_OPTIONS = [(BY_NAME[name].info.label, name) for name in NOISE_NAMES]
NOISE_TIPS = {name: BY_NAME[name].info.tip for name in NOISE_NAMES}
#: An explorer keeps one Tracer per (image, question) it has shown, within this many bytes of tensors
#: (the current one always); the least recently shown are released first.
TRACER_MEMORY = 512 << 20
WINDOW_OFF_TIP = ("hidden states are restored one layer at a time, as in ROME; the window applies to "
                  "MLP and attention kinds")
WINDOW_ON_TIP = "number of consecutive layers restored together, centred on each layer"


def set_tooltip(widget: W.Widget, text: str) -> None:
    """Tooltip text under ipywidgets 8 (``tooltip``) and 7 (``description_tooltip``)."""
    if IPYWIDGETS_MAJOR >= 8:
        widget.tooltip = text
    else:
        widget.description_tooltip = text


def corruption_setting(corruption: Any) -> tuple[str, float]:
    """(dropdown name, slider level) of a built-in corruption."""
    name = getattr(getattr(corruption, "info", None), "name", None)
    if name not in NOISE_TIPS:
        raise BlipTraceError(f"the explorer's controls offer {', '.join(NOISE_NAMES)}; got a {name or 'custom'} "
                             "corruption")
    return str(name), float(corruption.level)


def answer_html(tracer: Tracer) -> str:
    """The model's answer (its caption, or whether it matches), and a warning when the text has words the model
    cannot read."""
    text = tracer.task.describe(tracer, html=True)
    unknown = tracer.unknown_words
    if unknown:
        text += (f"<br><span style='color:#a60'>the model's vocabulary lacks {escape(', '.join(unknown))}: "
                 "it reads [UNK] there, so its answer may not be about these words</span>")
    return text


def level_slider(value: float, low: float, high: float, description: str, style: dict[str, str]) -> W.FloatLogSlider:
    """A log slider over ``low`` to ``high``, widened to hold ``value`` exactly: a level that trace() accepts is
    shown as it is, never moved to the slider's end."""
    low, high = min(low, value), max(high, value)
    return W.FloatLogSlider(value=value, base=10, min=float(np.log10(low)), max=float(np.log10(high)), step=0.02,
                            description=description, continuous_update=False, readout_format=".3g", style=style)


def samples_box(value: int, style: dict[str, str]) -> W.BoundedIntText:
    """Noise samples, 1 to MAX_SAMPLES as trace() takes them (a slider to 1000 would have no usable track)."""
    check_int("samples", value, 1, MAX_SAMPLES)
    return W.BoundedIntText(value=value, min=1, max=MAX_SAMPLES, description="noise samples", style=style,
                            layout=W.Layout(width="190px"))


def seed_box(value: int, style: dict[str, str]) -> W.BoundedIntText:
    """The noise seed, 0 to MAX_SEED as trace() takes it."""
    check_int("seed", value, 0, MAX_SEED)
    return W.BoundedIntText(value=value, min=0, max=MAX_SEED, description="seed", style=style,
                            layout=W.Layout(width="190px"))


def tiny_warning(result: TraceResult) -> str:
    """HTML that says a map is noise, when the corruption barely changed the answer; else empty."""
    reason = result.tiny_reason()
    if reason is None:
        return ""
    return ("<div style='color:#a00;border:1px solid #a00;padding:2px 8px;border-radius:4px'>"
            f"<b>corruption has almost no effect; this map is noise</b>: {escape(reason)}.</div>")


def tooltip_of(widget: W.Widget) -> str:
    return widget.tooltip if IPYWIDGETS_MAJOR >= 8 else widget.description_tooltip


class _Cancelled(Exception):
    pass


def _png(image: Image.Image, width: int = 192) -> bytes:
    scale = width / image.width
    shown = image.resize((width, max(1, round(image.height * scale))),
                         Image.Resampling.NEAREST if image.width < 128 else Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    shown.save(buffer, format="PNG")
    return buffer.getvalue()


def png_width(png: bytes) -> int:
    """Pixel width from a PNG header, so the widget shows the heatmap at its natural size."""
    return int.from_bytes(png[16:20], "big")


def _image_key(image: Image.Image) -> str:
    return image_digest(image)


def explorer_mode(mode: str) -> str:
    """``mode``, the explorers' method toggle (EXPLORER_MODES), or a clear error naming the choices."""
    if mode not in EXPLORER_MODES:
        raise BlipTraceError(f"unknown mode {mode!r}: use one of {', '.join(EXPLORER_MODES)}")
    return mode


def check_gallery(gallery: Any, head: str) -> list[tuple]:
    """The gallery as (image, text[, answer]) tuples, or a clear error naming the form it must take."""
    what = heads.of(head).text
    form = f"a list of (image, {what}), (image, {what}, answer) or (image, {what}, answer, partner image) tuples"
    if gallery is None:
        return []
    if isinstance(gallery, (str, bytes)) or not isinstance(gallery, (list, tuple, Sequence)):
        raise BlipTraceError(f"gallery must be {form}, got {type(gallery).__name__}")
    if len(gallery) == 0:
        raise BlipTraceError(f"the gallery is empty: pass {form}, or an image and a {what}")
    items = []
    for i, item in enumerate(gallery):
        if hasattr(item, "counterfactual_image"):  # a PairSample: its partner image is the fourth element
            item = (item.image, item.question, item.answer, item.counterfactual_image)
        if isinstance(item, (str, bytes)) or not isinstance(item, (tuple, list)) or not 2 <= len(item) <= 4:
            raise BlipTraceError(f"gallery item {i} is {item!r:.80}: each must be (image, {what}), (image, {what}, "
                                 "answer) or (image, {what}, answer, partner image)")
        if not isinstance(item[1], str):
            raise BlipTraceError(f"gallery item {i}'s {what} must be a string, got {type(item[1]).__name__}")
        items.append(tuple(item))
    return items


def _gallery(gallery: Sequence[tuple] | None, samples: Sequence[tuple] | None) -> Sequence[tuple] | None:
    """``gallery=``, or the old ``samples=`` with a deprecation warning (one word per idea: samples are noise draws)."""
    if samples is not None:
        import warnings

        warnings.warn("the explorers' samples= is now gallery= (samples means noise draws); samples= goes in 0.4",
                      DeprecationWarning, stacklevel=3)
        if gallery is None:
            return samples
    return gallery


def _reporter(view: Any, job: threading.Event) -> Callable[[int, int], None]:
    """Progress of one trace in ``view``'s bar, and after a few seconds the time left in its status line."""
    import time

    started = time.perf_counter()
    notice = view.status.value if "large" in view.status.value else ""

    def report(done: int, total: int) -> None:
        if job.is_set():
            raise _Cancelled
        view.progress.max, view.progress.value = max(total, 1), done
        elapsed = time.perf_counter() - started
        if 0 < done < total and elapsed > 2:
            left = elapsed * (total - done) / done
            view.status.value = f"<i>tracing… {done} of {total} cells, about {left:.0f} s left</i>{notice}"

    return report


def cost_notice(tracer: Tracer, config: TraceConfig) -> str:
    """The status line before a trace: a warning naming its size when it is large, else "tracing…"."""
    from .cost import trace_cost

    warning = trace_cost(tracer, config).warning()
    return "<i>tracing…</i>" + (f"<br><b>{escape(warning)}</b>" if warning else "")


class _LiveView(W.VBox):
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
        from .threads import use_sensible_threads

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
        self._image_id = _image_key(self._image)
        self._job: threading.Event | None = None
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        style = {"description_width": "initial"}
        self.gallery = W.Dropdown(description="sample", style=style,
                                  options=[(f"{i + 1}: {s[1] or (s[2] if len(s) > 2 else '')}", i)
                                           for i, s in enumerate(self.gallery_items)]
                                  or [("(none)", -1)], disabled=not self.gallery_items,
                                  layout=W.Layout(width="340px", display=None if self.gallery_items else "none"))
        self.image_view = W.Image(value=_png(self._image, self.preview_width), format="png",
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

    def _phases(self, config: TraceConfig) -> list[TraceConfig]:
        """The configurations to show in turn for the method control: the estimate first, then the exact map."""
        if config.fresh_noise:  # a fresh draw per cell has no one corrupted run to take gradients at: exact only
            return [config]
        estimate = replace(config, method="estimate")
        if self.method.value in ("both", "verified") and config.window > 1:  # a window's estimate costs ~2x exact
            return [config]
        return {"verified": [estimate, replace(config, method="verified")], "both": [estimate, config],
                "estimate": [estimate], "exact": [config]}[self.method.value]

    @staticmethod
    def _method_note(config: TraceConfig, last: bool) -> str:
        notes = {"verified": f" · <b>ESTIMATE</b>, its top {config.verify} cells exact (outlined)",
                 "estimate": " · <b>ESTIMATE</b> (attribution patching)" + ("" if last else "; the exact map follows…")}
        return notes.get(config.method, "")

    def _header(self) -> W.HBox:
        return W.HBox([self.image_view, W.VBox([self.gallery, self.question_box, self.answer_view, self.caption_box,
                                                self.word, W.HBox([self.progress, self.status])])])

    @property
    def scored(self) -> dict[str, Any]:
        """The TraceConfig fields that say what is scored: a captioner's caption and word; nothing otherwise."""
        if not self.captions:
            return {}
        return {"answer": self.caption_box.value.strip() or None, "target": int(self.word.value or 0)}

    def _sync_words(self, tracer: Tracer) -> None:
        """A captioner's word dropdown lists the words of the caption scored (keeping the chosen index if it exists)."""
        if not self.captions:
            return
        words = tracer.caption_words(self.caption_box.value.strip() or None)
        options = [(f"{i}: {w}", i) for i, w in enumerate(words)]
        if list(self.word.options) == options:
            return
        self._syncing = True
        try:
            keep = int(self.word.value or 0) if len(self.word.options) > 1 else _first_content_word(words)
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
        self._image_id = _image_key(self._image)
        self.image_view.value = _png(self._image, self.preview_width)
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
        return _reporter(self, job)

    def _work(self, job: threading.Event) -> None:
        self.status.value = "<i>tracing…</i>"
        self.progress.value = 0
        try:
            self._run(job)
            if not job.is_set():
                self.error.value = ""
        except _Cancelled:
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


class HeadPattern(W.HBox):
    """What a cross-attention head reads: pick a layer and a head of the head map, and see the clean run's attention
    of the restored positions over the image patches, painted on the image (a block that reads the image only)."""

    def __init__(self, layers: int, heads: int) -> None:
        style = {"description_width": "initial"}
        self.layer = W.Dropdown(options=[(f"layer {j}", j) for j in range(layers)], value=0, description="pattern of",
                                style=style, layout=W.Layout(width="180px"))
        self.head = W.Dropdown(options=[(f"h{h}", h) for h in range(heads)], value=0, description="head",
                               style=style, layout=W.Layout(width="120px"))
        self.view = W.Image(format="png")
        set_tooltip(self.layer, "the clean run's cross-attention of this head, from the restored positions to the "
                                "image patches, painted on the image")
        super().__init__([W.VBox([self.layer, self.head]), self.view], layout=W.Layout(display="none"))
        self._shown: tuple[Any, TraceResult] | None = None
        for control in (self.layer, self.head):
            control.observe(lambda _change: self.redraw(), names="value")

    def show(self, tracer: Tracer, result: TraceResult | None) -> None:
        """Follow ``result``: shown for a cross-attention head map of a block that reads the image, else hidden."""
        reads_image = result is not None and result.kind == "cross_attn_head" and result.block != ANSWER_DECODER
        self.layout.display = None if reads_image else "none"
        self._shown = (tracer, result) if result is not None and reads_image else None
        self.redraw()

    def redraw(self) -> None:
        if self._shown is None:
            return
        from .patterns import attention_pattern
        from .plotting import attention_overlay

        tracer, result = self._shown
        weights = attention_pattern(tracer, result.block, result.kind, int(self.layer.value))
        positions = list(result.config.get("restored_positions") or range(weights.shape[1]))
        picture = attention_overlay(tracer.image, weights[int(self.head.value), positions].mean(0))
        self.view.value = _png(picture, 160)


class TraceExplorer(_LiveView):
    """Image, question, answer and a causal-trace heatmap that follows the controls.

    ``samples`` is an optional gallery of (image, question[, answer]) tuples; with no
    image it defaults to the easy-VQA demo samples. ``background=True`` traces in a
    thread so the controls stay responsive on a slow model; a newer change cancels an
    older trace in flight.
    """

    def __init__(
        self,
        bundle: BlipBundle,
        image: Any = None,
        question: str | None = None,
        *,
        gallery: Sequence[tuple] | None = None,
        config: TraceConfig | None = None,
        background: bool = True,
        export_dir: str | Path = ".",
        samples: Sequence[tuple] | None = None,
        mode: str = "verified",
    ) -> None:
        super().__init__(bundle, image, question, gallery=_gallery(gallery, samples), background=background)
        self.method.value = explorer_mode(mode)
        self.export_dir = Path(export_dir)
        self.results: dict[str, TraceResult] = {}
        config = config or default_config(bundle, samples=10)
        offered = [block for _, block in BLOCK_OPTIONS[self.head]]
        if config.block not in offered:
            raise BlipTraceError(f"this explorer traces the {self.task.label} model's "
                                 f"{' or '.join(offered)}, not {config.block}"
                                 + ("; use VisionTraceExplorer for the vision encoder" if config.block == VISION_ENCODER
                                    else ""))
        layers = bundle.num_layers(self.task.default_block)
        style = {"description_width": "initial"}
        self.kind = W.Dropdown(options=KIND_OPTIONS, value=config.kind, description="kind", style=style)
        self.block = W.Dropdown(options=BLOCK_OPTIONS[self.head], value=config.block, description="block", style=style)
        noise_name, noise_level = corruption_setting(config.corruption)
        self.corruption = W.Dropdown(options=CORRUPTION_OPTIONS, value=noise_name, description="corruption", style=style)
        self.noise = level_slider(noise_level, 0.1, 20, "noise scale", style)
        self.window = W.IntSlider(value=max(1, min(config.window, layers)), min=1, max=layers, description="window",
                                  continuous_update=False, style=style)
        self.noise_samples, self.seed = samples_box(config.samples, style), seed_box(config.seed, style)
        self.position = W.Text(value="", description="heads at", placeholder="every position", style=style,
                               continuous_update=False, layout=W.Layout(width="220px"))
        set_tooltip(self.position, "head kinds: restore the heads only at these positions (3, or 1,2) or a token's "
                                   "role (first, object, last); empty: every position")
        self.normalized = W.Checkbox(value=False, description="normalised", indent=False)
        self.show_stderr = W.Checkbox(value=False, description="standard error", indent=False)
        self.view = W.ToggleButtons(options=[("one kind", "single"), ("compare kinds", "compare")], value="single")
        self._tips(noise_name)
        export_row = self._outputs(style)
        self.counterfactual = Counterfactual(self.gallery_items, text=self.task.text)
        controls = W.VBox([
            W.HBox([self.block, self.kind, self.position, self.view]), self.counterfactual,
            W.HBox([self.corruption, self.noise, self.method]),
            W.HBox([self.window, self.noise_samples, self.seed, self.normalized, self.show_stderr]),
        ])
        self.pattern = HeadPattern(layers, bundle.model.config.text_config.num_attention_heads)
        self.children = [self._header(), controls, self.error, self.warning, self.heatmap, self.pattern,
                         self.comparison, export_row]

        self._update_enabled()
        self._watch([self.kind, self.block, self.corruption, self.noise, self.window, self.noise_samples,
                     self.seed, self.normalized, self.show_stderr, self.view, self.method, self.question_box,
                     self.position, *self.counterfactual.controls])
        self.refresh()

    def _tips(self, noise_name: str) -> None:
        set_tooltip(self.noise, NOISE_TIPS[noise_name])
        set_tooltip(self.normalized, "show (score − corrupted) / (clean − corrupted), on a fixed range from −1 to 1")
        set_tooltip(self.show_stderr, "show each cell's standard error over the noise samples instead of its score")
        set_tooltip(self.noise_samples, "noise draws averaged in each cell")

    def _outputs(self, style: dict[str, str]) -> W.HBox:
        """The warning, the heatmap views and the export row (returned)."""
        self.warning = W.HTML()
        self.heatmap = W.Image(format="png")
        self._renderers = [HeatmapRenderer() for _ in range(1 + len(SUBLAYER_KINDS))]  # the map, then each panel
        self.comparison = W.HBox([W.Image(format="png") for _ in SUBLAYER_KINDS],
                                 layout=W.Layout(flex_flow="row wrap", display="none"))
        self.export_name = W.Text(value="trace", description="file", style=style, layout=W.Layout(width="220px"))
        self.export_buttons = [W.Button(description=f"save {fmt}", layout=W.Layout(width="110px"))
                               for fmt in ("PNG", "JSON", "CSV")]
        for button, fmt in zip(self.export_buttons, ("png", "json", "csv")):
            button.on_click(lambda _b, fmt=fmt: self.export(fmt))
        return W.HBox([self.export_name, *self.export_buttons])

    # ----- state ------------------------------------------------------------------------
    def controls_config(self) -> TraceConfig:
        """The configuration the controls describe (see :func:`controls_config`)."""
        config = controls_config(block=self.block.value, kind=self.kind.value, window=int(self.window.value),
                                 corruption=self.corruption.value, level=float(self.noise.value),
                                 samples=int(self.noise_samples.value), seed=int(self.seed.value),
                                 position=self.position.value, **self.scored)
        return self.counterfactual.apply(config, int(self.gallery.value or 0))

    def _update_enabled(self) -> None:
        self.counterfactual.sync(int(self.gallery.value or 0))
        for control in (self.corruption, self.noise, self.noise_samples, self.seed):
            control.disabled = self.counterfactual.source.value != "noise"  # a counterfactual is one fixed sample
        hidden = self.kind.value == HIDDEN and self.view.value == "single"
        self.window.disabled = hidden
        self.position.layout.display = None if is_head_kind(self.kind.value) and self.view.value == "single" else "none"
        set_tooltip(self.window, WINDOW_OFF_TIP if hidden else WINDOW_ON_TIP)
        self.kind.disabled = self.view.value == "compare"
        set_tooltip(self.kind, "the comparison view shows all four kinds" if self.kind.disabled
                    else "which state is restored to its clean value")
        set_tooltip(self.noise, NOISE_TIPS[self.corruption.value])

    def _on_change(self, _change: dict) -> None:
        if self._syncing:
            return
        self._update_enabled()
        self.refresh()

    # ----- work ---------------------------------------------------------------------------
    def _run(self, job: threading.Event) -> None:
        tracer = self.tracer
        self.answer_view.value = answer_html(tracer)
        self._sync_words(tracer)
        self.counterfactual.sync(int(self.gallery.value or 0))
        self.config = config = self.controls_config()
        phases = self._phases(config)
        for i, config in enumerate(phases):
            self.status.value = cost_notice(tracer, config)
            if self.view.value == "compare":
                window = int(self.window.value)  # the kind dropdown is idle here; windows apply to sublayers
                results = [tracer.trace(replace(config, kind=k, window=window_for(k, window)),
                                        progress=self._progress(job)) for k in SUBLAYER_KINDS]
            else:
                results = [tracer.trace(config, progress=self._progress(job))]
            if job.is_set():
                return
            self._show(results)
            self.status.value = self._status_text(results[0]) + self._method_note(config, i == len(phases) - 1)

    def _status_text(self, result: TraceResult) -> str:
        return (f"scored {escape(result.scored)}: clean {result.high_score:.3f}, "
                f"corrupted {result.low_score:.3f}, total effect {result.total_effect:.3f}")

    def _maps(self) -> list[W.Widget]:
        return [self.heatmap, self.comparison]

    def _show(self, results: list[TraceResult]) -> None:
        normalized = bool(self.normalized.value)
        show = "stderr" if self.show_stderr.value else "scores"
        self.warning.value = tiny_warning(results[0])
        self._dim(False)
        self.pattern.show(self.tracer, results[0] if len(results) == 1 else None)
        if len(results) == 1:
            self.result = results[0]
            self.heatmap.value = png = self._renderers[0].png(results[0], normalized=normalized, show=show)
            self.heatmap.layout.width = f"{png_width(png)}px"
            self.heatmap.layout.display = None
            self.comparison.layout.display = "none"
        else:
            self.result = results[0]
            self.results = {r.kind: r for r in results}
            for view, result, renderer in zip(self.comparison.children, results, self._renderers[1:]):
                view.value = png = renderer.png(result, normalized=normalized, show=show)
                view.layout.width = f"{png_width(png)}px"
            self.heatmap.layout.display = "none"
            self.comparison.layout.display = "flex"

    # ----- export -------------------------------------------------------------------------
    def export(self, fmt: str) -> Path | None:
        """Save the current heatmap (png) or result (json, csv) under ``export_dir``."""
        if self.result is None:
            self.error.value = "<span style='color:#a00'>nothing to save yet</span>"
            return None
        name = (self.export_name.value.strip() or "trace").replace("/", "_").lstrip("-.") or "trace"
        path = self.export_dir / f"{name}.{fmt}"
        try:
            if fmt == "png" and self.view.value == "compare" and self.results:
                path.parent.mkdir(parents=True, exist_ok=True)
                figure = plot_traces(list(self.results.values()), normalized=bool(self.normalized.value))
                path.write_bytes(figure_png(figure))
            else:
                self.result.export(path, fmt, normalized=bool(self.normalized.value))
        except (OSError, ValueError) as error:
            self.error.value = f"<span style='color:#a00'>could not save {escape(str(path))}: {escape(str(error))}</span>"
            return None
        self.status.value = f"saved <code>{escape(str(path))}</code>"
        return path


def controls_config(*, block: str, kind: str, window: int, corruption: str, level: float, samples: int,
                    seed: int, answer: str | None = None, target: int | None = None, position: str = "") -> TraceConfig:
    """The TraceConfig that the explorer's controls describe: a pure function, tested without a kernel.

    Hidden states are restored one layer at a time (the window slider is off for them). ``answer`` and
    ``target`` are a captioner's caption to score and its word; ``position`` is where a head map restores
    its heads ("" for every position, "3", "1,2" or a role), read only for head kinds.
    """
    return TraceConfig(block=block, kind=kind, window=window_for(kind, window),
                       corruption=from_name(corruption, round(float(level), 4)), samples=int(samples), seed=int(seed),
                       answer=answer, target=target, position=parse_position(position) if is_head_kind(kind) else None)


def _first_content_word(words: Sequence[str]) -> int:
    """Where a captioner's explorer starts: the first word that is not a stop word ("red" in "a red circle")."""
    from .roles import STOPWORDS

    return next((i for i, word in enumerate(words) if word.lower() not in STOPWORDS and word.isalpha()), 0)


def default_gallery(head: str, count: int = 6) -> list[tuple]:
    """The explorers' gallery when none is given: easy-VQA demo questions, or for a captioner (prompt "") and
    an image-text matcher (the image's own caption as the text) easy-VQA test images with their captions."""
    from .data import demo_samples, easy_vqa_captions

    task = heads.of(head)
    if task.reads_questions:
        return [tuple(s) for s in demo_samples()]
    return [task.gallery_entry(Image.open(path).convert("RGB"), caption)
            for path, caption in easy_vqa_captions("test")[:count]]


#: The image-side explorer paints regions on the image; vision heads (attn_head) are traced with trace() and the CLI.
VISION_KIND_OPTIONS = [(KIND_SHORT_LABELS[k], k) for k in VISION_KINDS]
#: What an image-text matcher's image-side trace can score.
MATCH_METRICS = ("prob", "itc")
VISION_CORRUPTION_OPTIONS = [("noise on patch embeddings", "noise"), ("blur pixels", "blur"), ("grey pixels", "grey")]
AREA_OPTIONS = [("whole image", "all"), ("inside the box", "inside"), ("outside the box", "outside")]
VISION_LEVEL_TIPS = {
    "noise": "Gaussian noise of s·σ on the patch embeddings (σ = their std), before the vision encoder; ROME uses s = 3",
    "blur": BY_NAME["blur"].info.tip,
    "grey": BY_NAME["grey"].info.tip,
}


class VisionTraceExplorer(_LiveView):
    """Where in the picture, and how deep in the vision encoder, the answer lives: effects painted on the image.

    The corruption acts before the vision encoder (noise on patch embeddings, or blurred
    or greyed pixels), on the whole image or a box set with two range sliders; each
    region of a grid is then restored as a unit at each vision layer. Moving the layer
    slider only redraws: one trace covers every layer.
    """

    preview_width = 128

    def __init__(
        self,
        bundle: BlipBundle,
        image: Any = None,
        question: str | None = None,
        *,
        gallery: Sequence[tuple] | None = None,
        regions: int | None = None,
        noise_samples: int = 5,
        background: bool = True,
        samples: Sequence[tuple] | None = None,
    ) -> None:
        super().__init__(bundle, image, question, gallery=_gallery(gallery, samples), background=background)
        side, layers = bundle.patch_grid_side, bundle.num_layers(VISION_ENCODER)
        if regions is not None:  # as trace() checks them: refused, never changed
            check_int("regions", regions, 1, side)
        check_int("noise_samples", noise_samples, 1, MAX_SAMPLES)
        style = {"description_width": "initial"}
        self.kind = W.Dropdown(options=VISION_KIND_OPTIONS, value=HIDDEN, description="kind", style=style)
        self.window = W.IntSlider(value=1, min=1, max=layers, description="window", continuous_update=False, style=style)
        self.regions = W.IntSlider(value=regions if regions is not None else min(side, 8), min=1, max=side,
                                   description="regions per side",
                                   continuous_update=False, style=style)
        self.corruption = W.Dropdown(options=VISION_CORRUPTION_OPTIONS, value="noise", description="corruption",
                                     style=style)
        self.level = level_slider(float(getattr(default_corruption(bundle, "patches"), "level", 3.0)), 0.1, 30, "level",
                                  style)
        self.area = W.ToggleButtons(options=AREA_OPTIONS, value="all")
        self.box_x = W.IntRangeSlider(value=(25, 75), min=0, max=100, description="box x %", continuous_update=False,
                                      style=style)
        self.box_y = W.IntRangeSlider(value=(25, 75), min=0, max=100, description="box y %", continuous_update=False,
                                      style=style)
        self.layer = W.IntSlider(value=0, min=0, max=layers - 1, description="vision layer", style=style)
        self.all_layers = W.Checkbox(value=False, description="all layers", indent=False)
        self.normalized = W.Checkbox(value=True, description="normalised", indent=False)
        self.noise_samples, self.seed = samples_box(noise_samples, style), seed_box(0, style)
        matching = {} if "itc" in self.task.metrics else {"display": "none"}
        self.metric = W.ToggleButtons(options=[(metric_label(m, self.head), m) for m in MATCH_METRICS], value="prob",
                                      layout=W.Layout(**matching))
        self._tips()
        self.overlay = W.Image(format="png")
        self.counterfactual = Counterfactual(self.gallery_items, sources=("noise", "pair"))  # a swap acts after the ViT
        controls = W.VBox([
            W.HBox([self.kind, self.window, self.regions]), self.counterfactual,
            W.HBox([self.corruption, self.level, self.noise_samples, self.seed]),
            W.HBox([self.area, self.box_x, self.box_y]),
            W.HBox([self.layer, self.all_layers, self.normalized, self.method]),
            self.metric,
        ])
        self.warning = W.HTML()
        self.children = [self._header(), controls, self.error, self.warning, self.overlay]
        self._update_enabled()
        self._watch([self.kind, self.window, self.regions, self.corruption, self.level, self.area, self.box_x,
                     self.box_y, self.noise_samples, self.seed, self.question_box, self.method, self.metric,
                     *self.counterfactual.controls])
        for control in (self.layer, self.all_layers, self.normalized):
            control.observe(self._on_view, names="value")
        self.refresh()

    def _tips(self) -> None:
        set_tooltip(self.metric, "p(match) from the ITM head, or the ITC similarity of the image's projected CLS "
                                 "state with the text read without the image")
        set_tooltip(self.regions, "the patch grid is split into this many regions per side; each is restored as a unit")
        set_tooltip(self.area, "which part of the image the corruption touches")
        set_tooltip(self.layer, "which vision layer's effects to paint; redraws without tracing again")

    @property
    def region(self) -> Any:
        """The area the corruption touches (None for the whole image)."""
        from .regions import Box, Outside

        if self.area.value == "all":
            return None
        (x0, x1), (y0, y1) = self.box_x.value, self.box_y.value
        box = Box(x0 / 100, y0 / 100, x1 / 100, y1 / 100)
        return box if self.area.value == "inside" else Outside(box)

    def controls_config(self) -> TraceConfig:
        """The configuration the controls describe."""
        from .corruption import Blur, GaussianNoise, Grey

        level = round(float(self.level.value), 4)
        makers: dict[str, Callable[[], Any]] = {"noise": lambda: GaussianNoise(level, region=self.region),
                                                "blur": lambda: Blur(level, region=self.region),
                                                "grey": lambda: Grey(region=self.region)}
        corruption = makers[self.corruption.value]()
        kind = self.kind.value
        config = TraceConfig(block=VISION_ENCODER, kind=kind, window=window_for(kind, self.window.value),
                             regions=int(self.regions.value), corruption=corruption,
                             samples=1 if self.corruption.value != "noise" else int(self.noise_samples.value),
                             seed=int(self.seed.value), metric=self.metric.value, **self.scored)
        return self.counterfactual.apply(config, int(self.gallery.value or 0))  # a partner's patches, a direction

    def _update_enabled(self) -> None:
        self.counterfactual.sync(int(self.gallery.value or 0))
        paired = self.counterfactual.source.value != "noise"  # the partner image replaces every corruption control
        self.window.disabled = self.kind.value == HIDDEN
        set_tooltip(self.window, WINDOW_OFF_TIP if self.window.disabled else WINDOW_ON_TIP)
        self.level.disabled = self.corruption.value == "grey" or paired
        self.noise_samples.disabled = self.corruption.value != "noise" or paired
        self.corruption.disabled = self.seed.disabled = self.area.disabled = paired
        set_tooltip(self.level, VISION_LEVEL_TIPS[self.corruption.value])
        self.box_x.disabled = self.box_y.disabled = self.area.value == "all" or paired
        self.layer.disabled = bool(self.all_layers.value)

    def _on_change(self, _change: dict) -> None:
        if self._syncing:
            return
        self._update_enabled()
        self.refresh()

    def _on_view(self, _change: dict) -> None:
        self._update_enabled()
        if self.result is not None:
            try:
                self._render(self.result)
            except Exception as error:  # shown in the widget
                self._show_error(error)

    def _run(self, job: threading.Event) -> None:
        tracer = self.tracer
        self.answer_view.value = answer_html(tracer)
        self._sync_words(tracer)
        self.counterfactual.sync(int(self.gallery.value or 0))
        self.config = config = self.controls_config()
        phases = self._phases(config)
        for i, config in enumerate(phases):
            self.status.value = cost_notice(tracer, config)
            result = tracer.trace(config, progress=self._progress(job))
            if job.is_set():
                return
            self.result = result
            self._render(result)
            self.warning.value = tiny_warning(result)
            self._dim(False)
            self.status.value = (f"scored {escape(result.scored)}: clean {result.high_score:.3f}, "
                                 f"corrupted {result.low_score:.3f}, total effect {result.total_effect:.3f}"
                                 + self._method_note(config, i == len(phases) - 1))

    def _maps(self) -> list[W.Widget]:
        return [self.overlay]

    def _render(self, result: TraceResult) -> None:
        from .plotting import plot_on_image

        layer = None if self.all_layers.value else int(self.layer.value)
        figure = plot_on_image(result, self._image, layer=layer, normalized=bool(self.normalized.value))
        self.overlay.value = png = figure_png(figure)
        self.overlay.layout.width = f"{png_width(png)}px"
