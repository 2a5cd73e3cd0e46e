"""TraceExplorer: ipywidgets controls that drive a live causal-trace heatmap of a text block.

    >>> from blip_trace_widgets import load_model
    >>> from blip_trace_widgets.widgets import TraceExplorer
    >>> TraceExplorer(load_model("demo"), background=False).result.kind
    'hidden'
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from html import escape
from pathlib import Path
from typing import Any

import ipywidgets as W

from ..causal_trace import stages
from ..causal_trace.plots import HeatmapRenderer, figure_png, plot_traces
from ..causal_trace.results import TraceResult
from ..causal_trace.tracer import TraceConfig, Tracer, default_config
from ..core.errors import BlipTraceError, renamed
from ..core.names import (
    BLOCK_LABELS,
    DEFAULT_SAMPLES,
    HIDDEN,
    SUBLAYER_KINDS,
    TEXT_CROSS_BLOCKS,
    facts,
    is_head_kind,
)
from ..lenses.names import CARRIES, SAYS
from ..models import heads
from ..models.loading import BlipBundle
from .controls import (
    BLOCK_OPTIONS,
    CORRUPTION_OPTIONS,
    NOISE_TIPS,
    WINDOW_OFF_TIP,
    WINDOW_ON_TIP,
    check_shown,
    compare_configs,
    controls_config,
    corruption_setting,
    kind_options,
    level_slider,
    merged_gallery,
    position_box,
    row,
    samples_box,
    samples_count,
    seed_box,
    set_tooltip,
    start_samples,
    window_slider,
)
from .counterfactual import Counterfactual
from .live import LiveView, image_png, png_width, start_mode, tiny_warning, trace_in_phases
from .toggle import LensPanel


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
        reads_image = result is not None and result.kind == "cross_attn_head" and result.block not in TEXT_CROSS_BLOCKS
        self.layout.display = None if reads_image else "none"
        self._shown = None
        if result is not None and reads_image:  # the map's own layers (those with cross-attention) and heads
            absent = set(result.config.get("absent_layers", []))
            layers = [(f"layer {j}", j) for j in range(result.num_layers) if j not in absent]
            heads = [(f"h{h}", h) for h in range(len(result.tokens))]
            for control, options in ((self.layer, layers), (self.head, heads)):
                if list(control.options) != options:
                    control.options = options
            self._shown = (tracer, result)
        self.redraw()

    def redraw(self) -> None:
        if self._shown is None:
            return
        from ..causal_trace.patterns import attention_pattern
        from ..causal_trace.plots import attention_overlay

        tracer, result = self._shown
        weights = attention_pattern(tracer, result.block, result.kind, int(self.layer.value))
        positions = list(result.config.get("restored_positions") or range(weights.shape[1]))
        picture = attention_overlay(tracer.image, weights[int(self.head.value), positions].mean(0))
        self.view.value = image_png(picture, 160)


def widest_block(bundle: BlipBundle) -> int:
    """The most layers of the blocks TraceExplorer offers for ``bundle``: the window slider's end (trace() refuses a
    window wider than the chosen block, inside the widget)."""
    return max(bundle.num_layers(block) for _, block in BLOCK_OPTIONS[bundle.head])


def check_start(bundle: BlipBundle, config: TraceConfig) -> None:
    """Refuse a starting configuration that TraceExplorer's controls cannot show as it is, naming the fix."""
    offered = [block for _, block in BLOCK_OPTIONS[bundle.head]]
    if config.block not in offered:
        raise BlipTraceError(f"this explorer traces the {heads.of(bundle).label} model's {' or '.join(offered)}, not "
                             f"{config.block}" + ("; use VisionTraceExplorer for the vision encoder"
                                                  if facts(config.block).image_side else ""))
    layers = bundle.num_layers(config.block)
    if config.window > layers:
        raise BlipTraceError(f"window {config.window} is wider than the {layers} layers of the "
                             f"{BLOCK_LABELS.get(config.block, config.block)}: pass a window from 1 to {layers}")
    if config.kind == HIDDEN and config.window != 1:
        raise BlipTraceError(f"the explorer restores hidden states one layer at a time, as ROME's figures do: "
                             f"pass window=1, or a sublayer kind (mlp, self_attn, cross_attn) for a window of "
                             f"{config.window}; trace(..., kind='hidden', window={config.window}) traces it")


