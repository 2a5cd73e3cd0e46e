"""Figures of circuits: the layered graph of the top edges beside the faithfulness curve.

    >>> import numpy as np
    >>> from blip_trace_widgets import load_model
    >>> from blip_trace_widgets.circuits.graph import circuit_graph
    >>> from blip_trace_widgets.circuits.result import EdgeResult
    >>> graph = circuit_graph(load_model("demo"))
    >>> scores = np.linspace(-1, 1, len(graph))
    >>> result = EdgeResult(graph.edges, scores, np.zeros(len(graph)), corruption={"name": "gaussian", "level": 10.0})
    >>> figure = plot_circuit(result, k=20)
    >>> len(figure.axes), figure.axes[0].get_title().startswith("EAP, noise")
    (1, True)

Layers run left to right: the image, then the question encoder (its embedding, then per layer its self-attention
heads, cross-attention heads and MLP), then the answer decoder and ``out``, each block on a band of its own. An
edge's width follows |score|; positive edges (the metric rises when the edge is patched) and negative ones take two
colours. A receiver's q, k and v channels meet its node a little above, at and below its centre. BLIP-2's and
InstructBLIP's graphs are drawn on three bands: the ViT image input, the Q-Former (per layer its self heads, its
cross heads where it cross-attends, its MLP) and the language model; with a T5 language model on four: the ViT
image input, the Q-Former, the T5 encoder and the T5 decoder (per layer its self heads, cross heads and MLP).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..causal_trace.plots import figure_png, new_figure
from .faithfulness import Curve
from .graph import QueryShape, Shape, T5Shape, shape_from_dict
from .names import (
    BANDS,
    CROSS,
    DEC,
    DEFAULT_TOP,
    ENC,
    IMAGE,
    LM,
    OUT,
    QE,
    QF,
    QUERY_BANDS,
    SELF,
    T5_BANDS,
    emb_name,
    split_edge,
)
from .result import EdgeResult

POSITIVE, NEGATIVE, MUTED = "#2166ac", "#b2182b", "#a0a0a0"
BAND_COLOURS = {IMAGE: "#f2f2f2", QE: "#e8f0fa", DEC: "#fbeee6", QF: "#e8f0fa", LM: "#fbeee6", ENC: "#eef6e8"}
#: The bands' labels per BLIP-2 / InstructBLIP graph shape.
QUERY_BAND_LABELS: dict[type, dict[str, str]] = {QueryShape: QUERY_BANDS, T5Shape: T5_BANDS}
CHANNEL_OFFSET = {"q": -0.25, "k": 0.0, "v": 0.25}


def node_position(name: str, shape: Shape) -> tuple[float, float]:
    """(column, row) of a node in the drawing."""
    middle = (shape.heads - 1) / 2
    if name == IMAGE:
        return 0.0, middle
    if name == OUT:
        return 2.0 + 3 * shape.qe_layers + 1 + 3 * shape.dec_layers, middle
    block, rest = name.split(".", 1)
    start = 1.0 if block == QE else 2.0 + 3 * shape.qe_layers
    if rest == "emb":
        return start, middle
    layer_text, unit = rest.split(".")
    column = start + 1 + 3 * int(layer_text[1:])
    if unit == "mlp":
        return column + 2, middle
    return column + (0 if unit[0] == SELF else 1), float(unit[1:])


def query_columns(shape: QueryShape | T5Shape) -> dict[str, float]:
    """BLIP-2's columns: ``img``, the Q-Former (its embedding; per layer its self heads, cross heads where it
    cross-attends, MLP), the language model (its embedding; per layer its heads, MLP), ``out``; with T5 the
    encoder's, then the decoder's (per layer its self heads, cross heads, MLP)."""
    columns: dict[str, float] = {IMAGE: 0.0}
    column = 1.0
    for block in shape.blocks:
        for name in shape.slot_names(block):
            unit = name.rsplit(".", 1)[-1]
            key = name if unit in ("emb", "mlp") else f"{name.rsplit('.', 1)[0]}.{unit[0]}"
            if key not in columns:
                columns[key] = column
                column += 1.0
        column += 0.5
    columns[OUT] = column - 0.5
    return columns


def query_position(name: str, shape: QueryShape | T5Shape) -> tuple[float, float]:
    """(column, row) of a BLIP-2 node in the drawing."""
    middle = (shape.heads - 1) / 2
    columns = query_columns(shape)
    if name in columns:
        return columns[name], middle
    head, unit = name.rsplit(".", 1)
    return columns[f"{head}.{unit[0]}"], float(unit[1:])


def _position(name: str, shape: Any) -> tuple[float, float]:
    return query_position(name, shape) if isinstance(shape, (QueryShape, T5Shape)) else node_position(name, shape)


def _receiver_position(channel: str, shape: Any) -> tuple[float, float]:
    parts = channel.rsplit(".", 1)
    if len(parts) == 2 and parts[1] in CHANNEL_OFFSET:
        x, y = _position(parts[0], shape)
        return x - 0.12, y + CHANNEL_OFFSET[parts[1]] * 0.6
    return _position(channel, shape)


def _draw_query_bands(ax: Any, shape: QueryShape | T5Shape) -> float:
    """BLIP-2's bands (the ViT's output, the Q-Former, the language model; with T5 its encoder and decoder); the
    drawing's right edge."""
    columns = query_columns(shape)
    edges = [-0.5, 0.5, *(columns[emb_name(b)] - 0.75 for b in shape.blocks[1:]), columns[OUT] + 0.5]
    labels = QUERY_BAND_LABELS[type(shape)]
    for n, block in enumerate((IMAGE, *shape.blocks)):
        left, right = edges[n], edges[n + 1]
        ax.axvspan(left, right, color=BAND_COLOURS[block], zorder=0)
        ax.text((left + right) / 2, shape.heads - 0.3, labels[block], ha="center", va="bottom", fontsize=8,
                rotation=90 if block == IMAGE else 0)
    return columns[OUT] + 0.5


