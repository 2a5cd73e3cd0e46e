"""The explorers' controls and the pure functions from their values to a configuration.

    >>> from blip_trace_widgets.widgets.controls import controls_config
    >>> controls_config(block="question_encoder", kind="mlp", window=3, corruption="gaussian", level=5.0, samples=4,
    ...                 seed=0, position="").corruption.level
    5.0

Options, tooltips and limits come from :mod:`~blip_trace_widgets.core.names`, :mod:`~blip_trace_widgets.corruptions.kinds`
and :mod:`~blip_trace_widgets.causal_trace.config`; nothing here traces.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any

import ipywidgets as W
import numpy as np
import traitlets
from PIL import Image

from ..causal_trace.config import MAX_SAMPLES, MAX_SEED, check_int, parse_position
from ..causal_trace.sharpen import AutoSampling
from ..causal_trace.tracer import TraceConfig
from ..core.errors import BlipTraceError
from ..core.names import (
    BLOCK_LABELS,
    DEFAULT_SAMPLES,
    DIRECTION_LABELS,
    EXPLORER_MODES,
    KIND_SHORT_LABELS,
    STAGE_LABELS,
    SUBLAYER_KINDS,
    TEXT_HEAD_KINDS,
    TEXT_KINDS,
    VISION_ENCODER,
    VISION_KINDS,
    Metric,
    facts,
    is_head_kind,
    kinds_of,
    window_for,
)
from ..core.regions import Box, Outside
from ..corruptions.kinds import BY_NAME, NOISE_NAMES, ImageSwap, WordSwap, from_name
from ..models import heads
from ..models.anatomy import check_block, check_kind
from ..models.heads import BLOCKS_OF

IPYWIDGETS_MAJOR = int(W.__version__.split(".")[0])
KIND_OPTIONS = [(KIND_SHORT_LABELS[k], k) for k in (*TEXT_KINDS, *TEXT_HEAD_KINDS)]


def kind_options(block: str) -> list[tuple[str, str]]:
    """The kind dropdown's options for ``block``: the kinds it has (BLIP-2's language model has no cross-attention)."""
    return [(KIND_SHORT_LABELS[k], k) for k in kinds_of(block)]
#: The text blocks TraceExplorer offers for each head (the vision encoder has its own explorer).
BLOCK_OPTIONS = {head: [(BLOCK_LABELS[b], b) for b in blocks if not facts(b).image_side] for head, blocks in BLOCKS_OF.items()}
CORRUPTION_OPTIONS = [(BY_NAME[name].info.label, name) for name in NOISE_NAMES]
NOISE_TIPS = {name: BY_NAME[name].info.tip for name in NOISE_NAMES}
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


def refuse_outside(widget: Any, value: Any, low: float, high: float) -> Any:
    """``value``, or a clear error when it is outside ``low`` to ``high``, where ipywidgets would move it to the
    nearest end without a word."""
    if not low <= value <= high:
        name = widget.description or "this control"
        raise traitlets.TraitError(f"{name} {value!r} is outside {low:g} to {high:g}: pick a value in that range")
    return value


class IntSlider(W.IntSlider):
    """An ipywidgets IntSlider that refuses a value outside its range instead of moving it to an end."""

    @traitlets.validate("value")
    def _validate_value(self, proposal: dict) -> Any:
        return refuse_outside(self, proposal["value"], self.min, self.max)


class BoundedIntText(W.BoundedIntText):
    """An ipywidgets BoundedIntText that refuses a value outside its range instead of moving it to an end."""

    @traitlets.validate("value")
    def _validate_value(self, proposal: dict) -> Any:
        return refuse_outside(self, proposal["value"], self.min, self.max)


class FloatLogSlider(W.FloatLogSlider):
    """An ipywidgets FloatLogSlider that refuses a value outside its range instead of moving it to an end."""

    @traitlets.validate("value")
    def _validate_value(self, proposal: dict) -> Any:
        low, high = self.base ** self.min, self.base ** self.max
        value = refuse_outside(self, proposal["value"], low * (1 - 1e-9), high * (1 + 1e-9))  # the ends, rounded
        return min(max(value, low), high)


#: A slider's own width: it keeps a usable track beside wide controls, and a row too narrow for it wraps.
SLIDER_LAYOUT = {"width": "420px", "min_width": "320px", "flex": "0 0 auto"}
#: A row of controls that wraps onto a second line instead of squeezing its sliders to a handle.
ROW_LAYOUT = {"flex_flow": "row wrap", "align_items": "center"}


def row(*controls: W.Widget) -> W.HBox:
    """Controls side by side, wrapping when the window is narrow."""
    return W.HBox(list(controls), layout=W.Layout(**ROW_LAYOUT))


def level_slider(value: float, low: float, high: float, description: str, style: dict[str, str]) -> FloatLogSlider:
    """A log slider over ``low`` to ``high``, widened to hold ``value`` exactly: a level that trace() accepts is
    shown as it is, never moved to the slider's end."""
    low, high = min(low, value), max(high, value)
    return FloatLogSlider(value=value, base=10, min=float(np.log10(low)), max=float(np.log10(high)), step=0.02,
                          description=description, continuous_update=False, readout_format=".3g", style=style,
                          layout=W.Layout(**SLIDER_LAYOUT))