class TraceExplorer(LiveView):
    """Image, question, answer and a causal-trace heatmap that follows the controls.

    ``gallery`` is an optional list of (image, question[, answer]) tuples; with no
    image it defaults to the easy-VQA demo samples. ``background=True`` traces in a
    thread so the controls stay responsive on a slow model; a newer change cancels an
    older trace in flight. ``noise_samples`` ("auto" without a ``config``, else the
    config's ``samples``) is the samples box's first value: with "auto" exact maps
    sharpen, redrawn after each round of noise until they are stable (:mod:`.sharpening`). ``shows``: "carries"
    (the causal map) or "says" (the lens of the same cells and a picked cell's top tokens, :mod:`.toggle`).
    """

    def __init__(
        self,
        bundle: BlipBundle,
        image: Any = None,
        text: str | None = None,
        *,
        gallery: Sequence[tuple] | None = None,
        config: TraceConfig | None = None,
        background: bool = True,
        export_dir: str | Path = ".",
        samples: Sequence[tuple] | None = None,
        mode: str | None = None,
        question: str | None = None,
        noise_samples: int | str | None = None,
        shows: str = CARRIES,
    ) -> None:
        text = renamed(text, question, "question", "text")
        super().__init__(bundle, image, text, gallery=merged_gallery(gallery, samples), background=background)
        self.export_dir = Path(export_dir)
        self.results: dict[str, TraceResult] = {}
        start = start_samples(config, noise_samples)  # "auto": the estimates draw DEFAULT_SAMPLES, as they did
        config = replace(stages.completed(config, bundle) if config is not None else default_config(bundle),
                         samples=samples_count(start, DEFAULT_SAMPLES))
        check_start(bundle, config)
        style = {"description_width": "initial"}
        self.kind = W.Dropdown(options=kind_options(config.block), value=config.kind, description="kind", style=style)
        self.block = W.Dropdown(options=BLOCK_OPTIONS[self.head], value=config.block, description="block", style=style)
        noise_name, noise_level = corruption_setting(config.corruption)
        self.corruption = W.Dropdown(options=CORRUPTION_OPTIONS, value=noise_name, description="corruption", style=style)
        self.noise = level_slider(noise_level, 0.1, 20, "noise scale", style)
        self.window = window_slider(config.window, widest_block(bundle), style)
        self.noise_samples, self.seed = samples_box(start, style), seed_box(config.seed, style)
        self.position = position_box(config.position, style)
        self.normalized = W.Checkbox(value=False, description="normalised", indent=False, layout=W.Layout(width="auto"))
        self.show_stderr = W.Checkbox(value=False, description="standard error", indent=False,
                                      layout=W.Layout(width="auto"))
        self.view = W.ToggleButtons(options=[("one kind", "single"), ("compare kinds", "compare")], value="single")
        self.lens_panel = LensPanel(bundle, shows)  # "what it says": the lens of the same cells
        self.shows = self.lens_panel.shows
        self._tips(noise_name)
        export_row = self._outputs(style)
        self.counterfactual = Counterfactual(self.gallery_items, text=self.task.text)
        self.counterfactual.direction.value = config.direction
        self._start_scored(config)
        controls = W.VBox([
            row(self.block, self.kind, self.position, self.view, self.shows), self.counterfactual,
            row(self.corruption, self.noise), row(self.method),
            row(self.window, self.noise_samples, self.seed, self.normalized, self.show_stderr),
        ])
        self.pattern = HeadPattern(widest_block(bundle), bundle.model.config.text_config.num_attention_heads)
        maps = self.lens_panel.beside(W.VBox([self.heatmap, self.pattern, self.comparison]))
        self.children = [self._header(), controls, self.error, self.warning, maps, self.lens_panel, export_row]
        check_shown(config, self.controls_config(), ignore=("word",) if config.word is None else ())
        start_mode(self, mode, config)
        self._update_enabled()
        self._watch([self.kind, self.block, self.corruption, self.noise, self.window, self.noise_samples,
                     self.seed, self.normalized, self.show_stderr, self.view, self.method, self.question_box,
                     self.position, *self.counterfactual.controls])
        self.refresh()

    def _start_scored(self, config: TraceConfig) -> None:
        """A captioner's caption and word from the starting configuration (checked against the controls after)."""
        if self.captions:
            self.caption_box.value = config.answer or ""
            self._start_word = config.word
            if config.word is not None:
                self.word.options = [(str(config.word), config.word)]
                self.word.value = config.word

    def _tips(self, noise_name: str) -> None:
        set_tooltip(self.noise, NOISE_TIPS[noise_name])
        set_tooltip(self.normalized, "show (score − corrupted) / (clean − corrupted), on a fixed range from −1 to 1")
        set_tooltip(self.show_stderr, "show each cell's standard error over the noise samples instead of its score")

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
        """The configuration the controls describe (see :func:`controls_config`); with "auto" samples, the samples
        of its estimates (``DEFAULT_SAMPLES``), its exact maps sharpening (``result.config["samples"]`` says)."""
        config = controls_config(block=self.block.value, kind=self.kind.value, window=int(self.window.value),
                                 corruption=self.corruption.value, level=float(self.noise.value),
                                 samples=samples_count(self.noise_samples.value, DEFAULT_SAMPLES),
                                 seed=int(self.seed.value), position=self.position.value, **self.scored)
        return self.counterfactual.apply(config, int(self.gallery.value or 0))

    def _sync_kinds(self) -> None:
        """Offer the kinds the chosen block has; a kind it lacks falls back to hidden states."""
        options = kind_options(self.block.value)
        if list(self.kind.options) != options:
            kind = self.kind.value if self.kind.value in dict(options).values() else HIDDEN
            self._syncing = True
            try:
                self.kind.options = options
                self.kind.value = kind
            finally:
                self._syncing = False

    def _update_enabled(self) -> None:
        self._sync_kinds()
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
        def panels(config: TraceConfig) -> list[TraceConfig]:
            if self.view.value != "compare":
                return [config]
            return compare_configs(config, int(self.window.value))  # the kind dropdown is idle here

        trace_in_phases(self, job, panels, self._show)

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
            for i, (view, renderer) in enumerate(zip(self.comparison.children, self._renderers[1:])):
                if i >= len(results):  # a block without one of the kinds (BLIP-2's language model: cross-attention)
                    view.layout.display = "none"
                    continue
                view.value = png = renderer.png(results[i], normalized=normalized, show=show)
                view.layout.width = f"{png_width(png)}px"
                view.layout.display = None
            self.heatmap.layout.display = "none"
            self.comparison.layout.display = "flex"
        self.lens_panel.follow(self, results)

    # ----- export -------------------------------------------------------------------------
    def export(self, fmt: str) -> Path | None:
        """Save what is shown under ``export_dir``: the heatmap (png) or its result (json, csv); the lens grid and
        its result while "what it says" is shown (see :func:`export_shown`)."""
        return export_shown(self, fmt)


def export_shown(view: TraceExplorer, fmt: str) -> Path | None:
    """Save what ``view`` shows as ``export_dir/<file>.<fmt>``: the causal map (the "compare kinds" panels as one
    figure), or the lens while "what it says" is shown; a failure is said inside the widget."""
    if view.result is None:
        view.error.value = "<span style='color:#a00'>nothing to save yet</span>"
        return None
    name = (view.export_name.value.strip() or "trace").replace("/", "_").lstrip("-.") or "trace"
    path = view.export_dir / f"{name}.{fmt}"
    try:
        if view.shows.value == SAYS:
            view.lens_panel.save(path, fmt)
        elif fmt == "png" and view.view.value == "compare" and view.results:
            path.parent.mkdir(parents=True, exist_ok=True)
            figure = plot_traces(list(view.results.values()), normalized=bool(view.normalized.value))
            path.write_bytes(figure_png(figure))
        else:
            view.result.export(path, fmt, normalized=bool(view.normalized.value))
    except (OSError, ValueError) as error:
        view.error.value = f"<span style='color:#a00'>could not save {escape(str(path))}: {escape(str(error))}</span>"
        return None
    view.status.value = f"saved <code>{escape(str(path))}</code>"
    return path
