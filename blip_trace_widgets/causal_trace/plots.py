"""ROME-style heatmaps of trace results, drawn with matplotlib.

    >>> import numpy as np
    >>> from blip_trace_widgets import TraceResult
    >>> from blip_trace_widgets.causal_trace.plots import heatmap_png
    >>> r = TraceResult(np.random.rand(3, 4), 0.1, 0.9, "red", ["[CLS]", "what", "[SEP]"],
    ...                 "question_encoder", "mlp", 3)
    >>> heatmap_png(r)[:4] == b"\\x89PNG"
    True

Plots read only results; they never touch a model. They follow ROME's conventions: the
colour scale starts at the corrupted score, so "nothing restored" is white and colour
means recovery, and ends at the clean score (or the data's maximum, ``top="max"``, which
the colour bar then says); corrupted positions are marked ``*``; each figure says what
was corrupted, how strongly, with how many noise samples, and the total effect
(clean − corrupted). When the total effect is tiny the map is greyed out and says that it
shows noise. Normalised maps use a fixed range from −1 to 1, white at 0.
"""
from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from ..core.errors import BlipTraceError
from ..core.names import (
    AGAINST_COLORMAP,
    BLOCK_LABELS,
    KIND_COLORMAPS,
    KIND_LABELS,
    STAGE_LABELS,
    TINY_EFFECT,
    facts,
)
from ..models.heads import metric_label
from . import directions