#: The samples box's "auto": exact maps drawn in rounds until they are stable, by :class:`~.sharpen.AutoSampling`'s
#: defaults (:data:`AUTO_PLAN`); the box's other suggestions are whole numbers, and any other one may be typed.
AUTO = "auto"
AUTO_PLAN = AutoSampling()
SAMPLES_CHOICES = (AUTO, "3", "10", "30", "100")
SAMPLES_TIP = (f"{AUTO}: the exact map is drawn {AUTO_PLAN.round_samples} noise samples at a time and redrawn after "
               f"each round, until its significant cells and top cell hold for {AUTO_PLAN.stable_rounds} rounds (at "
               f"most {AUTO_PLAN.max_samples} samples); or a whole number of noise draws averaged in each cell, 1 to "
               f"{MAX_SAMPLES}")


class SamplesValue(traitlets.Unicode):
    """A samples box's text; a whole number set from Python is taken as its digits, and refused outside 1 to
    MAX_SAMPLES (text typed in the box is read when it is traced, and a bad one is said inside the widget)."""

    def validate(self, obj: Any, value: Any) -> Any:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = str(int(refuse_outside(obj, int(value), 1, MAX_SAMPLES)))
        return super().validate(obj, value)


class SamplesBox(W.Combobox):
    """Noise samples: "auto" (maps that sharpen) or a whole number, typed or picked from the suggestions."""

    value = SamplesValue(AUTO, help="auto, or a whole number of noise samples").tag(sync=True)


def samples_setting(text: Any) -> int | None:
    """A samples box's value as a whole number of samples, or None for "auto"; a clear error naming the choices
    for anything else."""
    value = str(text).strip().lower()
    if value == AUTO:
        return None
    if not value.isdigit():
        raise BlipTraceError(f"noise samples {text!r}: type {AUTO} or a whole number from 1 to {MAX_SAMPLES}")
    check_int("noise samples", int(value), 1, MAX_SAMPLES)
    return int(value)


def samples_box(value: int | str, style: dict[str, str]) -> SamplesBox:
    """Noise samples: "auto", or 1 to MAX_SAMPLES as trace() takes them (a slider to 1000 would have no usable
    track)."""
    if value != AUTO:
        check_int("samples", value, 1, MAX_SAMPLES)
    box = SamplesBox(value=str(value), options=SAMPLES_CHOICES, ensure_option=False, description="noise samples",
                     continuous_update=False, style=style, layout=W.Layout(width="190px", flex="0 0 auto"))
    set_tooltip(box, SAMPLES_TIP)
    return box


def samples_count(text: Any, auto: int) -> int:
    """The whole number of noise samples a samples box says, or ``auto`` for "auto": what an explorer's estimates
    (and maps that cannot sharpen) draw then."""
    count = samples_setting(text)
    return auto if count is None else count


