"""Knockouts over a dataset: one table row per (question, edge group, layer), averages with 95% intervals.

    >>> from blip_trace_widgets import load_model, demo_samples
    >>> from blip_trace_widgets.knockout_sweep import knockout_sweep, knockout_average
    >>> table = knockout_sweep(load_model("demo"), demo_samples(per_type=1), edges=["image", "cls"])
    >>> sorted(table["group"].unique())
    ['image [CLS] → question', 'image → question']
    >>> averages = knockout_average(table)
    >>> list(averages.columns)
    ['group', 'layer', 'change', 'low', 'high', 'questions', 'p_value', 'empty', 'q_value', 'significant']

``edges`` are :class:`~.edges.Edges` or the names of :data:`~.edges.SHORTHANDS`; ``"object"`` and
``"background"`` find each image's shape (easy-VQA's one-shape images), so a group means the same part of
every image. A group's label names it in the table: groups are averaged by label. The average is of the
relative change (p_cut − p_clean) / p_clean, with a percentile bootstrap interval over questions.
"""
from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..core.errors import BlipTraceError, renamed
from ..core.names import EACH_TOKEN, KNOCKOUT_WINDOW
from ..core.significance import DEFAULT_Q, CellStatistics, bh_qvalues
from ..models.attention import DEFAULT_EMPTY, EMPTY_ROWS
from ..models.loading import BlipBundle
from .edges import Edges, resolve_edges
from .knockout import Knockout, KnockoutConfig

EdgeNames = Sequence[Any]  # Edges, or names of SHORTHANDS


def _edges_for(edges: EdgeNames, image: Any, decoder: str | None = None) -> tuple[Edges, ...]:
    out = resolve_edges(edges, image, decoder)
    if any(e.queries == EACH_TOKEN for e in out):
        raise BlipTraceError("a sweep averages groups by label, and 'each' token differs between questions: pick "
                             "the tokens by role instead (queries='object', ...)")
    return out


def knockout_sweep(
    bundle: BlipBundle,
    items: Iterable[Any] | None = None,
    *,
    edges: EdgeNames = ("image",),
    window: int = KNOCKOUT_WINDOW,
    scored: str | None = None,
    method: str = "exact",
    progress: Callable[[int], None] | None = None,
    samples: Iterable[Any] | None = None,
    answer: str | None = None,
    empty: str = DEFAULT_EMPTY,
) -> Any:
    """A DataFrame of every (question, group, layer): p, change, the clean p, the model's answer and whether it
    is the expected one. ``scored="expected"`` scores the dataset's answer instead of the model's; ``empty`` is what
    a query with every key cut reads (``"zero"`` or ``"mean"``, its own column). (``samples=`` and ``answer=`` are
    the old names of ``items=`` and ``scored=``: they still work, with a warning.)"""
    import pandas as pd

    from ..datasets.easy_vqa import text_of
    from ..datasets.subsets import as_samples, open_image

    items = renamed(items, samples, "samples", "items")
    answer = renamed(scored, answer, "answer", "scored") or "model"
    if items is None:
        raise BlipTraceError("knockout_sweep needs the dataset's items: knockout_sweep(bundle, items, ...)")
    if answer not in ("model", "expected"):
        raise BlipTraceError(f"scored={answer!r}: use 'model' or 'expected'")
    rows: list[dict[str, Any]] = []
    for index, item in enumerate(as_samples(items)):
        image = open_image(item.image)
        knock = Knockout.of(bundle, image, text_of(bundle.head, item))
        config = KnockoutConfig(edges=_edges_for(edges, image, knock.tracer.task.decoder), window=window, method=method,
                                answer=knock.tracer.task.sweep_answer(item, answer, index), empty=empty)
        result = knock.run(config)
        correct = knock.tracer.task.correct(knock.tracer.model_answer, item.answer)
        frame = result.to_dataframe()
        for record in frame.to_dict("records"):
            rows.append({"sample": index, "question": item.question, "expected": item.answer,
                         "model_answer": knock.tracer.model_answer, "correct": correct,
                         "clean_p": result.clean_score, "window": window, "empty": empty, **record})
        if progress is not None:
            progress(index + 1)
    if not rows:
        raise BlipTraceError("the knockout sweep had no question to run: pass at least one sample")
    return pd.DataFrame(rows)


