"""ROME-style heatmaps of trace results, drawn with matplotlib.

    >>> import numpy as np
    >>> from blip_trace_widgets import TraceResult
    >>> from blip_trace_widgets.plotting import heatmap_png
    >>> r = TraceResult(np.random.rand(3, 4), 0.1, 0.9, "red", ["[CLS]", "what", "[SEP]"],
    ...                 "question_encoder", "mlp", 3)
    >>> heatmap_png(r)[:4] == b"\\x89PNG"
    True

Plots read only results; they never touch a model.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from .results import METRIC_LABELS, TraceResult

KIND_COLORMAPS = {"hidden": "Purples", "mlp": "Greens", "self_attn": "Reds", "cross_attn": "Blues"}
KIND_LABELS = {"hidden": "hidden states", "mlp": "MLP outputs", "self_attn": "self-attention outputs",
               "cross_attn": "cross-attention outputs"}
BLOCK_LABELS = {"question_encoder": "question encoder", "answer_decoder": "answer decoder",
                "vision_encoder": "vision encoder"}
MAX_LABELLED_ROWS = 30


def _figure(figsize: tuple[float, float]):
    """A pyplot-free figure that a notebook shows as a PNG when it is a cell's value."""
    from matplotlib.figure import Figure

    class NotebookFigure(Figure):
        def _repr_png_(self) -> bytes:
            return figure_png(self)

    return NotebookFigure(figsize=figsize, dpi=100, layout="constrained")


def trace_title(result: TraceResult) -> str:
    window = f", window {result.window}" if result.window > 1 else ""
    sever = result.config.get("sever")
    severed = f", {KIND_LABELS[sever]} severed" if sever else ""
    return (
        f"Restoring {BLOCK_LABELS.get(result.block, result.block)} {KIND_LABELS.get(result.kind, result.kind)}"
        f"{window}{severed}\nanswer {result.answer!r}: clean {result.high_score:.3g}, corrupted {result.low_score:.3g}"
    )


