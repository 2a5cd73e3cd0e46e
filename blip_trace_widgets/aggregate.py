"""Averages over a sweep: indirect effects per layer, kind and token role, with 95% intervals.

    >>> from blip_trace_widgets.aggregate import token_roles
    >>> token_roles(["[CLS]", "what", "color", "is", "the", "sh", "##ape", "?", "[SEP]"])
    ['first', 'question words', 'question words', 'question words', 'question words', 'object', 'object', 'question words', 'last']

Questions differ in length, so positions are grouped into roles before averaging:
the first token, the question words, the object noun (the last content word, or a
rule of your own) and the last token. That replaces the paper's fixed 7-word filter,
which only existed so that heatmaps of equal size could be averaged cell by cell.

Two forms of the effect: ROME's (score − low) and the paper's normalised
(score − low) / (high − low). Intervals are percentile bootstraps over samples.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .results import TraceResult

ROLES: tuple[str, ...] = ("first", "question words", "object", "last")
FORMS = ("normalized", "rome")
STOPWORDS = frozenset(
    "a an the of in on at to is are was were be been do does did what which who whom whose where when why how many much "
    "color colour kind type there this that these those it its and or with by for from as any some image picture photo "
    "shown show".split()
)
ObjectRule = Callable[[Sequence[str]], Sequence[int]]


def words_of(tokens: Sequence[str]) -> list[list[int]]:
    """Positions of each word: a word piece starting with ``##`` joins the word before it."""
    words: list[list[int]] = []
    for position, token in enumerate(tokens):
        if token.startswith("##") and words:
            words[-1].append(position)
        else:
            words.append([position])
    return words


def last_content_word(tokens: Sequence[str]) -> list[int]:
    """Positions of the last alphabetic word that is not a stop word (the default object noun)."""
    for word in reversed(words_of(tokens)[1:-1]):
        text = "".join(tokens[p].removeprefix("##") for p in word).lower()
        if text.isalpha() and text not in STOPWORDS:
            return word
    return []


def token_roles(tokens: Sequence[str], object_rule: ObjectRule | None = None) -> list[str]:
    """The role of each position: first, last, the object noun's pieces, and question words for the rest."""
    count = len(tokens)
    if count == 0:
        return []
    roles = ["question words"] * count
    for position in (object_rule or last_content_word)(tokens):
        if not 0 <= position < count:
            raise ValueError(f"the object rule gave position {position} for {count} tokens")
        roles[position] = "object"
    roles[-1] = "last"
    roles[0] = "first"
    return roles


def position_roles(block: str, tokens: Sequence[str], object_rule: ObjectRule | None = None) -> list[str]:
    """Roles of a trace's positions: token roles for the text blocks; for image-side traces the region
    labels themselves ([CLS], r0c0, ...), which line up across images of one grid."""
    if block == "vision_encoder":
        return list(tokens)
    return token_roles(tokens, object_rule)


