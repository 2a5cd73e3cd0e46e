"""VisionTraceExplorer: the image side, live: vision-encoder states restored by region, painted on the image.

    >>> from blip_trace_widgets import load_model
    >>> from blip_trace_widgets.widgets import VisionTraceExplorer
    >>> explorer = VisionTraceExplorer(load_model("demo"), background=False, regions=4)
    >>> explorer.result.block, explorer.result.config["auto"]["stopped"] in ("stable", "budget")  # it sharpened
    ('vision_encoder', True)
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import ipywidgets as W

from ..causal_trace.config import MAX_SAMPLES, check_int
from ..causal_trace.plots import figure_png
from ..causal_trace.procedures import default_corruption
from ..causal_trace.results import TraceResult
from ..causal_trace.tracer import TraceConfig
from ..core.errors import renamed
from ..core.names import HIDDEN, VISION_ENCODER
from ..corruptions.kinds import BY_NAME
from ..models.heads import metric_label
from ..models.loading import BlipBundle
from .controls import (
    AREA_OPTIONS,
    AUTO,
    MATCH_METRICS,
    SLIDER_LAYOUT,
    VISION_CORRUPTION_OPTIONS,
    VISION_KIND_OPTIONS,
    VISION_LEVEL_TIPS,
    VISION_SAMPLES,
    WINDOW_OFF_TIP,
    WINDOW_ON_TIP,
    IntSlider,
    level_slider,
    merged_gallery,
    row,
    samples_box,
    samples_count,
    seed_box,
    set_tooltip,
    vision_config,
    window_slider,
)
from .counterfactual import Counterfactual
from .live import LiveView, png_width, start_mode, tiny_warning, trace_in_phases


class VisionTraceExplorer(LiveView):
    """Where in the picture, and how deep in the vision encoder, the answer lives: effects painted on the image.

    The corruption acts before the vision encoder (noise on patch embeddings, or blurred
    or greyed pixels), on the whole image or a box set with two range sliders; each
    region of a grid is then restored as a unit at each vision layer. Moving the layer
    slider only redraws: one trace covers every layer. With ``noise_samples="auto"`` (the
    default) exact and verified maps sharpen, redrawn after each round of noise until they are stable.
    """

    preview_width = 128

    def __init__(
        self,
        bundle: BlipBundle,
        image: Any = None,
        text: str | None = None,
        *,
        gallery: Sequence[tuple] | None = None,
        regions: int | None = None,
        noise_samples: int | str = AUTO,
        background: bool = True,
        samples: Sequence[tuple] | None = None,
        question: str | None = None,
        mode: str | None = None,
    ) -> None:
        text = renamed(text, question, "question", "text")
        super().__init__(bundle, image, text, gallery=merged_gallery(gallery, samples), background=background)
        side, layers = bundle.patch_grid_side, bundle.num_layers(VISION_ENCODER)
        if regions is not None:  # as trace() checks them: refused, never changed
            check_int("regions", regions, 1, side)
        if noise_samples != AUTO:
            check_int("noise_samples", noise_samples, 1, MAX_SAMPLES)
        style = {"description_width": "initial"}
        self.kind = W.Dropdown(options=VISION_KIND_OPTIONS, value=HIDDEN, description="kind", style=style)
        self.window = window_slider(1, layers, style)
        self.regions = IntSlider(value=regions if regions is not None else min(side, 8), min=1, max=side,
                                 description="regions per side", continuous_update=False, style=style,
                                 layout=W.Layout(**SLIDER_LAYOUT))
        self.corruption = W.Dropdown(options=VISION_CORRUPTION_OPTIONS, value="gaussian", description="corruption",
                                     style=style)
        self.level = level_slider(float(getattr(default_corruption(bundle, "patches"), "level", 3.0)), 0.1, 30, "level",
                                  style)
        self.area = W.ToggleButtons(options=AREA_OPTIONS, value="all")
        self.box_x, self.box_y = (W.IntRangeSlider(value=(25, 75), min=0, max=100, description=f"box {axis} %",
                                                   continuous_update=False, style=style, layout=W.Layout(**SLIDER_LAYOUT))
                                  for axis in "xy")
        self.layer = IntSlider(value=0, min=0, max=layers - 1, description="vision layer", style=style,
                               layout=W.Layout(**SLIDER_LAYOUT))
        self.all_layers = W.Checkbox(value=False, description="all layers", indent=False, layout=W.Layout(width="auto"))
        self.normalized = W.Checkbox(value=True, description="normalised", indent=False, layout=W.Layout(width="auto"))
        self.noise_samples, self.seed = samples_box(noise_samples, style), seed_box(0, style)
        matching = {} if "itc" in self.task.metrics else {"display": "none"}
        self.metric = W.ToggleButtons(options=[(metric_label(m, self.head), m) for m in MATCH_METRICS], value="prob",
                                      layout=W.Layout(**matching))
        self._tips()
        self.overlay = W.Image(format="png")
        self.counterfactual = Counterfactual(self.gallery_items, sources=("noise", "pair"))  # a swap acts after the ViT
        controls = W.VBox([row(self.kind, self.window, self.regions), self.counterfactual,
                           row(self.corruption, self.level, self.noise_samples, self.seed),
                           row(self.area, self.box_x, self.box_y), row(self.method),
                           row(self.layer, self.all_layers, self.normalized), self.metric])
        self.warning = W.HTML()
        self.children = [self._header(), controls, self.error, self.warning, self.overlay]
        start_mode(self, mode, self.controls_config())
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
        from ..core.regions import Box, Outside

        if self.area.value == "all":
            return None
        (x0, x1), (y0, y1) = self.box_x.value, self.box_y.value
        box = Box(x0 / 100, y0 / 100, x1 / 100, y1 / 100)
        return box if self.area.value == "inside" else Outside(box)

    def controls_config(self) -> TraceConfig:
        """The configuration the controls describe."""
        config = vision_config(kind=self.kind.value, window=int(self.window.value), regions=int(self.regions.value),
                               corruption=self.corruption.value, level=float(self.level.value), region=self.region,
                               samples=samples_count(self.noise_samples.value, VISION_SAMPLES),
                               seed=int(self.seed.value),
                               metric=self.metric.value, **self.scored)
        return self.counterfactual.apply(config, int(self.gallery.value or 0))  # a partner's patches, a direction

    def _update_enabled(self) -> None:
        self.counterfactual.sync(int(self.gallery.value or 0))
        paired = self.counterfactual.source.value != "noise"  # the partner image replaces every corruption control
        self.window.disabled = self.kind.value == HIDDEN
        set_tooltip(self.window, WINDOW_OFF_TIP if self.window.disabled else WINDOW_ON_TIP)
        self.level.disabled = self.corruption.value == "grey" or paired
        self.noise_samples.disabled = not BY_NAME[self.corruption.value].info.random or paired
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
        trace_in_phases(self, job, lambda config: [config], self._show)

    def _show(self, results: list[TraceResult]) -> None:
        self.result = results[0]
        self._render(results[0])
        self.warning.value = tiny_warning(results[0])
        self._dim(False)

    def _maps(self) -> list[W.Widget]:
        return [self.overlay]

    def _render(self, result: TraceResult) -> None:
        from ..causal_trace.plots import plot_on_image

        layer = None if self.all_layers.value else int(self.layer.value)
        figure = plot_on_image(result, self._image, layer=layer, normalized=bool(self.normalized.value))
        self.overlay.value = png = figure_png(figure)
        self.overlay.layout.width = f"{png_width(png)}px"