def start_samples(config: TraceConfig | None, noise_samples: int | str | None) -> int | str:
    """The samples box's first value: ``noise_samples`` when given, else "auto" without a starting configuration
    and its ``samples`` with one. A starting configuration whose samples (other than the default) disagree with
    ``noise_samples`` is refused, never overridden."""
    if noise_samples is None:
        return AUTO if config is None else config.samples
    if config is not None and config.samples not in (DEFAULT_SAMPLES, noise_samples):
        raise BlipTraceError(f"config has samples={config.samples} and noise_samples={noise_samples!r}: pass one")
    return noise_samples


def seed_box(value: int, style: dict[str, str]) -> BoundedIntText:
    """The noise seed, 0 to MAX_SEED as trace() takes it."""
    check_int("seed", value, 0, MAX_SEED)
    return BoundedIntText(value=value, min=0, max=MAX_SEED, description="seed", style=style,
                          layout=W.Layout(width="190px", flex="0 0 auto"))


def window_slider(value: int, layers: int, style: dict[str, str]) -> IntSlider:
    """Consecutive layers restored together, 1 to ``layers``; a window outside that is refused, never moved."""
    check_int("window", value, 1, layers)
    return IntSlider(value=value, min=1, max=layers, description="window", continuous_update=False, style=style,
                     layout=W.Layout(**SLIDER_LAYOUT))


def tooltip_of(widget: W.Widget) -> str:
    return widget.tooltip if IPYWIDGETS_MAJOR >= 8 else widget.description_tooltip


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


def merged_gallery(gallery: Sequence[tuple] | None, samples: Sequence[tuple] | None) -> Sequence[tuple] | None:
    """``gallery=``, or the old ``samples=`` with a deprecation warning (one word per idea: samples are noise draws)."""
    if samples is not None:
        import warnings

        warnings.warn("the explorers' samples= is now gallery= (samples means noise draws); samples= goes in 0.4",
                      DeprecationWarning, stacklevel=3)
        if gallery is None:
            return samples
    return gallery


def controls_config(*, block: str, kind: str, window: int, corruption: str, level: float, samples: int,
                    seed: int, answer: str | None = None, word: int | None = None, position: str = "") -> TraceConfig:
    """The TraceConfig that the explorer's controls describe: a pure function, tested without a kernel.

    Hidden states are restored one layer at a time (the window slider is off for them). ``answer`` and
    ``word`` are a captioner's caption to score and its word; ``position`` is where a head map restores
    its heads ("" for every position, "3", "1,2" or a role), read only for head kinds.
    """
    return TraceConfig(block=check_block(block), kind=check_kind(kind), window=window_for(kind, window),
                       corruption=from_name(corruption, round(float(level), 4)), samples=int(samples), seed=int(seed),
                       answer=answer, word=word, position=parse_position(position) if is_head_kind(kind) else None)


def default_gallery(head: str, count: int = 6) -> list[tuple]:
    """The explorers' gallery when none is given: easy-VQA demo questions, or for a captioner (prompt "") and
    an image-text matcher (the image's own caption as the text) easy-VQA test images with their captions."""
    from ..datasets.easy_vqa import demo_samples, easy_vqa_captions

    task = heads.of(head)
    if task.reads_questions:
        return [tuple(s) for s in demo_samples()]
    return [task.gallery_entry(Image.open(path).convert("RGB"), caption)
            for path, caption in easy_vqa_captions("test")[:count]]