def _check_form(form: str) -> str:
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}: use 'normalized' (the paper's) or 'rome' (score − low)")
    return form


def sample_effects(
    table: Any,
    *,
    form: str = "normalized",
    correct_only: bool = False,
    by: str = "role",
    object_rule: ObjectRule | None = None,
):
    """Long form: one row per (sample, configuration, role or position, layer) with its ``effect``.

    A sample's effect for a role is the mean over that role's positions, so every
    sample weighs the same however long its question is.
    """
    import pandas as pd

    _check_form(form)
    if by not in ("role", "position"):
        raise ValueError(f"by must be 'role' or 'position', got {by!r}")
    rows = table[table["correct"].fillna(False).astype(bool)] if correct_only else table
    if rows.empty:
        raise ValueError("no samples to average" + (" (none answered correctly; try correct_only=False)" if correct_only else ""))
    records: list[dict[str, Any]] = []
    for row in rows.itertuples(index=False):
        scores = np.asarray([list(r) for r in row.scores], dtype=np.float64)
        effect = scores - row.low
        if form == "normalized":
            span = row.high - row.low
            effect = effect / span if span != 0 else np.full_like(effect, np.nan)
        tokens = list(row.tokens)
        labels = position_roles(row.block, tokens, object_rule) if by == "role" else [str(p) for p in range(len(tokens))]
        groups: dict[str, list[int]] = {}
        for position, label in enumerate(labels):
            groups.setdefault(label, []).append(position)
        for label, positions in groups.items():
            mean = effect[positions].mean(axis=0)
            for layer, value in enumerate(mean):
                records.append({
                    "sample": row.sample, "config": row.config, "block": row.block, "kind": row.kind,
                    "window": row.window, "corruption": row.corruption, by: label, "layer": layer, "effect": value,
                })
    return pd.DataFrame.from_records(records)


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
):
    """Average indirect effect per (configuration, role, layer): mean, interval bounds and sample count."""
    import pandas as pd

    effects = sample_effects(table, form=form, correct_only=correct_only, by=by, object_rule=object_rule)
    keys = ["config", "block", "kind", "window", "corruption", by, "layer"]
    rows = []
    for key, group in effects.groupby(keys, sort=True):
        values = group["effect"].to_numpy()
        low, high = bootstrap_interval(values, confidence=confidence)
        rows.append({**dict(zip(keys, key)), "mean": float(np.nanmean(values)) if len(values) else np.nan,
                     "ci_low": low, "ci_high": high, "n": int(np.sum(~np.isnan(values)))})
    return pd.DataFrame.from_records(rows)


def average_trace(
    table: Any,
    *,
    config: int | None = None,
    form: str = "normalized",
    correct_only: bool = False,
    by: str = "role",
    object_rule: ObjectRule | None = None,
) -> TraceResult:
    """The averaged heatmap of one configuration as a :class:`TraceResult` (rows are roles or positions).

    ``by="position"`` averages cell by cell, as the paper did; it needs questions of one token length.
    """
    if config is None:
        configs = sorted(table["config"].unique())
        if len(configs) != 1:
            raise ValueError(f"the table holds configurations {configs}; pick one with config=")
        config = int(configs[0])
    rows = table[table["config"] == config]
    if rows.empty:
        raise ValueError(f"no rows for configuration {config}")
    if by == "position":
        lengths = sorted({len(t) for t in rows["tokens"]})
        if len(lengths) > 1:
            raise ValueError(
                f"questions have {lengths} tokens; averaging by position needs one length: "
                "use by='role', or load questions of one length (e.g. load_vqa_subset(..., words=7))"
            )
    effects = sample_effects(rows, form=form, correct_only=correct_only, by=by, object_rule=object_rule)
    if by == "role" and rows["block"].iloc[0] == "vision_encoder":
        labels = list(rows["tokens"].iloc[0])
    elif by == "role":
        labels = [role for role in ROLES if role in set(effects["role"])]
    else:
        labels = [str(p) for p in range(len(rows["tokens"].iloc[0]))]
    mean = effects.groupby([by, "layer"])["effect"].mean()
    layers = int(rows["num_layers"].iloc[0])
    scores = np.array([[mean.get((label, layer), np.nan) for layer in range(layers)] for label in labels])
    if by == "position":
        first = list(rows["tokens"].iloc[0])
        same = all(list(t) == first for t in rows["tokens"])
        labels = first if same else [f"position {p}" for p in range(len(first))]
    first_row = rows.iloc[0]
    used = rows[rows["correct"].fillna(False).astype(bool)] if correct_only else rows
    grid = first_row.get("grid")
    extra = {"grid": json.loads(grid)} if isinstance(grid, str) else {}  # image-side: plot_on_image(image=...) works
    return TraceResult(
        scores=scores, low_score=0.0, high_score=1.0 if form == "normalized" else 0.0,
        answer=f"average of {len(used)} samples", tokens=list(labels), block=str(first_row["block"]),
        kind=str(first_row["kind"]), window=int(first_row["window"]),
        config={"form": form, "by": by, "samples": int(len(used)), "correct_only": correct_only,
                "corruption": first_row["corruption"], "metric": "effect" if form == "rome" else "normalized", **extra},
    )
