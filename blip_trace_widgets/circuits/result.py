"""Edge scores and circuits as results: per-edge scores with intervals, strict JSON, a DataFrame, the top edges.

    >>> import numpy as np
    >>> result = EdgeResult(["img → qe.L0.X0.k", "qe.emb → qe.L0.mlp"], np.array([-0.5, 0.1]), np.array([0.1, np.nan]),
    ...                     method="eap", direction="noise", samples=2)
    >>> result.top(1)
    ['img → qe.L0.X0.k']
    >>> EdgeResult.from_json(result.to_json()) == result   # strict JSON (NaN written as null), exact round trip
    True
    >>> result.to_dataframe().columns.tolist()[:4]
    ['edge', 'sender', 'receiver', 'score']
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..core.errors import BlipTraceError
from ..core.significance import CellStatistics
from .names import FORMAT, METHOD_LABELS, NOISING, check_direction, split_edge


def _floats(values: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, dtype=np.float64).ravel()]


def _array(values: list[float | None] | None, size: int) -> np.ndarray:
    if values is None:
        return np.full(size, np.nan)
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


@dataclass
class EdgeResult:
    """Per edge: its score (mean over draws), standard error and 95% interval (NaN with one draw, or deterministic
    corruption: zero), with how they were computed. ``clean_score``/``corrupted_score``: m of the two runs."""

    edges: list[str]
    scores: np.ndarray
    stderr: np.ndarray
    low: np.ndarray = field(default_factory=lambda: np.zeros(0))
    high: np.ndarray = field(default_factory=lambda: np.zeros(0))
    method: str = "eap"
    direction: str = "noise"
    samples: int = 1
    steps: int | None = None
    corruption: dict[str, Any] = field(default_factory=dict)
    question: str = ""
    answer: str = ""
    clean_score: float = float("nan")
    corrupted_score: float = float("nan")
    seconds: float = float("nan")
    shape: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.edges)
        self.scores, self.stderr = np.asarray(self.scores, dtype=np.float64), np.asarray(self.stderr, dtype=np.float64)
        if self.low.size != n or self.high.size != n:
            self.low, self.high = self.scores.copy(), self.scores.copy()
        if self.scores.shape != (n,) or self.stderr.shape != (n,):
            raise BlipTraceError(f"an edge result needs one score and one standard error per edge ({n})")

    @classmethod
    def of_draws(cls, edges: list[str], draws: np.ndarray, deterministic: bool = False, **fields: Any) -> EdgeResult:
        """From per-draw scores [draws, edges]: paired statistics (see :mod:`~blip_trace_widgets.core.significance`)."""
        stats = CellStatistics.of_draws(draws[:, :, None], deterministic=True if deterministic else None)
        low, high = stats.interval()
        if draws.shape[0] < 2 or stats.deterministic:
            low, high = stats.mean, stats.mean
        return cls(edges, stats.mean[:, 0], stats.stderr[:, 0], low[:, 0], high[:, 0], samples=int(draws.shape[0]),
                   **fields)

    @property
    def total_effect(self) -> float:
        """m(corrupted) − m(clean) when noising, m(clean) − m(corrupted) when restoring."""
        sign = 1.0 if NOISING.get(self.direction, True) else -1.0
        return sign * (self.corrupted_score - self.clean_score)

    def order(self) -> np.ndarray:
        """Edge indices by |score|, largest first (ties in graph order)."""
        return np.argsort(-np.abs(np.nan_to_num(self.scores)), kind="stable")

    def top(self, k: int) -> list[str]:
        """The ``k`` edges of largest |score|."""
        if not isinstance(k, (int, np.integer)) or k < 0:
            raise BlipTraceError(f"k must be a whole number of edges (0 or more), got {k!r}")
        return [self.edges[i] for i in self.order()[:k]]

    def to_dataframe(self) -> pd.DataFrame:
        pairs = [split_edge(e) for e in self.edges]
        return pd.DataFrame({"edge": self.edges, "sender": [p[0] for p in pairs], "receiver": [p[1] for p in pairs],
                             "score": self.scores, "stderr": self.stderr, "low": self.low, "high": self.high,
                             "rank": np.argsort(self.order(), kind="stable") + 1})

    def title(self) -> str:
        level = self.corruption.get("level")
        what = self.corruption.get("name", "corruption") + (f" {level:g}σ" if isinstance(level, (int, float)) else "")
        return (f"{METHOD_LABELS.get(self.method, self.method)}, {self.direction}: {what}, {self.samples} "
                f"sample{'s' if self.samples != 1 else ''}, total effect {self.total_effect:+.3f}")

    def to_dict(self) -> dict[str, Any]:
        meta = {k: getattr(self, k) for k in ("method", "direction", "samples", "steps", "corruption", "question",
                                              "answer", "shape")}
        numbers = {k: _floats(np.array([getattr(self, k)]))[0] for k in ("clean_score", "corrupted_score", "seconds")}
        return {"format": FORMAT, "kind": "edge_scores", "edges": self.edges, "scores": _floats(self.scores),
                "stderr": _floats(self.stderr), "low": _floats(self.low), "high": _floats(self.high), **meta, **numbers}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> EdgeResult:
        data = json.loads(text)
        if data.get("kind") != "edge_scores":
            raise BlipTraceError("this JSON is not an edge result: write one with EdgeResult.to_json()")
        n = len(data["edges"])
        numbers = {k: np.nan if data.get(k) is None else float(data[k]) for k in ("clean_score", "corrupted_score",
                                                                                  "seconds")}
        return cls(data["edges"], _array(data["scores"], n), _array(data["stderr"], n), _array(data["low"], n),
                   _array(data["high"], n), data["method"], check_direction(data["direction"]), int(data["samples"]),
                   data.get("steps"), data.get("corruption") or {}, data.get("question", ""), data.get("answer", ""), **numbers,
                   shape=data.get("shape") or {})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EdgeResult) and self.to_json() == other.to_json()