#: The image-side explorer paints regions on the image; vision heads (attn_head) are traced with trace() and the CLI.
VISION_KIND_OPTIONS = [(KIND_SHORT_LABELS[k], k) for k in VISION_KINDS]
#: What an image-text matcher's image-side trace can score.
MATCH_METRICS = ("prob", "itc")
#: The vision explorer's noise samples where "auto" does not sharpen (its estimates): its fixed default before.
VISION_SAMPLES = 5
VISION_CORRUPTION_OPTIONS = [("noise on patch embeddings", "gaussian"), ("blur pixels", "blur"), ("grey pixels", "grey")]
AREA_OPTIONS = [("whole image", "all"), ("inside the box", "inside"), ("outside the box", "outside")]
VISION_LEVEL_TIPS = {
    "gaussian": "Gaussian noise of s·σ on the patch embeddings (σ = their std), before the vision encoder; ROME uses s = 3",
    "blur": BY_NAME["blur"].info.tip,
    "grey": BY_NAME["grey"].info.tip,
}




def phases(config: TraceConfig, mode: str) -> list[TraceConfig]:
    """The configurations an explorer shows in turn for its method control (``mode``): the estimate first, then
    the verified or exact map. ``"flagged"`` adds GradDrop's flags (cells whose paths may cancel), which the
    verified map makes exact too."""
    if config.fresh_noise:  # a fresh draw per cell has no one corrupted run to take gradients at: exact only
        return [config]
    mode = explorer_mode(mode)
    if mode == "exact" or (mode in ("both", "verified", "flagged") and config.window > 1):
        return [config]  # a window's estimate costs about twice its exact map
    estimate = replace(config, method="estimate")
    if mode == "estimate":
        return [estimate]
    if mode == "both":
        return [estimate, config]
    if mode == "flagged":  # GradDrop's flags, only here: no other mode carries them
        estimate = replace(estimate, grad_drop=True)
    return [estimate, replace(estimate, method="verified")]


def compare_configs(config: TraceConfig, window: int) -> list[TraceConfig]:
    """The "compare kinds" view's panels: ``config`` for each sublayer kind its block has (the window slider's
    ``window`` for the sublayers, one layer for hidden states)."""
    return [replace(config, kind=kind, window=window_for(kind, window))
            for kind in SUBLAYER_KINDS if kind in kinds_of(config.block)]


#: An explorer opens on the whole exact map when the cost estimate says it takes at most this many seconds
#: here (the demo models: well under one); slower models open on the estimate with its top cells made exact.
QUICK_SECONDS = 5.0


def starting_mode(seconds: float | None) -> tuple[str, str]:
    """The method an explorer opens with when none is given, from the exact map's estimated time (None: unknown),
    and why, for the method control's tooltip."""
    if seconds is not None and seconds <= QUICK_SECONDS:
        return "exact", f"Opened on the exact map: it takes about {seconds:.1g} s here."
    about = f"about {seconds:.0f} s" if seconds is not None else "an unknown time"
    return "verified", (f"Opened on the estimate with its top cells exact: the whole exact map takes {about} "
                        "here; pick 'exact only' for it.")


def position_box(position: int | tuple[int, ...] | str | None, style: dict[str, str]) -> W.Text:
    """The "heads at" box of the head kinds, holding ``position`` (see :func:`format_position`)."""
    box = W.Text(value=format_position(position), description="heads at", placeholder="every position", style=style,
                 continuous_update=False, layout=W.Layout(width="220px"))
    set_tooltip(box, "head kinds: restore the heads only at these positions (3, or 1,2) or a token's role (first, "
                     "object, last); empty: every position")
    return box


def format_position(position: int | tuple[int, ...] | str | None) -> str:
    """A head map's positions as the "heads at" box shows them: "" (every position), "3", "1,2" or a role."""
    if position is None:
        return ""
    if isinstance(position, tuple):
        return ",".join(str(p) for p in position)
    return str(position)


def check_shown(config: TraceConfig, shown: TraceConfig, ignore: Sequence[str] = ()) -> None:
    """Refuse a starting ``config`` whose settings the controls cannot show (``shown`` is what they describe):
    an explorer never drops or changes a setting without a word."""
    if config.method != "exact":
        raise BlipTraceError(f"an explorer's mode sets the method: pass mode={config.method!r} (one of "
                             f"{', '.join(EXPLORER_MODES)}) instead of a config with method={config.method!r}")
    lost = [f.name for f in fields(config) if f.name not in ignore and getattr(config, f.name) != getattr(shown, f.name)]
    if lost:
        asked = ", ".join(f"{name}={getattr(config, name)!r}" for name in lost)
        would = ", ".join(f"{name}={getattr(shown, name)!r}" for name in lost)
        raise BlipTraceError(f"the explorer's controls cannot show {asked} (they would trace {would}): leave "
                             f"{'it' if len(lost) == 1 else 'these'} out of config, or trace with "
                             "trace(bundle, image, text, ...)")