def _draw_bands(ax: Any, shape: Shape) -> None:
    edges = {IMAGE: (-0.5, 0.5), QE: (0.5, 1.5 + 3 * shape.qe_layers),
             DEC: (1.5 + 3 * shape.qe_layers, 3.5 + 3 * (shape.qe_layers + shape.dec_layers))}
    for block, (left, right) in edges.items():
        ax.axvspan(left, right, color=BAND_COLOURS[block], zorder=0)
        ax.text((left + right) / 2, shape.heads - 0.3, BANDS[block], ha="center", va="bottom", fontsize=8,
                rotation=90 if block == IMAGE else 0)


def draw_graph(ax: Any, result: EdgeResult, k: int = DEFAULT_TOP, *, muted: np.ndarray | None = None,
               title: str | None = None) -> None:
    """The top ``k`` edges of ``result`` on ``ax``; edges where ``muted`` (bool per edge) is set grey and dashed."""
    shape = shape_from_dict(result.shape) if result.shape else _shape_of_edges(result.edges)
    if isinstance(shape, (QueryShape, T5Shape)):
        right = _draw_query_bands(ax, shape)
    else:
        _draw_bands(ax, shape)
        right = 3.5 + 3 * (shape.qe_layers + shape.dec_layers)
    chosen = result.order()[:k]
    biggest = float(np.nanmax(np.abs(result.scores[chosen]))) if len(chosen) else 1.0
    nodes: set[str] = set()
    for i in chosen[::-1]:
        sender, receiver = split_edge(result.edges[i])
        (x0, y0), (x1, y1) = _position(sender, shape), _receiver_position(receiver, shape)
        value = float(result.scores[i])
        width = 0.4 + 3.6 * abs(value) / (biggest or 1.0)
        grey = muted is not None and bool(muted[i])
        ax.plot([x0, x1], [y0, y1], color=MUTED if grey else POSITIVE if value > 0 else NEGATIVE, lw=width,
                alpha=0.7, zorder=2, ls="--" if grey else "-")
        nodes.update([sender, receiver.rsplit(".", 1)[0] if receiver.endswith((".q", ".k", ".v")) else receiver])
    for name in nodes:
        x, y = _position(name, shape)
        ax.scatter([x], [y], s=30, color="black", zorder=3)
        ax.annotate(name.split(".", 1)[-1] if name not in (IMAGE, OUT) else name, (x, y), fontsize=6,
                    xytext=(2, 3), textcoords="offset points", zorder=4)
    ax.set_xlim(-0.5, right)
    ax.set_ylim(-0.8, shape.heads + 0.2)
    ax.set_yticks(range(shape.heads), [f"head {h}" for h in range(shape.heads)], fontsize=7)
    ax.set_xticks([])
    ax.set_title(title or f"{result.title()}\ntop {len(chosen)} of {len(result.edges)} edges "
                          f"(blue: patching raises the score, red: lowers it)", fontsize=9)