def knockout_average(table: Any, *, correct_only: bool = False, confidence: float = 0.95) -> Any:
    """Per (group, layer): the mean relative change over questions, its bootstrap interval and the count (and what a
    query with every key cut read, ``empty``, which one table must not mix), with a t-test over the questions'
    changes (``p_value``) and Benjamini-Hochberg q-values over the rows (``q_value``, ``significant``)."""
    import pandas as pd

    from ..causal_trace.averages import bootstrap_interval

    empties = sorted(set(table["empty"])) if "empty" in table else []
    if len(empties) > 1:
        raise BlipTraceError(f"the table mixes knockouts with empty={' and '.join(map(repr, empties))}: average "
                             "each on its own (table[table.empty == 'zero'])")
    if correct_only:
        table = table[table["correct"] == True]  # noqa: E712  (None: no expected answer)
        if not len(table):
            raise BlipTraceError("no question was answered correctly: drop correct_only")
    out = []
    for (group, layer), rows in table.groupby(["group", "layer"], sort=False):
        low, high = bootstrap_interval(rows["change"].to_numpy(), confidence=confidence)
        per_question = rows.groupby("sample")["change"].mean().to_numpy()  # the questions are the draws
        p = CellStatistics.of_draws(per_question[:, None, None], deterministic=False).pvalues[0, 0]
        out.append({"group": group, "layer": int(layer), "change": float(rows["change"].mean()), "low": low,
                    "high": high, "questions": int(rows["sample"].nunique()), "p_value": float(p),
                    **({"empty": empties[0]} if empties else {})})
    frame = pd.DataFrame(out)
    if len(frame):  # Benjamini-Hochberg over every (group, layer) row
        frame["q_value"] = bh_qvalues(frame["p_value"].to_numpy())
        frame["significant"] = frame["q_value"].fillna(1.0) < DEFAULT_Q
    return frame


def plot_knockout_average(averages: Any, ax: Any = None, *, title: str | None = None) -> Any:
    """The averaged line plot: mean relative change (%) per layer, one line per group, 95% intervals shaded."""
    from ..causal_trace.plots import new_figure

    if ax is None:
        ax = new_figure((7.5, 4.2)).add_subplot()
    for group, rows in averages.groupby("group", sort=False):
        line, = ax.plot(rows["layer"], 100 * rows["change"], marker="o", markersize=3.5, label=group)
        ax.fill_between(rows["layer"], 100 * rows["low"], 100 * rows["high"], color=line.get_color(), alpha=0.2)
        if "significant" in rows:  # rows that are noise: hollow markers
            noise = rows[~rows["significant"].astype(bool)]
            ax.plot(noise["layer"], 100 * noise["change"], "o", markersize=5, markerfacecolor="white",
                    markeredgecolor=line.get_color(), linestyle="none")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("layer (centre of the cut window)")
    ax.set_ylabel("mean change of p, % of clean")
    ax.legend(fontsize=8)
    questions = int(averages["questions"].max()) if len(averages) else 0
    rule = f"; {EMPTY_ROWS[averages['empty'].iloc[0]].label}" if "empty" in averages and len(averages) else ""
    real = (f"; {int(averages['significant'].sum())} of {len(averages)} points significant (q < {DEFAULT_Q}; "
            "hollow: noise)") if "significant" in averages and len(averages) else ""
    ax.set_title(title or textwrap.fill(f"Attention knockout over {questions} questions: mean change of p with 95% "
                                        f"intervals{rule}{real}", 90), fontsize=9)
    return ax
