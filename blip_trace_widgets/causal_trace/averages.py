"""Averages over a sweep: indirect effects per layer, kind and token role, with 95% intervals.

    >>> from blip_trace_widgets.causal_trace.averages import token_roles
    >>> token_roles(["[CLS]", "what", "color", "is", "the", "sh", "##ape", "?", "[SEP]"])  # doctest: +NORMALIZE_WHITESPACE
    ['first', 'question words', 'question words', 'question words', 'question words',
     'object', 'object', 'question words', 'last']

Questions differ in length, so positions are grouped into roles before averaging:
the first token, the question words, the object noun (the last content word, or a
rule of your own) and the last token. That replaces the paper's fixed 7-word filter,
which only existed so that heatmaps of equal size could be averaged cell by cell.

Two forms of the effect: ``"rome"``, the indirect effect score − low, whose average over
questions is also the paper's averaged form (its notebook plots avg(score) − avg(low),
undivided); and ``"normalized"``, (score − low) / (high − low). The normalised form never
divides by a total effect near zero: such questions are left out and counted
(``left_out``). Next to each average indirect effect stands ROME's average total effect,
mean(high − low). Intervals are percentile bootstraps over questions.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..core.errors import BlipTraceError
from ..core.names import TINY_EFFECT, VQA, facts, is_head_kind
from ..core.roles import ROLES, ObjectRule, position_roles, role_label, token_roles  # noqa: F401  (token_roles: public here too)
from ..core.significance import DEFAULT_Q, CellStatistics, bh_qvalues
from . import directions
from .results import TraceResult

FORMS = ("normalized", "rome")


def _check_form(form: str) -> str:
    if form not in FORMS:
        raise BlipTraceError(f"unknown form {form!r}: use 'normalized' ((score − low) / (high − low)) or 'rome' "
                         "(score − low, averaged as in ROME and the paper)")
    return form


#: Sweep tables written before the score columns had their results' names (old sweep folders still load).
OLD_COLUMNS = {"low": "low_score", "high": "high_score", "target": "word"}


def upgrade_table(table: Any) -> Any:
    """``table`` with an older sweep's column names brought up to date (``low`` and ``high`` are ``low_score`` and
    ``high_score``, as in :class:`~.results.TraceResult`; a caption's ``target`` is its ``word``)."""
    old = {name: new for name, new in OLD_COLUMNS.items() if name in table.columns and new not in table.columns}
    return table.rename(columns=old) if old else table


def _indirect_effect(row: Any) -> np.ndarray:
    """A table row's indirect effect per cell: score − low, or when noising what the cell takes away, high − score."""
    scores = np.asarray([list(r) for r in row.scores], dtype=np.float64)
    direction = directions.of(getattr(row, "direction", None) or directions.RESTORING.name)
    return direction.effect(scores, low=row.low_score, high=row.high_score)


def sample_effects(
    table: Any,
    *,
    form: str = "normalized",
    correct_only: bool = False,
    by: str = "role",
    object_rule: ObjectRule | None = None,
    min_total_effect: float | None = None,
):
    """Long form: one row per (sample, configuration, role or position, layer) with its ``effect``
    and the question's ``total_effect`` (high_score − low_score).

    A sample's effect for a role is the mean over that role's positions, so every
    sample weighs the same however long its question is. Questions whose total effect is
    below ``min_total_effect`` are left out; with ``form="normalized"`` and no threshold, those
    below TINY_EFFECT (0.1) of their clean score are, as dividing by them would magnify noise.
    ``frame.attrs["left_out"]`` counts the (sample, configuration) pairs left out.
    """
    import pandas as pd

    _check_form(form)
    if by not in ("role", "position"):
        raise BlipTraceError(f"by must be 'role' or 'position', got {by!r}")
    rows = upgrade_table(table[table["correct"].fillna(False).astype(bool)] if correct_only else table)
    if rows.empty:
        raise BlipTraceError("no samples to average"
                             + (" (none answered correctly; try correct_only=False)" if correct_only else ""))
    records: list[dict[str, Any]] = []
    left_out = 0
    for row in rows.itertuples(index=False):
        effect = _indirect_effect(row)
        total = row.high_score - row.low_score
        floor = min_total_effect if min_total_effect is not None else (
            TINY_EFFECT * abs(row.high_score) if form == "normalized" else None)
        if floor is not None and (not abs(total) >= floor or total == 0):
            left_out += 1
            continue
        if form == "normalized":
            effect = effect / total
        tokens = list(row.tokens)
        labels = (position_roles(row.block, tokens, object_rule, kind=row.kind) if by == "role"
                  else [str(p) for p in range(len(tokens))])
        groups: dict[str, list[int]] = {}
        for position, label in enumerate(labels):
            groups.setdefault(label, []).append(position)
        for label, positions in groups.items():
            mean = effect[positions].mean(axis=0)
            for layer, value in enumerate(mean):
                records.append({
                    "sample": row.sample, "config": row.config, "block": row.block, "kind": row.kind,
                    "word": getattr(row, "word", None),
                    "window": row.window, "corruption": row.corruption, by: label, "layer": layer, "effect": value,
                    "total_effect": total,
                })
    frame = pd.DataFrame.from_records(records)
    if frame.empty:
        raise BlipTraceError(f"every question was left out: all {left_out} have a total effect below the threshold; "
                         "raise the noise level, or lower min_total_effect")
    frame.attrs["left_out"] = left_out
    return frame


