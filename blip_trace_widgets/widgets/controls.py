"""The explorers' controls and the pure functions from their values to a configuration.

    >>> from blip_trace_widgets.widgets.controls import controls_config
    >>> controls_config(block="question_encoder", kind="mlp", window=3, corruption="gaussian", level=5.0, samples=4,
    ...                 seed=0, position="").corruption.level
    5.0

Options, tooltips and limits come from :mod:`~blip_trace_widgets.names`, :mod:`~blip_trace_widgets.corruption`
and :mod:`~blip_trace_widgets.config`; nothing here traces.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import ipywidgets as W
import numpy as np
from PIL import Image

from .. import heads
from ..config import MAX_SAMPLES, MAX_SEED, check_int, parse_position
from ..corruption import BY_NAME, NOISE_NAMES, from_name
from ..errors import BlipTraceError
from ..heads import BLOCKS_OF
from ..names import (
    BLOCK_LABELS,
    EXPLORER_MODES,
    KIND_SHORT_LABELS,
    TEXT_HEAD_KINDS,
    TEXT_KINDS,
    VISION_ENCODER,
    VISION_KINDS,
    Metric,
    is_head_kind,
    kinds_of,
    window_for,
)
from ..tracing import TraceConfig

IPYWIDGETS_MAJOR = int(W.__version__.split(".")[0])
KIND_OPTIONS = [(KIND_SHORT_LABELS[k], k) for k in (*TEXT_KINDS, *TEXT_HEAD_KINDS)]


def kind_options(block: str) -> list[tuple[str, str]]:
    """The kind dropdown's options for ``block``: the kinds it has (BLIP-2's language model has no cross-attention)."""
    return [(KIND_SHORT_LABELS[k], k) for k in kinds_of(block)]
#: The text blocks TraceExplorer offers for each head (the vision encoder has its own explorer).
BLOCK_OPTIONS = {head: [(BLOCK_LABELS[b], b) for b in blocks if b != VISION_ENCODER] for head, blocks in BLOCKS_OF.items()}
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
    return TraceConfig(block=block, kind=kind, window=window_for(kind, window),
                       corruption=from_name(corruption, round(float(level), 4)), samples=int(samples), seed=int(seed),
                       answer=answer, word=word, position=parse_position(position) if is_head_kind(kind) else None)


def default_gallery(head: str, count: int = 6) -> list[tuple]:
    """The explorers' gallery when none is given: easy-VQA demo questions, or for a captioner (prompt "") and
    an image-text matcher (the image's own caption as the text) easy-VQA test images with their captions."""
    from ..data import demo_samples, easy_vqa_captions

    task = heads.of(head)
    if task.reads_questions:
        return [tuple(s) for s in demo_samples()]
    return [task.gallery_entry(Image.open(path).convert("RGB"), caption)
            for path, caption in easy_vqa_captions("test")[:count]]


#: The image-side explorer paints regions on the image; vision heads (attn_head) are traced with trace() and the CLI.
VISION_KIND_OPTIONS = [(KIND_SHORT_LABELS[k], k) for k in VISION_KINDS]
#: What an image-text matcher's image-side trace can score.
MATCH_METRICS = ("prob", "itc")
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
    estimate = replace(config, method="estimate")
    if mode in ("both", "verified", "flagged") and config.window > 1:  # a window's estimate costs ~2x exact
        return [config]
    flagged = replace(estimate, grad_drop=True)
    return {"verified": [estimate, replace(config, method="verified")], "both": [estimate, config],
            "flagged": [flagged, replace(flagged, method="verified")],
            "estimate": [estimate], "exact": [config]}[mode]


def method_note(config: TraceConfig, last: bool) -> str:
    """What the status line adds for an estimated map (``last``: no exact map follows)."""
    flags = " and its flagged cells" if config.grad_drop else ""
    notes = {"verified": f" · <b>ESTIMATE</b>, its top {config.verify} cells{flags} exact (outlined)",
             "estimate": " · <b>ESTIMATE</b> (attribution patching)" + ("" if last else "; the exact map follows…")}
    return notes.get(config.method, "")


def vision_config(*, kind: str, window: int, regions: int, corruption: str, level: float, region: Any,
                  samples: int, seed: int, metric: Metric, answer: str | None = None,
                  word: int | None = None) -> TraceConfig:
    """The TraceConfig that the vision explorer's controls describe: a corruption named as in
    :data:`~blip_trace_widgets.corruption.BY_NAME` over ``region`` (None: the whole image), one sample for a
    corruption that draws nothing (blur, grey)."""
    made = from_name(corruption, round(float(level), 4), region=region)
    return TraceConfig(block=VISION_ENCODER, kind=kind, window=window_for(kind, window), regions=int(regions),
                       corruption=made, samples=int(samples) if BY_NAME[corruption].info.random else 1,
                       seed=int(seed), metric=metric, answer=answer, word=word)