def plot_trace(result: TraceResult, ax: Any = None, *, normalized: bool = False, title: str | None = None) -> Any:
    """Draw ``result`` on ``ax`` (a new figure when None): tokens down, layers across, with a colour bar."""
    if ax is None:
        figure = _figure((2.0 + 0.45 * result.num_layers, 1.4 + 0.32 * min(len(result.tokens), MAX_LABELLED_ROWS)))
        ax = figure.add_subplot()
    data = result.normalized() if normalized else result.scores
    image = ax.pcolormesh(data, cmap=KIND_COLORMAPS.get(result.kind, "viridis"), shading="flat",
                          vmin=(0.0 if normalized else None), vmax=(1.0 if normalized else None))
    ax.invert_yaxis()
    every = -(-len(result.tokens) // MAX_LABELLED_ROWS)  # many positions (image regions): label every k-th
    ax.set_yticks(np.arange(0, len(result.tokens), every) + 0.5)
    ax.set_yticklabels(result.tokens[::every])
    step = max(1, result.num_layers // 12)
    ax.set_xticks(np.arange(0, result.num_layers, step) + 0.5)
    ax.set_xticklabels([str(i) for i in range(0, result.num_layers, step)])
    ax.set_xlabel(f"layer of the {BLOCK_LABELS.get(result.block, result.block)}")
    ax.set_title(trace_title(result) if title is None else title, fontsize=9)
    colorbar = ax.figure.colorbar(image, ax=ax)
    colorbar.set_label("normalised effect" if normalized else METRIC_LABELS.get(result.metric, result.metric))
    return ax


def plot_traces(results: Sequence[TraceResult], *, normalized: bool = False, figure: Any = None) -> Any:
    """Several results side by side, one axes each (ROME's figure 1 layout); returns the figure."""
    if figure is None:
        width = sum(2.0 + 0.45 * r.num_layers for r in results)
        figure = _figure((width, 1.6 + 0.32 * max(len(r.tokens) for r in results)))
    for i, result in enumerate(results):
        plot_trace(result, ax=figure.add_subplot(1, len(results), i + 1), normalized=normalized)
    return figure


def figure_png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def heatmap_png(result: TraceResult, *, normalized: bool = False) -> bytes:
    """The heatmap of ``result`` as PNG bytes (for Image widgets and files)."""
    return figure_png(plot_trace(result, normalized=normalized).figure)


def save_heatmap(result: TraceResult, path: str, *, normalized: bool = False) -> None:
    with open(path, "wb") as handle:
        handle.write(heatmap_png(result, normalized=normalized))


# ----- sweeps: averages over many samples --------------------------------------------------

FORM_LABELS = {"normalized": "normalised indirect effect", "rome": "indirect effect (score − low)"}


def plot_average_heatmaps(table: Any, *, form: str = "normalized", correct_only: bool = False, by: str = "role",
                          configs: Sequence[int] | None = None, figure: Any = None) -> Any:
    """The paper's averaged heatmaps, one per configuration of a sweep table; returns the figure."""
    from .aggregate import average_trace

    configs = sorted(int(c) for c in table["config"].unique()) if configs is None else list(configs)
    results = [average_trace(table, config=c, form=form, correct_only=correct_only, by=by) for c in configs]
    if figure is None:
        width = sum(2.4 + 0.45 * r.num_layers for r in results)
        figure = _figure((width, 1.9 + 0.32 * max(len(r.tokens) for r in results)))
    for i, result in enumerate(results):
        ax = figure.add_subplot(1, len(results), i + 1)
        window = f", window {result.window}" if result.window > 1 else ""
        title = (f"{KIND_LABELS.get(result.kind, result.kind)}{window}\n"
                 f"{BLOCK_LABELS.get(result.block, result.block)}, {result.config['samples']} samples")
        plot_trace(result, ax=ax, normalized=False, title=title)
    return figure


def _role_lines(effects: Any, *, hue: str, form: str, roles: Sequence[str] | None, figure: Any,
                title: Any) -> Any:
    """Lines of ``effects`` (long form) against layer coloured by ``hue``, one panel per role, 95% CI bands."""
    import seaborn as sns

    from .aggregate import ROLES

    roles = [r for r in (roles or ROLES) if r in set(effects["role"])]
    if not roles:
        raise ValueError("no token roles to plot: for an image-side sweep, average with "
                         "aggregate.average_trace(table, config=...) and draw it with .plot_on_image(image=...)")
    if figure is None:
        figure = _figure((0.4 + 3.2 * len(roles), 2.8))
    axes = [figure.add_subplot(1, len(roles), i + 1) for i in range(len(roles))]
    for ax, role in zip(axes, roles):
        sns.lineplot(data=effects[effects["role"] == role], x="layer", y="effect", hue=hue,
                     errorbar=("ci", 95), seed=0, marker="o", ax=ax, legend=ax is axes[-1])
        ax.set_title(title(role), fontsize=9)
        ax.set_ylabel(FORM_LABELS[form] if ax is axes[0] else "")
        ax.axhline(0, color="0.7", linewidth=0.8)
    if axes and axes[-1].get_legend() is not None:
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1, 1), fontsize=8, title=None)
    return figure


def plot_effect_by_layer(table: Any, *, form: str = "normalized", correct_only: bool = False,
                         roles: Sequence[str] | None = None, figure: Any = None) -> Any:
    """Average indirect effect against layer, one line per kind, one panel per token role, with 95% CI bands."""
    from .aggregate import sample_effects

    effects = sample_effects(table, form=form, correct_only=correct_only)
    effects["configuration"] = [
        f"{KIND_LABELS.get(k, k)}" + (f" (w{w})" if w > 1 else "") for k, w in zip(effects["kind"], effects["window"])]
    return _role_lines(effects, hue="configuration", form=form, roles=roles, figure=figure,
                       title=lambda role: f"{role} token" + ("s" if role == "question words" else ""))


def plot_subset_comparison(tables: dict[str, Any], *, kind: str = "hidden", form: str = "normalized",
                           correct_only: bool = False, roles: Sequence[str] | None = None, figure: Any = None) -> Any:
    """One line per subset (e.g. colour, count, location) for one kind, one panel per token role."""
    import pandas as pd

    from .aggregate import sample_effects

    parts = []
    for name, table in tables.items():
        rows = table[table["kind"] == kind]
        if rows.empty:
            raise ValueError(f"the table for {name!r} has no {kind!r} traces")
        effects = sample_effects(rows, form=form, correct_only=correct_only)
        effects["subset"] = name
        parts.append(effects)
    return _role_lines(pd.concat(parts, ignore_index=True), hue="subset", form=form, roles=roles, figure=figure,
                       title=lambda role: f"{KIND_LABELS.get(kind, kind)}: {role}")


