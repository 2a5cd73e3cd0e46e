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
BLOCK_LABELS = {"question_encoder": "question encoder", "answer_decoder": "answer decoder"}


def _figure(figsize: tuple[float, float]):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=100, layout="constrained")


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
        figure = _figure((2.0 + 0.45 * result.num_layers, 1.4 + 0.32 * len(result.tokens)))
        ax = figure.add_subplot()
    data = result.normalized() if normalized else result.scores
    image = ax.pcolormesh(data, cmap=KIND_COLORMAPS.get(result.kind, "viridis"), shading="flat",
                          vmin=(0.0 if normalized else None), vmax=(1.0 if normalized else None))
    ax.invert_yaxis()
    ax.set_yticks(np.arange(len(result.tokens)) + 0.5)
    ax.set_yticklabels(result.tokens)
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
