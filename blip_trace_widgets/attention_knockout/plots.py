"""Knockout figures: Zhang et al.'s line plot of the relative change of p per layer, and a tokens x layers map.

    >>> import numpy as np
    >>> from blip_trace_widgets.attention_knockout.result import KnockoutResult
    >>> from blip_trace_widgets.attention_knockout.plots import plot_knockout
    >>> result = KnockoutResult(["image → question", "image [CLS] → question"],
    ...                         np.array([[0.2, 0.5, 0.9], [0.9, 0.9, 0.9]]), 0.9, window=1, answer="red")
    >>> ax = plot_knockout(result)
    >>> [line.get_label() for line in ax.get_lines()][:2]
    ['image → question', 'image [CLS] → question (no effect)']

Every line shares one y scale, in percent of the clean p, with 0 (nothing changes) drawn. A group whose
knockout moves p by less than 0.01, or by less than 1% of the clean p, at every layer is drawn grey and dashed
and says "no effect" in the legend. Rises above 0 stay visible: cutting an edge can also raise p. Each figure
says what was scored, the clean p, the window, whether the values are exact or an estimate, that they are
deterministic (one clean input, nothing drawn at random: no noise samples, no error bars), and what a query with
every key cut reads (zero, or the mean of the values cut), in its title and again on the plot (the legend's
title, or the colour bar's label).
"""
from __future__ import annotations

import textwrap
from typing import Any, Protocol

import numpy as np

from ..core.names import TINY_ABSOLUTE, TINY_CHANGE


class KnockoutResult(Protocol):
    """What a knockout figure reads from a result (a :class:`~.knockout_result.KnockoutResult`)."""

    @property
    def labels(self) -> list[str]: ...
    @property
    def clean_score(self) -> float: ...
    @property
    def window(self) -> int: ...
    @property
    def answer(self) -> str: ...
    @property
    def question(self) -> str: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def changes(self) -> np.ndarray: ...
    @property
    def is_estimate(self) -> bool: ...
    @property
    def empty_label(self) -> str: ...
    def tiny(self) -> np.ndarray: ...

TINY_LABEL = " (no effect)"
KNOCKOUT_CMAP = "RdBu_r"


def knockout_title(result: KnockoutResult, width: int = 72) -> str:
    """What the figure shows: the scored text, its clean p, the window, exact or estimate, deterministic, and what
    a query with every key cut reads."""
    how = "exact" if not result.is_estimate else ("ESTIMATE (first order in an edge multiplier: far off where a cut "
                                                  "removes much of p), not cut runs")
    text = (f"Attention knockout, window {result.window}: change of p({result.answer}) "
            f"(clean p = {result.clean_score:.3g}); {how}, deterministic (one clean input, no noise); "
            f"{result.empty_label}")
    if result.question:
        text = f"{result.question!r}: " + text
    flagged = int(result.tiny().sum())
    if flagged:
        text += (f"; {flagged} group{'s move' if flagged != 1 else ' moves'} p by < {TINY_ABSOLUTE['prob']:g} or "
                 f"< {TINY_CHANGE:.0%} (no effect, grey)")
    return "\n".join(textwrap.wrap(text, width))


def plot_knockout(result: KnockoutResult, ax: Any = None, *, title: str | None = None) -> Any:
    """Relative change of p (%) per layer, one line per edge group, on one shared scale; returns the axes."""
    from ..causal_trace.plots import new_figure

    if ax is None:
        ax = new_figure((7.5, 4.2)).add_subplot()
    layers = np.arange(result.num_layers)
    tiny = result.tiny()
    for g, label in enumerate(result.labels):
        values = 100 * result.changes[g]
        if tiny[g]:
            ax.plot(layers, values, color="0.6", linestyle="--", marker=".", label=label + TINY_LABEL)
        else:
            ax.plot(layers, values, marker="o", markersize=3.5, label=label)
    ax.axhline(0, color="black", linewidth=0.8)
    low = min(-5.0, float(np.nanmin(100 * result.changes)) * 1.05)
    high = max(5.0, float(np.nanmax(100 * result.changes)) * 1.05)
    ax.set_ylim(low, high)
    ax.set_xticks(layers)
    deeper = bool(np.isnan(result.changes).any())  # groups on blocks of different depths: each line ends at its last
    ax.set_xlabel(f"layer{' of each group’s block' if deeper else ''} (centre of {result.window} cut layers)")
    ax.set_ylabel(f"change of p({result.answer}), % of clean")
    ax.legend(fontsize=8, loc="best", title=result.empty_label, title_fontsize=7)
    ax.set_title(title if title is not None else knockout_title(result), fontsize=9)
    return ax


def plot_knockout_tokens(result: KnockoutResult, ax: Any = None, *, title: str | None = None) -> Any:
    """Tokens x layers: the relative change of p when each token's edges are cut (``queries="each"``), on a
    diverging scale centred at 0 that never spans less than the no-effect floor; returns the axes."""
    from matplotlib.colors import TwoSlopeNorm

    from ..causal_trace.plots import new_figure

    if ax is None:
        ax = new_figure((7.5, 0.35 * len(result.labels) + 2)).add_subplot()
    data = 100 * result.changes
    floor = 100 * TINY_CHANGE
    span = max(floor, float(np.nanmax(np.abs(data))))
    mesh = ax.pcolormesh(data, cmap=KNOCKOUT_CMAP, norm=TwoSlopeNorm(0.0, -span, span))
    ax.invert_yaxis()
    ax.set_yticks(np.arange(len(result.labels)) + 0.5, result.labels)
    ax.set_xticks(np.arange(result.num_layers) + 0.5, range(result.num_layers))
    ax.set_xlabel(f"layer (centre of {result.window} cut layers)")
    tiny = result.tiny()
    for g in np.flatnonzero(tiny):
        ax.add_patch(_hatch(int(g), result.num_layers))
    ax.figure.colorbar(mesh, ax=ax, label=f"change of p({result.answer}), %\n{result.empty_label}")
    ax.set_title(title if title is not None else knockout_title(result), fontsize=9)
    return ax


def _hatch(row: int, layers: int) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((0, row), layers, 1, fill=False, hatch="///", edgecolor="0.5", linewidth=0)