# ----- image-side traces: the effect painted on the image -----------------------------------

def _region_values(result: TraceResult, layer: int, normalized: bool) -> tuple[list, np.ndarray]:
    grid = result.config.get("grid")
    if not grid or result.block != "vision_encoder":
        raise ValueError("plot_on_image needs an image-side trace: trace(..., block='vision_encoder')")
    if not 0 <= layer < result.num_layers:
        raise ValueError(f"layer must be between 0 and {result.num_layers - 1}, got {layer}")
    values = result.normalized() if normalized else result.indirect_effect()
    return grid["boxes"], values[:, layer]


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
    values = (result.normalized() if normalized else result.indirect_effect())[1:]
    finite = values[np.isfinite(values)]
    top = float(np.abs(finite).max()) if finite.size else 1.0
    return (-top, top) if (finite < 0).any() else (0.0, top or 1.0)


def overlay_image(result: TraceResult, image: Any = None, *, layer: int, normalized: bool = True, alpha: float = 0.55,
                  cmap: str = "magma", limits: tuple[float, float] | None = None) -> Any:
    """The image with each region's effect at ``layer`` blended over it, as a PIL image of the image's size."""
    from matplotlib import colormaps
    from PIL import Image

    picture = _trace_image(result, image)
    values = effect_map(result, layer, picture.size, normalized=normalized)
    low, high = limits or _effect_limits(result, normalized)
    scaled = np.clip((values - low) / ((high - low) or 1.0), 0, 1)
    colours = colormaps[cmap](np.nan_to_num(scaled))[..., :3]
    base = np.asarray(picture, dtype=np.float64) / 255.0
    weight = np.where(np.isnan(values), 0.0, alpha)[..., None]
    blended = (1 - weight) * base + weight * colours
    return Image.fromarray(np.round(blended * 255).astype(np.uint8), "RGB")


def _trace_image(result: TraceResult, image: Any) -> Any:
    from .inputs import to_rgb_image

    image = image if image is not None else getattr(result, "image", None)
    if image is None:
        raise ValueError("this result carries no image (it was loaded from a file): pass image=...")
    return to_rgb_image(image)


def plot_on_image(result: TraceResult, image: Any = None, *, layer: int | Sequence[int] | None = None,
                  normalized: bool = True, alpha: float = 0.55, cmap: str = "magma", figure: Any = None) -> Any:
    """The effect of each image region overlaid on the image, with a colour bar; one panel per layer.

    ``layer=None`` draws every layer as small multiples on one colour scale.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    picture = _trace_image(result, image)
    layers = list(range(result.num_layers)) if layer is None else ([layer] if isinstance(layer, (int, np.integer)) else list(layer))
    limits = _effect_limits(result, normalized)
    if figure is None:
        figure = _figure((max(3.6, 0.8 + 2.2 * len(layers)), 3.1))
    axes = [figure.add_subplot(1, len(layers), i + 1) for i in range(len(layers))]
    for ax, j in zip(axes, layers):
        ax.imshow(overlay_image(result, picture, layer=j, normalized=normalized, alpha=alpha, cmap=cmap, limits=limits))
        ax.set_title(f"vision layer {j}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    cls = (result.normalized() if normalized else result.indirect_effect())[0]
    figure.suptitle(
        f"{KIND_LABELS.get(result.kind, result.kind)} restored per region"
        + (f", window {result.window}" if result.window > 1 else "")
        + f"\nanswer {result.answer!r}; restoring CLS: " + ", ".join(f"{v:.2f}" for v in cls[layers]), fontsize=8)
    bar = figure.colorbar(ScalarMappable(Normalize(*limits), colormaps[cmap]), ax=axes, shrink=0.85)
    bar.set_label("normalised effect" if normalized else "indirect effect (score − low)")
    return figure