def corruption_words(config: TraceConfig) -> str:
    """The corruption in a few words, as the status line says it: what, how strong, where and how many samples."""
    corruption: Any = config.corruption  # a built-in one has info and level
    if isinstance(corruption, ImageSwap):
        return "the image swapped for its partner (one sample)"
    if isinstance(corruption, WordSwap):
        return f"the text's words swapped for {corruption.question!r} (one sample)"
    info = getattr(corruption, "info", None)
    if info is None:
        return f"{type(corruption).__name__} · {config.samples} samples"
    level = f", {info.level_name} {corruption.level:g}" if info.level_name else ""
    region = getattr(corruption, "region", None)
    where = STAGE_LABELS.get(str(config.corrupt), str(config.corrupt)).split(" (")[0]
    if region is not None:
        where += " outside the box" if isinstance(region, Outside) else " inside the box" if isinstance(region, Box) \
            else " inside the mask"
    count = f"{config.samples} noise sample{'s' if config.samples != 1 else ''}" if info.random else \
        "one sample (nothing is drawn)"
    return f"{info.label}{level}, on the {where} · {count}"


def method_words(config: TraceConfig, last: bool) -> str:
    """What a map of ``config`` is: exact, an estimate, or an estimate with some cells exact (``last``: no exact
    map follows)."""
    if config.method == "exact":
        return "<b>EXACT</b> map"
    if config.method == "verified":
        flags = " and its flagged cells" if config.grad_drop else ""
        return f"<b>ESTIMATE</b> (attribution patching), its top {config.verify} cells{flags} exact (outlined)"
    return "<b>ESTIMATE</b> (attribution patching)" + ("" if last else "; the exact map follows…")


def shown_words(configs: Sequence[TraceConfig], last: bool, mode: str = "exact") -> str:
    """The status line's account of what is on screen: each map's method (by kind where the panels differ; with
    why, where ``mode`` asked for an estimate and the map is exact), the corruption with its samples, and the
    direction of patching."""
    methods: dict[str, list[str]] = {}
    for config in configs:
        words = method_words(config, last)
        if config.method == "exact" and mode not in ("exact", "both"):
            words += (" (an estimate needs one corrupted run: fresh noise per cell has none)" if config.fresh_noise
                      else " (exact at once: a window's estimate costs more than its exact map)")
        methods.setdefault(words, []).append(KIND_SHORT_LABELS.get(config.kind, config.kind))
    what = methods.popitem()[0] if len(methods) == 1 else "; ".join(
        f"{', '.join(kinds)}: {words}" for words, kinds in methods.items())
    first = configs[0]
    return f"{what} · {corruption_words(first)} · {DIRECTION_LABELS[first.direction].split(' (')[0]}"


def vision_config(*, kind: str, window: int, regions: int, corruption: str, level: float, region: Any,
                  samples: int, seed: int, metric: Metric, answer: str | None = None,
                  word: int | None = None) -> TraceConfig:
    """The TraceConfig that the vision explorer's controls describe: a corruption named as in
    :data:`~blip_trace_widgets.corruptions.kinds.BY_NAME` over ``region`` (None: the whole image), one sample for a
    corruption that draws nothing (blur, grey)."""
    made = from_name(corruption, round(float(level), 4), region=region)
    return TraceConfig(block=VISION_ENCODER, kind=check_kind(kind), window=window_for(kind, window), regions=int(regions),
                       corruption=made, samples=int(samples) if BY_NAME[corruption].info.random else 1,
                       seed=int(seed), metric=metric, answer=answer, word=word)