def bootstrap_interval(values: np.ndarray, *, confidence: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    if len(values) == 1:
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def average_effect(
    table: Any,
    *,
    form: str = "normalized",
    correct_only: bool = False,
    by: str = "role",
    object_rule: ObjectRule | None = None,
    confidence: float = 0.95,
    min_total_effect: float | None = None,
):
    """Average indirect effect per (configuration, role, layer): mean, interval bounds and question count
    ``n``, with ROME's average total effect over the same questions and how many were ``left_out``
    (see :func:`sample_effects`)."""
    import pandas as pd

    effects = sample_effects(table, form=form, correct_only=correct_only, by=by, object_rule=object_rule,
                             min_total_effect=min_total_effect)
    keys = ["config", "block", "kind", "window", "corruption", by, "layer"]
    rows = []
    for key, group in effects.groupby(keys, sort=True):
        values = group["effect"].to_numpy()
        low, high = bootstrap_interval(values, confidence=confidence)
        per_question = group.groupby("sample")["effect"].mean().to_numpy()  # questions are the draws
        stats = CellStatistics.of_draws(per_question[:, None, None], deterministic=False)
        rows.append({**dict(zip(keys, key)), "mean": float(np.nanmean(values)) if len(values) else np.nan,
                     "ci_low": low, "ci_high": high, "n": int(np.sum(~np.isnan(values))),
                     "questions": int(np.isfinite(per_question).sum()), "p_value": float(stats.pvalues[0, 0]),
                     "total_effect": float(group["total_effect"].mean()), "left_out": effects.attrs["left_out"]})
    frame = pd.DataFrame.from_records(rows)
    if not frame.empty:  # Benjamini-Hochberg over each configuration's cells
        frame["q_value"] = frame.groupby("config")["p_value"].transform(lambda p: bh_qvalues(p.to_numpy()))
        frame["significant"] = frame["q_value"].fillna(1.0) < DEFAULT_Q
    return frame


def _row_labels(rows: Any, effects: Any, by: str) -> tuple[list[str], list[str]]:
    """The averaged heatmap's rows: their keys in ``effects`` and their labels."""
    first = list(rows["tokens"].iloc[0])
    if by == "role" and (facts(str(rows["block"].iloc[0])).image_side or is_head_kind(str(rows["kind"].iloc[0]))):
        return first, first
    if by == "role":
        roles = [role for role in ROLES if role in set(effects["role"])]
        return roles, [role_label(role, str(rows["block"].iloc[0])) for role in roles]
    same = all(list(t) == first for t in rows["tokens"])
    return [str(p) for p in range(len(first))], first if same else [f"position {p}" for p in range(len(first))]


def _word_of(row: Any) -> int | None:
    """A captioning row's scored word index (None for other heads and for tables written before captioning)."""
    value = row.get("word") if hasattr(row, "get") else None
    return None if value is None or value != value else int(value)


def average_trace(
    table: Any,
    *,
    config: int | None = None,
    form: str = "normalized",
    correct_only: bool = False,
    by: str = "role",
    object_rule: ObjectRule | None = None,
    min_total_effect: float | None = None,
) -> TraceResult:
    """The averaged heatmap of one configuration as a :class:`TraceResult` (rows are roles or positions).

    ``by="position"`` averages cell by cell, as the paper did; it needs questions of one token
    length. ``form="rome", by="position"`` over 7-word questions is the paper's averaged heatmap,
    avg(score) − avg(low). Its ``high_score`` is ROME's average total effect (1 for the normalised form).
    """
    if config is None:
        configs = sorted(table["config"].unique())
        if len(configs) != 1:
            raise BlipTraceError(f"the table holds configurations {configs}; pick one with config=")
        config = int(configs[0])
    rows = table[table["config"] == config]
    if rows.empty:
        raise BlipTraceError(f"no rows for configuration {config}")
    if by == "position":
        lengths = sorted({len(t) for t in rows["tokens"]})
        if len(lengths) > 1:
            raise BlipTraceError(
                f"questions have {lengths} tokens; averaging by position needs one length: "
                "use by='role', or load questions of one length (e.g. load_vqa_subset(..., words=7))"
            )
    effects = sample_effects(rows, form=form, correct_only=correct_only, by=by, object_rule=object_rule,
                             min_total_effect=min_total_effect)
    keys, labels = _row_labels(rows, effects, by)
    mean = effects.groupby([by, "layer"])["effect"].mean()
    layers = int(rows["num_layers"].iloc[0])
    scores = np.array([[mean.get((key, layer), np.nan) for layer in range(layers)] for key in keys])
    first_row = rows.iloc[0]
    used = effects["sample"].nunique()
    total = float(effects.drop_duplicates("sample")["total_effect"].mean())
    grid = first_row.get("grid")
    extra = {"grid": json.loads(grid)} if isinstance(grid, str) else {}  # image-side: plot_on_image(image=...) works
    corruption = first_row["corruption"]
    return TraceResult(
        scores=scores, low_score=0.0, high_score=1.0 if form == "normalized" else total,
        draws=_question_draws(effects, keys, layers, by),
        answer=f"average of {used} questions" + directions.of(first_row.get("direction")
                                                               or directions.RESTORING.name).average_note,
        tokens=list(labels), block=str(first_row["block"]),
        kind=str(first_row["kind"]), window=int(first_row["window"]),
        config={"form": form, "by": by, "questions": int(used), "left_out": effects.attrs["left_out"],
                "total_effect": total, "correct_only": correct_only,
                "corruption": json.loads(corruption) if isinstance(corruption, str) else corruption,
                "metric": "effect" if form == "rome" else "normalized",
                "head": str(first_row.get("head") or VQA), "word": _word_of(first_row), **extra},
    )


def _question_draws(effects: Any, keys: Sequence[Any], layers: int, by: str) -> np.ndarray:
    """Each question's effect per row and layer [questions, rows, layers] (its tokens' mean where a role has
    several; NaN where the question lacks the row): the draws behind an average's intervals and q-values."""
    per = effects.groupby(["sample", by, "layer"])["effect"].mean()
    samples = sorted(effects["sample"].unique())
    index = {sample: i for i, sample in enumerate(samples)}
    rows = {key: i for i, key in enumerate(keys)}
    draws = np.full((len(samples), len(keys), layers), np.nan)
    for (sample, key, layer), value in per.items():
        if key in rows and 0 <= int(layer) < layers:
            draws[index[sample], rows[key], int(layer)] = value
    return draws


def top_heads(table: Any, k: int = 10, *, form: str = "normalized", correct_only: bool = False,
              confidence: float = 0.95) -> Any:
    """The ``k`` (layer, head) cells of a sweep's head maps with the largest average indirect effect, ranked,
    with their bootstrap intervals and question counts, each head's q-value over its configuration's cells
    (``significant``) and whether its interval excludes 0: one row per (configuration, layer, head). When no
    ranked head's interval excludes 0, a warning says the ranks are noise.

        >>> top_heads(table, 5)[["kind", "layer", "head", "mean", "ci_low", "ci_high", "n"]]  # doctest: +SKIP
    """
    heads = table[table["kind"].map(lambda kind: is_head_kind(str(kind)))]
    if heads.empty:
        raise BlipTraceError("the table holds no head maps: sweep a head kind (--kinds cross_attn_head)")
    averaged = average_effect(heads, form=form, correct_only=correct_only, confidence=confidence)
    ranked = averaged.rename(columns={"role": "head"}).sort_values("mean", ascending=False, kind="stable")
    top = ranked.head(int(k)).reset_index(drop=True)
    top["interval_excludes_0"] = (top["ci_low"] > 0) | (top["ci_high"] < 0)
    if not top["interval_excludes_0"].any():
        warnings.warn(f"every one of the top {len(top)} heads' {confidence:.0%} intervals includes 0 (and "
                      f"{int(top['significant'].sum())} is significant at q < {DEFAULT_Q}): their ranks are noise; "
                      "sweep more questions or another noise level", RuntimeWarning, stacklevel=2)
    return top
