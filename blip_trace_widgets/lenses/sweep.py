"""Lenses over a dataset: at the position where the model says its answer, p(answer), its rank and the KL to the
final layer at every layer, per question, and their averages per layer with 95% intervals.

    >>> from blip_trace_widgets import demo_samples, load_model
    >>> from blip_trace_widgets.lenses.sweep import lens_average, lens_sweep
    >>> table = lens_sweep(load_model("demo"), demo_samples(per_type=1))
    >>> len(table), sorted(int(layer) for layer in table["layer"].unique())
    (12, [0, 1, 2, 3])
    >>> average = lens_average(table)
    >>> list(average.columns)[:4], int(average["questions"].iloc[0])
    (['layer', 'questions', 'p_answer', 'p_answer_low'], 3)

The answer followed is the model's own (``scored="model"``) or the dataset's (``scored="expected"``, its first
token). Each question is one forward pass (:func:`~.core.lens`), read at its last position: the answer decoder's
``[DEC]``, the language model's last prompt token.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pandas as pd

from ..core.errors import BlipTraceError
from ..core.significance import t_quantile
from ..datasets.easy_vqa import text_of
from ..datasets.subsets import as_samples, open_image
from .core import check_kind, lens
from .names import LOGIT
from .reading import check_bundle

#: What a sweep follows: the model's own answer, or the dataset's.
SCORED = ("model", "expected")


def lens_sweep(bundle: Any, items: Iterable[Any], *, block: str | None = None, kind: str = LOGIT,
               scored: str = "model", limit: int | None = None,
               progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """One row per (question, layer) at the question's last position: ``p_answer``, ``rank`` (1: the top token),
    ``top`` (whether it is the top token), ``kl`` (nats, to the final layer) and the ``top_token``."""
    bundle, kind = check_bundle(bundle), check_kind(kind)
    if scored not in SCORED:
        raise BlipTraceError(f"scored must be one of {', '.join(SCORED)}, got {scored!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise BlipTraceError(f"limit must be a whole number >= 1, got {limit!r}")
    rows = []
    for index, item in enumerate(as_samples(items)):
        if limit is not None and index >= limit:
            break
        answer = getattr(item, "answer", None) if scored == "expected" else None
        if scored == "expected" and not answer:
            raise BlipTraceError(f"item {index} has no answer: use scored='model', or give each item its answer")
        result = lens(bundle, open_image(item.image), text_of(bundle.head, item), block, kind, answer=answer)
        for layer in range(result.layers):
            rows.append({"question": index, "text": result.text, "answer": result.answer, "layer": layer,
                         "p_answer": float(result.answer_prob[-1, layer]), "rank": int(result.answer_rank[-1, layer]),
                         "top": int(result.answer_rank[-1, layer]) == 1, "kl": float(result.kl[-1, layer]),
                         "top_token": result.top_tokens[-1][layer][0], "block": result.block, "kind": kind})
        if progress is not None:
            progress(index + 1)
    if not rows:
        raise BlipTraceError("the sweep has no questions: pass items (and a limit of at least 1)")
    return pd.DataFrame(rows)


def _interval(values: np.ndarray) -> tuple[float, float, float]:
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = t_quantile(0.95, len(values) - 1) * float(values.std(ddof=1)) / np.sqrt(len(values))
    return mean, mean - half, mean + half


def lens_average(table: pd.DataFrame) -> pd.DataFrame:
    """Per layer over the sweep's questions: mean p(answer) and mean KL with 95% t intervals, the median rank, and
    the share of questions whose answer is already the top token."""
    missing = {"layer", "p_answer", "rank", "top", "kl"} - set(table.columns)
    if missing:
        raise BlipTraceError(f"not a lens sweep's table (missing {', '.join(sorted(missing))}): pass lens_sweep's")
    out = []
    for layer, rows in table.groupby("layer"):
        p, p_low, p_high = _interval(rows["p_answer"].to_numpy(dtype=float))
        kl, kl_low, kl_high = _interval(rows["kl"].to_numpy(dtype=float))
        out.append({"layer": int(layer), "questions": len(rows), "p_answer": p, "p_answer_low": p_low,
                    "p_answer_high": p_high, "rank_median": float(rows["rank"].median()),
                    "top_share": float(rows["top"].mean()), "kl": kl, "kl_low": kl_low, "kl_high": kl_high})
    return pd.DataFrame(out)