class TraceResult(Protocol):
    """What a figure reads from a result (a :class:`~.results.TraceResult`): plots never touch a model."""

    @property
    def scores(self) -> np.ndarray: ...
    @property
    def stderr(self) -> np.ndarray | None: ...
    @property
    def low_score(self) -> float: ...
    @property
    def high_score(self) -> float: ...
    @property
    def answer(self) -> str: ...
    @property
    def tokens(self) -> list[str]: ...
    @property
    def block(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def window(self) -> int: ...
    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def metric(self) -> str: ...
    @property
    def head(self) -> str: ...
    @property
    def scored(self) -> str: ...
    @property
    def direction(self) -> str: ...
    @property
    def is_estimate(self) -> bool: ...
    @property
    def unreliable_cells(self) -> np.ndarray: ...
    @property
    def exact_cells(self) -> np.ndarray: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def total_effect(self) -> float: ...
    @property
    def floor(self) -> float: ...
    def is_tiny(self, threshold: float = TINY_EFFECT) -> bool: ...
    def negative_cells(self) -> np.ndarray: ...
    def normalized(self) -> np.ndarray: ...
    def indirect_effect(self) -> np.ndarray: ...
    def statistics(self) -> Any: ...
    def significance_text(self, q: float = ...) -> str: ...
    def stability(self, rounds: int = ..., seed: int = ...) -> dict[str, float]: ...

MAX_LABELLED_ROWS = 30
NORMALIZED_CMAP = "RdBu_r"
NEGATIVE_OVERLAY = AGAINST_COLORMAP  # effects against the trace's direction, painted on an image
TINY_TEXT = "corruption has almost no effect;\nthis map is noise"
TOPS = ("clean", "max", "range")


def new_figure(figsize: tuple[float, float]) -> Any:
    """A pyplot-free figure that a notebook shows as a PNG when it is a cell's value."""
    from matplotlib.figure import Figure

    class NotebookFigure(Figure):
        def _repr_png_(self) -> bytes:
            return figure_png(self)

    return NotebookFigure(figsize=figsize, dpi=100, layout="constrained")


def corruption_text(config: dict[str, Any]) -> str:
    """What was corrupted and how strongly, from a result's config: "gaussian scale 3 on image embeddings"."""
    info = dict(config.get("corruption") or {})
    kind = str(info.pop("type", "custom"))
    info.pop("repr", None)
    region = info.pop("region", None)
    levels = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
    stage = STAGE_LABELS.get(str(config.get("corrupt", "")), "")
    text = kind + (f" {levels}" if levels else "") + (f" on {stage}" if stage else "")
    return text + (" (in a region)" if region else "")


def method_text(result: TraceResult) -> str:
    """"exact", or "ESTIMATE (attribution patching, k steps), not patched runs" for an estimate."""
    if not result.is_estimate:
        return "exact"
    steps = int(result.config.get("steps") or 1)
    how = f"ESTIMATE (attribution patching, {steps} step{'s' if steps != 1 else ''})"
    if int(result.config.get("order") or 1) == 2:
        how = how.replace("patching, ", "patching, second order, ")
        flagged = int(result.unreliable_cells.sum())
        how += f", {flagged} cell{'s' if flagged != 1 else ''} flagged unreliable (hatched)" if flagged else ""
    if result.config.get("method") == "verified":
        count = int(result.exact_cells.sum())
        return how + f", {count} cell{'s' if count != 1 else ''} exact (outlined)"
    return how + ", not patched runs"


def trace_title(result: TraceResult, width: int = 70) -> str:
    """What a heatmap shows, what was done, and the total effect, wrapped to ``width`` characters."""
    config = result.config
    window = f", window {result.window}" if result.window > 1 else ""
    sever = config.get("sever")
    severed = f", {KIND_LABELS.get(sever, sever)} severed" if sever else ""
    samples = config.get("samples")
    fresh = ", fresh per cell" if config.get("fresh_noise") else ""
    how = corruption_text(config) + (f", {samples} noise sample{'s' if samples != 1 else ''}{fresh}" if samples else "")
    what = directions.of(result.direction).what(BLOCK_LABELS.get(result.block, result.block),
                                                 KIND_LABELS.get(result.kind, result.kind))
    if "restored_labels" in config:  # a head map: where its heads are restored
        labels = list(config["restored_labels"])
        what += (" at every position" if config.get("position") is None
                 else " at " + ", ".join(repr(label) for label in labels[:6]) + (" …" if len(labels) > 6 else ""))
    if result.is_estimate:
        what = method_text(result) + ": " + what
    contrast = config.get("contrast_answer")
    against = f" against {contrast!r}" if contrast and result.metric == "logit_diff" else ""
    against += " (the counterfactual's answer)" if against and config.get("counterfactual_answer") else ""
    scores = (f"{result.scored}{against}: clean {result.high_score:.3g}, corrupted {result.low_score:.3g}, "
              f"total effect {result.total_effect:.3g}")
    if "questions" in config:  # an average: each question normalised by its own scores, or ROME's avg effect
        mean_total = float(config.get("total_effect", result.total_effect))
        scores = (f"{result.scored}: " + ("each question's effect over its own total effect (its corrupted 0, its "
                  "clean 1)" if config.get("form") == "normalized" else "avg(score) − avg(corrupted)")
                  + f"; mean total effect {mean_total:.3g}")
    negative = negative_text(result)
    scores += f"; {negative}" if negative else ""
    lines = [what + window + severed, how, scores] if config.get("corruption") else [what + window + severed, scores]
    lines.append(trust_text(result))
    return "\n".join(textwrap.fill(line, width) for line in lines)


def trust_text(result: TraceResult) -> str:
    """What a map's cells can be trusted for: how many are significant, and how stable its top cell is over
    resampled draws ("top cell stable in 97% of resamples")."""
    text = result.significance_text()
    stable = result.stability()
    if stable["rounds"] and not result.config.get("deterministic"):
        text += f"; top cell stable in {stable['top']:.0%} of resamples, top 3 in {stable['top3']:.0%}"
    return text


def _row_ticks(result: TraceResult) -> tuple[list[int], list[str]]:
    """Where a heatmap's rows are labelled: every row when they fit; an image's regions by grid row ("row 3:
    c0–7"), every row of the grid labelled at its first region, so no part of the image goes unnamed; else
    every k-th row."""
    labels = _labels(result)
    side = int((result.config.get("grid") or {}).get("regions_per_side") or 0)
    if len(labels) > MAX_LABELLED_ROWS and side and len(labels) == side * side + 1:
        ticks = [0, *range(1, len(labels), side)]
        return ticks, [labels[0], *(f"row {r}: c0–{side - 1}" for r in range(side))]
    every = -(-len(labels) // MAX_LABELLED_ROWS)  # many positions: label every k-th
    ticks = list(range(0, len(labels), every))
    return ticks, [labels[i] for i in ticks]


def _labels(result: TraceResult) -> list[str]:
    corrupted = set(result.config.get("corrupted_positions") or [])
    return [f"{t}*" if i in corrupted else t for i, t in enumerate(result.tokens)]


def _scale(result: TraceResult, data: np.ndarray, top: str) -> tuple[float, float, str]:
    """(white, full, colour-bar label) in the metric's units by ROME's convention: white where nothing is patched
    (the corrupted score when restoring, the clean one when noising), full colour at the other end, whichever
    way that is (a corruption that raised the score runs downward). ``top="max"`` ends at the data's furthest
    value instead, ``"range"`` (averages) spans the data's own range. The span is never under the metric's floor
    (:attr:`~.results.TraceResult.floor`), so that float noise is never drawn in full colour."""
    if top not in TOPS:
        raise BlipTraceError(f"top must be one of {', '.join(TOPS)}, got {top!r}")
    label = metric_label(result.metric, result.head)
    finite = data[np.isfinite(data)]
    floor = result.floor
    if top == "range" and finite.size:  # averages: their real range
        white, full = float(finite.min()), float(finite.max())
        if full - white < floor:
            return white, white + floor, label + f" (the data's range, widened to the floor {floor:g})"
        return white, (full if full > white else white + 1e-9), label + " (the data's range)"
    direction = directions.of(result.direction)
    scores = {"clean": result.high_score, "corrupted": result.low_score}
    white, full = scores[direction.ends[0]], scores[direction.ends[1]]
    ends = direction.ends
    if top == "max" and finite.size:
        way = 1.0 if full >= white else -1.0
        full = white + way * float(np.max((finite - white) * way))
        ends = ends[0], "the furthest cell"
    label += f" (white at {ends[0]}, full colour at {ends[1]})"
    if abs(full - white) < floor:  # widened away from where nothing is patched, which stays white
        way = (1.0 if full >= white else -1.0) if full != white else (1.0 if direction.restores else -1.0)
        full = white + way * floor
        label += f"; widened to the floor {floor:g}"
    return white, full, label


def negative_text(result: TraceResult) -> str:
    """"N cells below the corrupted score" when restoring some cells pushes the score further from the
    clean one than noise does; else empty."""
    count = int(result.negative_cells().sum())
    if not count:
        return ""
    where = directions.of(result.direction).beyond(raised=result.total_effect < 0)
    return f"{count} cell{'s' if count != 1 else ''} {where}"


def oriented_colormap(toward: str, white: float, full: float, against: float) -> tuple[Any, Any]:
    """A colour map and norm over the scores from ``white`` (nothing patched: white) to ``full`` (full colour of
    ``toward``), reaching ``against`` past ``white`` the other way in :data:`~.names.AGAINST_COLORMAP` blue, at the
    same depth per unit on both sides. The range ends where the data and baselines end, never past them."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap, Normalize

    way = 1.0 if full >= white else -1.0
    span = abs(full - white) or 1e-9
    low, high = sorted((white - way * against, full))
    values = (np.linspace(low, high, 256) - white) * way  # > 0 toward the full end, < 0 against it
    colours = np.where((values >= 0)[:, None], colormaps[toward](np.clip(values / span, 0, 1)),
                       colormaps[AGAINST_COLORMAP](np.clip(-values / span, 0, 1)))
    return ListedColormap(colours, name=toward), Normalize(low, high if high > low else low + 1e-9)


def _mesh_spec(result: TraceResult, normalized: bool, top: str, flagged: bool,
               limits: tuple[float, float, float] | None = None) -> tuple[Any, Any, float, str]:
    """(colour map, norm, alpha, colour-bar label) of a heatmap's scores, by the conventions above."""
    from matplotlib.colors import Normalize

    alpha = 0.35 if flagged else 1.0
    if normalized:
        return ("Greys" if flagged else NORMALIZED_CMAP, Normalize(-1.0, 1.0), alpha,
                "normalised effect (fixed range −1 to 1; toward clean in red, against it in blue)")
    data = result.scores
    white, full, bar_label = _scale(result, data, top)
    way = 1.0 if full >= white else -1.0
    finite = data[np.isfinite(data)]
    against = max(0.0, float(np.max((white - finite) * way))) if finite.size and not flagged and top != "range" else 0.0
    if limits is not None:  # shared by several panels
        white, full, against = limits
    cmap, norm = oriented_colormap("Greys" if flagged else KIND_COLORMAPS.get(result.kind, "Purples"), white, full,
                                   against)
    return cmap, norm, alpha, bar_label + ("; against it in blue" if against > 0 else "")


def _score_mesh(ax: Any, result: TraceResult, normalized: bool, top: str, flagged: bool,
                limits: tuple[float, float, float] | None = None) -> tuple[Any, str]:
    """The scores' colour mesh on ``ax`` and its colour-bar label."""
    cmap, norm, alpha, label = _mesh_spec(result, normalized, top, flagged, limits)
    data = result.normalized() if normalized else result.scores
    return ax.pcolormesh(data, cmap=cmap, norm=norm, shading="flat", alpha=alpha), label


def _mark_insignificant(ax: Any, result: TraceResult) -> None:
    """Hatch and fade the tested cells that are not significant: noise is never drawn in full colour."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    stats = result.statistics()
    if stats.deterministic:
        return
    noise = stats.tested() & ~stats.significant()
    boxes = [Rectangle((layer, row), 1, 1) for row, layer in np.argwhere(noise)]
    if boxes:
        ax.add_collection(PatchCollection(boxes, facecolor=(1, 1, 1, 0.6), edgecolor=(0.55, 0.55, 0.55, 0.8),
                                          hatch="///", linewidth=0.0, zorder=2))


def _mark_cells(ax: Any, result: TraceResult) -> None:
    """Outline a verified estimate's exact cells; grey and hatch the cells an order-2 estimate flags."""
    from matplotlib.patches import Rectangle

    if result.config.get("method") == "verified":
        for row, layer in np.argwhere(result.exact_cells):
            ax.add_patch(Rectangle((layer, row), 1, 1, fill=False, edgecolor="black", linewidth=1.2))
    for row, layer in np.argwhere(result.unreliable_cells):  # flagged: greyed and hatched
        ax.add_patch(Rectangle((layer, row), 1, 1, facecolor=(0.6, 0.6, 0.6, 0.6), edgecolor="#555",
                               hatch="//", linewidth=0.5))


def _mark_absent(ax: Any, result: TraceResult) -> None:
    """Cover the layers that lack the restored sublayer: white, cross-hatched and marked "n/a", never a zero effect."""
    from matplotlib.patches import Rectangle

    rows, layers = result.scores.shape
    style: dict[str, Any] = {"facecolor": "white", "edgecolor": "#999", "hatch": "xx", "linewidth": 0.5, "zorder": 3}
    label: dict[str, Any] = {"ha": "center", "va": "center", "fontsize": 8, "color": "#555", "zorder": 4,
             "bbox": {"facecolor": "white", "edgecolor": "none", "pad": 1}}
    for layer in result.config.get("absent_layers", []):
        ax.add_patch(Rectangle((int(layer), 0), 1, rows, **style))
        ax.text(int(layer) + 0.5, rows / 2, "n/a", rotation=90, **label)
    for row in result.config.get("absent_positions", []):  # InstructBLIP's instruction: no cross-attention
        ax.add_patch(Rectangle((0, int(row)), layers, 1, **style))
        ax.text(layers / 2, int(row) + 0.5, "n/a", **label)


def plot_trace(result: TraceResult, ax: Any = None, *, normalized: bool = False, title: str | None = None,
               show: str = "scores", top: str = "clean", tiny: float | None = TINY_EFFECT, cax: Any = None,
               limits: tuple[float, float, float] | None = None) -> Any:
    """Draw ``result`` on ``ax`` (a new figure when None): tokens down, layers across, with a colour bar.

    ``show="stderr"`` draws each cell's standard error over noise samples. ``tiny`` is the
    total effect, as a fraction of the clean score, below which the map is greyed and flagged
    (None: never). ``top`` ends the colour scale at the clean score, the data's maximum, or
    (``"range"``, for averages) spans the data's own range. ``cax`` takes the colour bar (by
    default it is carved out of ``ax``). ``limits``: (white, full, against) shared by several panels. Tested cells
    that are not significant (:meth:`~.results.TraceResult.significant`) are faded and hatched.
    """
    if ax is None:
        rows = min(len(result.tokens), MAX_LABELLED_ROWS)
        ax = new_figure((max(6.4, 2.4 + 0.45 * result.num_layers), 2.1 + 0.3 * rows)).add_subplot()
        ax._repr_png_ = lambda: figure_png(ax.figure)  # as a notebook cell's value, the axes show their figure
    flagged = tiny is not None and result.is_tiny(tiny)
    if show == "stderr":
        data = result.stderr if result.stderr is not None else np.full_like(result.scores, np.nan)
        image = ax.pcolormesh(data, cmap="Greys", shading="flat", vmin=0.0)
        bar_label = f"standard error of {metric_label(result.metric, result.head)} over noise samples"
    elif show == "scores":
        image, bar_label = _score_mesh(ax, result, normalized, top, flagged, limits)
    else:
        raise BlipTraceError(f"show must be 'scores' or 'stderr', got {show!r}")
    if show == "scores" and not flagged:
        _mark_insignificant(ax, result)
    if show == "scores" and result.is_estimate:
        _mark_cells(ax, result)
    _mark_absent(ax, result)
    ax.invert_yaxis()
    ticks, labels = _row_ticks(result)
    ax.set_yticks(np.asarray(ticks) + 0.5)
    ax.set_yticklabels(labels)
    step = max(1, result.num_layers // 12)
    ax.set_xticks(np.arange(0, result.num_layers, step) + 0.5)
    ax.set_xticklabels([str(i) for i in range(0, result.num_layers, step)])
    absent = result.config.get("absent_layers", [])
    ax.set_xlabel(f"layer of the {BLOCK_LABELS.get(result.block, result.block)}"
                  + (f" (centre of {result.window} restored)" if result.window > 1 else "")
                  + (f"; n/a: layer{'s' if len(absent) > 1 else ''} {', '.join(map(str, absent))} have no "
                     f"{'cross-attention' if 'cross' in result.kind else result.kind}" if absent else ""))
    ax.set_title(trace_title(result) if title is None else title, fontsize=8, loc="left")
    if flagged and show == "scores":
        below = result.metric == "prob" and abs(result.high_score) < result.floor
        ax.text(0.5, 0.5, TINY_TEXT + ("\n(the clean score is below the floor)" if below else ""),
                transform=ax.transAxes, ha="center", va="center", fontsize=10, color="#a00",
                bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "#a00"})
    colorbar = ax.figure.colorbar(image, ax=ax) if cax is None else ax.figure.colorbar(image, cax=cax)
    colorbar.set_label(textwrap.fill(bar_label, 34), fontsize=8)
    return ax


def plot_traces(results: Sequence[TraceResult], *, normalized: bool = False, figure: Any = None,
                shared_scale: bool = True) -> Any:
    """Several results side by side, one axes each (ROME's figure 1 layout); returns the figure.

    With ``shared_scale`` every panel's colour scale runs from the lowest corrupted score to
    the highest clean score among them, so colours compare across panels.
    """
    results = list(results)
    if figure is None:
        width = sum(max(3.6, 2.2 + 0.4 * r.num_layers) for r in results)
        figure = new_figure((width, 2.4 + 0.3 * max(min(len(r.tokens), MAX_LABELLED_ROWS) for r in results)))
    limits = _shared_limits(results) if shared_scale and not normalized else None
    for i, result in enumerate(results):
        ax = figure.add_subplot(1, len(results), i + 1)
        shared = limits if limits is not None and not result.is_tiny() else None
        plot_trace(result, ax=ax, normalized=normalized, title=trace_title(result, width=42), limits=shared)
    return figure


def _shared_limits(results: Sequence[TraceResult]) -> tuple[float, float, float] | None:
    """One (white, full, against) for panels that run the same way: from the lowest white to the furthest full
    end; None when their directions differ (each keeps its own scale)."""
    scales = [_scale(r, r.scores, "clean")[:2] for r in results if not r.is_tiny()]
    ways = {full >= white for white, full in scales}
    if not scales or len(ways) != 1:
        return None
    up = ways.pop()
    way = 1.0 if up else -1.0
    whites, fulls = [w for w, _ in scales], [f for _, f in scales]
    white, full = (min(whites), max(fulls)) if up else (max(whites), min(fulls))
    against = max([0.0] + [float(np.nanmax((white - r.scores) * way)) for r in results if not r.is_tiny()])
    return white, full, against


def figure_png(figure: Any) -> bytes:
    """The figure as PNG bytes at its own dpi: drawn once by Agg (``savefig`` draws it twice)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    buffer = io.BytesIO()
    Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).save(buffer, format="png")
    return buffer.getvalue()


class HeatmapRenderer:
    """PNGs of successive heatmaps, laying a figure out once per shape: a redraw of the same question
    with other settings reuses the axes' positions instead of running matplotlib's layout again
    (about half of a demo heatmap's drawing time). A layout is reused only when every text that
    sizes it (tokens, title lines, colour-bar ticks) is the same, so the pixels are those of
    :func:`heatmap_png`."""

    def __init__(self, size: int = 16) -> None:
        from ..core.cache import LRU

        # per shape: the axes' and colour bar's positions, the figure size, and the colour bar's tick labels
        self._layouts: LRU[tuple[Any, Any, tuple[float, float], tuple[str, ...]]] = LRU(size)
        self.layouts = 0  # figures laid out in full; the others reused a layout

    @staticmethod
    def _key_of(result: TraceResult, show: str, normalized: bool) -> tuple[Any, ...]:
        return (tuple(_labels(result)), result.num_layers, result.window > 1, result.block, show, normalized,
                trace_title(result).count("\n"), bool(result.is_tiny()), result.kind, result.metric,
                _mesh_spec(result, normalized, "clean", bool(result.is_tiny()))[3])

    @staticmethod
    def _tick_labels(cax: Any) -> tuple[str, ...]:
        low, high = sorted(cax.get_ylim())
        ticks = [t for t in cax.get_yticks() if low <= t <= high]
        formatter = cax.yaxis.get_major_formatter()
        formatter.set_locs(ticks)
        return tuple(formatter(t) for t in ticks)

    def png(self, result: TraceResult, *, normalized: bool = False, show: str = "scores") -> bytes:
        key = self._key_of(result, show, normalized)
        layout = self._layouts.get(key)
        if layout is not None:
            ax_box, cax_box, size, ticks = layout
            figure = new_figure(size)
            figure.set_layout_engine("none")
            ax, cax = figure.add_axes(ax_box), figure.add_axes(cax_box)
            plot_trace(result, ax=ax, normalized=normalized, show=show, cax=cax)
            if self._tick_labels(cax) == ticks:
                return figure_png(figure)
        ax = plot_trace(result, normalized=normalized, show=show)
        png = figure_png(ax.figure)  # lays the figure out
        self.layouts += 1
        cax = ax.figure.axes[-1]
        self._layouts.put(key, (ax.get_position(), cax.get_position(), tuple(ax.figure.get_size_inches()),
                                self._tick_labels(cax)))
        return png


def heatmap_png(result: TraceResult, *, normalized: bool = False, show: str = "scores") -> bytes:
    """The heatmap of ``result`` as PNG bytes (for Image widgets and files)."""
    return figure_png(plot_trace(result, normalized=normalized, show=show).figure)


def save_heatmap(result: TraceResult, path: str, *, normalized: bool = False) -> None:
    with open(path, "wb") as handle:
        handle.write(heatmap_png(result, normalized=normalized))


# ----- image-side traces: the effect painted on the image -----------------------------------

def _region_values(result: TraceResult, layer: int, normalized: bool) -> tuple[list, np.ndarray]:
    grid = result.config.get("grid")
    if not grid or not facts(result.block).image_side:
        raise BlipTraceError("plot_on_image needs an image-side trace: trace(..., block='vision_encoder')")
    if not 0 <= layer < result.num_layers:
        raise BlipTraceError(f"layer must be between 0 and {result.num_layers - 1}, got {layer}")
    values = result.normalized() if normalized else toward_clean(result)
    return grid["boxes"], values[:, layer]


def toward_clean(result: TraceResult) -> np.ndarray:
    """Each cell's indirect effect measured toward the clean score: positive when it brings the clean score back
    (restoring) or takes it away (noising), whichever way the total effect runs; negative against it."""
    return result.indirect_effect() * (1.0 if result.total_effect >= 0 else -1.0)


def effect_map(result: TraceResult, layer: int, size: tuple[int, int], *, normalized: bool = True) -> np.ndarray:
    """The effect of each region at ``layer`` as an array of ``size`` (width, height); NaN where no region is."""
    boxes, values = _region_values(result, layer, normalized)
    width, height = size
    out = np.full((height, width), np.nan)
    for box, value in zip(boxes, values):
        if box is None:
            continue
        left, top, right, bottom = box
        out[round(top * height):round(bottom * height), round(left * width):round(right * width)] = value
    return out


def _effect_limits(result: TraceResult, normalized: bool) -> tuple[float, float]:
    """One range for every layer of a figure: from 0 (transparent) to the largest effect, and down to the most
    negative effect when some region falls below the corrupted score by more than noise."""
    values = (result.normalized() if normalized else toward_clean(result))[1:]
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size else 0.0
    negative = result.negative_cells()[1:] & np.isfinite(values)
    bottom = min(0.0, float(values[negative].min())) if negative.any() else 0.0
    return bottom, (top if top > 0 else 1.0)


def _corrupted_box(result: TraceResult) -> Any:
    """The box (left, top, right, bottom) the corruption touched, and whether only outside it, or None."""
    region = (result.config.get("corruption") or {}).get("region")
    if not isinstance(region, dict):
        return None
    outside = isinstance(region.get("outside"), dict)
    inner = region["outside"] if outside else region
    return (inner["box"], outside) if "box" in inner else None


def overlay_image(result: TraceResult, image: Any = None, *, layer: int, normalized: bool = True, alpha: float = 0.85,
                  cmap: str = "YlOrRd", limits: tuple[float, float] | None = None) -> Any:
    """Each region's effect at ``layer`` over a faint greyscale copy of the image, as a PIL RGB image.

    No effect is transparent; the colour grows with the effect up to the top of ``limits``. A negative
    effect (below the corrupted score), when ``limits`` reach below 0, is painted in blue, growing down to
    the bottom of ``limits``; otherwise it is transparent.
    """
    from matplotlib import colormaps
    from PIL import Image

    picture = _trace_image(result, image)
    values = effect_map(result, layer, picture.size, normalized=normalized)
    low, high = limits or _effect_limits(result, normalized)
    finite = np.where(np.isnan(values), 0.0, values)
    up = np.clip(finite / (high or 1.0), 0, 1)
    down = np.clip(finite / low, 0, 1) if low < 0 else np.zeros_like(finite)
    colours = np.where((down > 0)[..., None], colormaps[NEGATIVE_OVERLAY](0.25 + 0.75 * down)[..., :3],
                       colormaps[cmap](0.25 + 0.75 * up)[..., :3])
    grey = np.asarray(picture.convert("L"), dtype=np.float64)[..., None] / 255.0
    base = 0.55 + 0.45 * grey  # faint: the picture stays recognisable under the colour
    weight = (alpha * np.maximum(up, down))[..., None]
    blended = (1 - weight) * base + weight * colours
    return Image.fromarray(np.round(np.clip(blended, 0, 1) * 255).astype(np.uint8), "RGB")


def attention_overlay(image: Any, weights: np.ndarray, *, alpha: float = 0.85, cmap: str = "YlOrRd") -> Any:
    """Attention weights over image tokens [1 + g*g] (CLS first, then the patches row by row) painted on
    ``image``, as a PIL RGB image: the colour grows with the weight, up to the largest patch weight."""
    from matplotlib import colormaps
    from PIL import Image

    from ..core.inputs import to_rgb_image
    from ..core.regions import patch_grid_size

    picture = to_rgb_image(image)
    side = patch_grid_size(len(weights))
    grid = np.asarray(weights[1:], dtype=np.float64).reshape(side, side)
    scaled = grid / grid.max() if grid.max() > 0 else grid
    width, height = picture.size
    rows = np.minimum((np.arange(height) * side) // height, side - 1)
    cols = np.minimum((np.arange(width) * side) // width, side - 1)
    values = scaled[rows][:, cols]
    colours = colormaps[cmap](0.25 + 0.75 * values)[..., :3]
    grey = np.asarray(picture.convert("L"), dtype=np.float64)[..., None] / 255.0
    weight = (alpha * values)[..., None]
    blended = (1 - weight) * (0.55 + 0.45 * grey) + weight * colours
    return Image.fromarray(np.round(np.clip(blended, 0, 1) * 255).astype(np.uint8), "RGB")


def _trace_image(result: TraceResult, image: Any) -> Any:
    from ..core.inputs import to_rgb_image

    image = image if image is not None else getattr(result, "image", None)
    if image is None:
        raise BlipTraceError("this result carries no image (it was loaded from a file): pass image=...")
    return to_rgb_image(image)


def plot_on_image(result: TraceResult, image: Any = None, *, layer: int | Sequence[int] | None = None,
                  normalized: bool = True, alpha: float = 0.85, cmap: str = "YlOrRd", figure: Any = None) -> Any:
    """The effect of each image region over the image, one panel per layer, on one colour scale.

    ``layer=None`` draws every layer as small multiples. The corrupted box, when there is
    one, is outlined (dashed when only the area outside it was corrupted).
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LinearSegmentedColormap, Normalize
    from matplotlib.patches import Rectangle

    picture = _trace_image(result, image)
    if layer is None:
        layers = list(range(result.num_layers))
    else:
        layers = [int(layer)] if isinstance(layer, (int, np.integer)) else list(layer)
    limits = _effect_limits(result, normalized)
    if figure is None:
        figure = new_figure((max(6.4, 0.8 + 2.2 * len(layers)), 3.4))
    axes = [figure.add_subplot(1, len(layers), i + 1) for i in range(len(layers))]
    box = _corrupted_box(result)
    width, height = picture.size
    for ax, j in zip(axes, layers):
        ax.imshow(overlay_image(result, picture, layer=j, normalized=normalized, alpha=alpha, cmap=cmap, limits=limits))
        if box is not None and box[0] is not None:
            left, top, right, bottom = box[0]
            ax.add_patch(Rectangle((left * width, top * height), (right - left) * width, (bottom - top) * height,
                                   fill=False, edgecolor="#1f4e9e", linewidth=1.5, linestyle="--" if box[1] else "-"))
        ax.set_title(f"vision layer {j}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    cls = (result.normalized() if normalized else toward_clean(result))[0]
    negatives = negative_text(result)
    flag = "  [corruption has almost no effect; this map is noise]" if result.is_tiny() else ""
    figure.suptitle(
        textwrap.fill(("" if not result.is_estimate else method_text(result) + ": ")
                      + f"{KIND_LABELS.get(result.kind, result.kind)} restored per region"
                      + (f", window {result.window}" if result.window > 1 else "")
                      + f"; {corruption_text(result.config)}, {result.config.get('samples', '?')} noise samples", 90)
        + f"\n{result.scored}: clean {result.high_score:.3g}, corrupted {result.low_score:.3g}, total effect "
        f"{result.total_effect:.3g}; restoring CLS: " + ", ".join(f"{v:.2f}" for v in cls[layers]) + flag
        + (f"\n{negatives} (blue)" if negatives else ""), fontsize=8)
    shown = colormaps[cmap]
    positive = [(0.9, 0.9, 0.9), *shown(np.linspace(0.25, 1.0, 8))[:, :3]]
    if limits[0] < 0:  # negative effects in blue, below a transparent 0
        from matplotlib.colors import TwoSlopeNorm

        negative = colormaps[NEGATIVE_OVERLAY](np.linspace(1.0, 0.25, 8))[:, :3]
        bar_map = LinearSegmentedColormap.from_list("effect", [*negative, *positive])
        norm: Any = TwoSlopeNorm(vcenter=0.0, vmin=limits[0], vmax=limits[1])
    else:
        bar_map, norm = LinearSegmentedColormap.from_list("effect", positive), Normalize(*limits)
    bar = figure.colorbar(ScalarMappable(norm, bar_map), ax=axes, shrink=0.85)
    what = "normalised effect" if normalized else "indirect effect toward the clean score"
    bar.set_label(textwrap.fill(what + " (0 is transparent)" + ("; against it in blue" if limits[0] < 0 else ""), 40),
                  fontsize=8)
    return figure
