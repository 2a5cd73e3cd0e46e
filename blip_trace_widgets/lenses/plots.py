"""Figures of a lens (matplotlib, by the package's figure conventions): every figure names the model, the block,
the lens kind and the answer followed.

    >>> from blip_trace_widgets import load_model, demo_samples
    >>> from blip_trace_widgets.lenses import lens
    >>> from blip_trace_widgets.lenses.plots import lens_png
    >>> image, question, _ = demo_samples()[0]
    >>> lens_png(lens(load_model("demo-blip2"), image, question), "queries")[:4] == b"\\x89PNG"
    True

- :func:`plot_lens`: positions x layers coloured by p(answer), each cell labelled by its top token;
- :func:`plot_rank`: a line per position of the answer's rank by layer (log scale, 1 at the top);
- :func:`plot_queries`: BLIP-2's image queries x layers, each cell its top word (coloured by that word's p).
"""
from __future__ import annotations

import textwrap
from typing import Any

import numpy as np

from ..causal_trace.plots import figure_png, new_figure
from ..core.errors import BlipTraceError
from ..core.names import BLOCK_LABELS
from .names import LENS_COLORMAP, LENS_LABELS
from .result import LensResult

#: The figures :func:`lens_png` draws.
FIGURES = ("grid", "rank", "queries")
#: The most positions the rank plot draws a line for (the last ones).
MAX_LINES = 10


def lens_title(result: LensResult, what: str, width: int = 80) -> str:
    """What a figure shows: the lens, block, model and answer, and the text."""
    head = (f"{LENS_LABELS.get(result.kind, result.kind)} of the {BLOCK_LABELS.get(result.block, result.block)} "
            f"({result.model}): {what}")
    return textwrap.fill(head, width) + "\n" + textwrap.shorten(f"text: {result.text!r}", width)


def _axes(rows: int, layers: int, ax: Any) -> Any:
    if ax is not None:
        return ax
    ax = new_figure((max(5.5, 2.6 + 0.75 * layers), 1.9 + 0.3 * min(rows, 60))).add_subplot()
    ax._repr_png_ = lambda: figure_png(ax.figure)
    return ax


def _grid(ax: Any, values: np.ndarray, words: list[list[str]], labels: list[str], bar: str) -> None:
    image = ax.pcolormesh(values, cmap=LENS_COLORMAP, vmin=0.0, vmax=1.0, shading="flat")
    size = 7 if values.shape[1] <= 12 else 5
    for row in range(values.shape[0]):
        for col in range(values.shape[1]):
            ax.text(col + 0.5, row + 0.5, words[row][col][:10], ha="center", va="center", fontsize=size,
                    color="white" if values[row, col] > 0.6 else "black")
    ax.invert_yaxis()
    ax.set_yticks(np.arange(len(labels)) + 0.5)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xticks(np.arange(values.shape[1]) + 0.5)
    ax.set_xticklabels([str(i) for i in range(values.shape[1])])
    ax.figure.colorbar(image, ax=ax).set_label(bar, fontsize=8)


def plot_lens(result: LensResult, ax: Any = None) -> Any:
    """Positions down, layers across, coloured by p(answer); each cell says its top token."""
    ax = _axes(len(result.labels), result.layers, ax)
    _grid(ax, result.answer_prob, result.top_token(), result.labels, f"p({result.answer!r})")
    ax.set_xlabel(f"layer of the {BLOCK_LABELS.get(result.block, result.block)} (cell: its top token)")
    ax.set_title(lens_title(result, f"p({result.answer!r}) and the top token"), fontsize=8, loc="left")
    return ax


def plot_rank(result: LensResult, ax: Any = None, positions: list[int] | None = None) -> Any:
    """A line per position of the answer's rank by layer (log scale; rank 1 is the top token): by default the text's
    last positions (at most :data:`MAX_LINES`)."""
    if positions is None:
        positions = list(range(max(result.queries, len(result.labels) - MAX_LINES), len(result.labels)))
    ax = _axes(8, result.layers, ax) if ax is not None else new_figure((6.4, 3.6)).add_subplot()
    ax._repr_png_ = lambda: figure_png(ax.figure)
    for p in positions:
        ax.plot(range(result.layers), result.answer_rank[p], marker="o", label=f"{p}: {result.labels[p]}")
    from matplotlib.ticker import ScalarFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.invert_yaxis()
    ax.set_xticks(range(result.layers))
    ax.set_xlabel(f"layer of the {BLOCK_LABELS.get(result.block, result.block)}")
    ax.set_ylabel(f"rank of {result.answer!r} (1 = top)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), title="position", title_fontsize=7)
    ax.set_title(lens_title(result, f"the rank of {result.answer!r} by layer"), fontsize=8, loc="left")
    return ax


def plot_queries(result: LensResult, ax: Any = None) -> Any:
    """BLIP-2's image queries down, layers across: each cell the query's top word, coloured by its probability."""
    if result.queries == 0:
        raise BlipTraceError("this lens has no image queries: lens a BLIP-2 or InstructBLIP language model "
                             "(block='language_model')")
    q = result.queries
    ax = _axes(q, result.layers, ax)
    _grid(ax, result.top_probs[:q, :, 0], result.top_token()[:q], result.labels[:q], "p(top word)")
    ax.set_xlabel(f"layer of the {BLOCK_LABELS.get(result.block, result.block)} (cell: the query's top word)")
    ax.set_title(lens_title(result, f"what each image query says (answer followed: {result.answer!r})"), fontsize=8,
                 loc="left")
    return ax


def lens_png(result: LensResult, figure: str = "grid") -> bytes:
    """One figure of ``result`` as PNG bytes: ``"grid"``, ``"rank"`` or ``"queries"``."""
    draw = {"grid": plot_lens, "rank": plot_rank, "queries": plot_queries}
    if figure not in draw:
        raise BlipTraceError(f"unknown lens figure {figure!r}: use one of {', '.join(FIGURES)}")
    return figure_png(draw[figure](result).figure)