def draw_curve(ax: Any, curve: Curve) -> None:
    """Faithfulness against the fraction of edges kept, with its 95% interval."""
    ax.plot(curve.fractions, curve.values, marker="o", color="black")
    ax.fill_between(curve.fractions, curve.low, curve.high, color="grey", alpha=0.3, lw=0)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(0.0, 1.05)
    ax.set_xlabel("fraction of edges kept (top by |score|)")
    ax.set_ylabel("faithfulness")
    ax.set_title(f"faithfulness (area {curve.area:.2f}, CMD {curve.cmd:.2f})", fontsize=9)


def plot_circuit(result: EdgeResult, k: int = DEFAULT_TOP, curve: Curve | None = None) -> Any:
    """The graph of the top ``k`` edges, and the faithfulness curve beside it when given."""
    figure = new_figure((13, 4.5) if curve is not None else (10, 4.5))
    if curve is None:
        draw_graph(figure.add_subplot(1, 1, 1), result, k)
        return figure
    grid = figure.add_gridspec(1, 3)
    draw_graph(figure.add_subplot(grid[0, :2]), result, k)
    draw_curve(figure.add_subplot(grid[0, 2]), curve)
    return figure


def circuit_png(result: EdgeResult, k: int = DEFAULT_TOP, curve: Curve | None = None) -> bytes:
    return figure_png(plot_circuit(result, k, curve))


def _shape_of_edges(edges: list[str]) -> Shape | QueryShape | T5Shape:
    names = [n for e in edges for n in split_edge(e)]
    if any(n.startswith(ENC + ".") for n in names):
        return _t5_shape_of(names)
    if any(n.startswith(QF + ".") for n in names):
        layers = {b: 1 + max((int(n.split(".")[1][1:]) for n in names if n.startswith(b + ".L")), default=-1)
                  for b in (QF, LM)}
        heads = 1 + max((int(p[1:]) for n in names for p in n.split(".") if p[:1] in (SELF, CROSS)
                         and p[1:].isdigit()), default=0)
        crosses = sorted({int(n.split(".")[1][1:]) for n in names if n.startswith(QF + ".L") and ".X" in n})
        every = crosses[1] - crosses[0] if len(crosses) > 1 else max(layers[QF], 1)
        return QueryShape(layers[QF], heads, every, layers[LM], heads)
    layers = {b: 1 + max((int(n.split(".")[1][1:]) for n in names if n.startswith(b + ".L")), default=-1)
              for b in (QE, DEC)}
    heads = 1 + max((int(p[1:]) for n in names for p in n.split(".") if p[:1] in (SELF, CROSS) and p[1:].isdigit()),
                    default=0)
    return Shape(layers[QE], layers[DEC], heads)


def _t5_shape_of(names: list[str]) -> T5Shape:
    """A T5 graph's sizes as far as edge names show them (one head count, cross-attention spacing guessed)."""
    layers = {b: 1 + max((int(n.split(".")[1][1:]) for n in names if n.startswith(b + ".L")), default=-1)
              for b in (QF, ENC, DEC)}
    heads = 1 + max((int(p[1:]) for n in names for p in n.split(".") if p[:1] in (SELF, CROSS) and p[1:].isdigit()),
                    default=0)
    crosses = sorted({int(n.split(".")[1][1:]) for n in names if n.startswith(QF + ".L") and ".X" in n})
    every = crosses[1] - crosses[0] if len(crosses) > 1 else max(layers[QF], 1)
    return T5Shape(layers[QF], heads, every, layers[ENC], heads, layers[DEC], heads)
