"""TraceResult: one causal-trace heatmap with everything needed to read, plot and reload it.

    >>> import numpy as np
    >>> from blip_trace_widgets import TraceResult
    >>> r = TraceResult(scores=np.array([[0.5, 0.75]]), low_score=0.5, high_score=1.0, answer="red",
    ...                 tokens=["[CLS]"], block="question_encoder", kind="hidden", window=1, config={})
    >>> r.normalized().tolist(), r.total_effect
    ([[0.0, 0.5]], 0.5)

Results serialise to strict JSON (floats with full precision; NaN and infinities, which
strict parsers reject, are written as ``null``) and to a long-form pandas DataFrame, one
row per (position, layer).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from .errors import BlipTraceError
from .names import HEAD_INFO, ITM, METRIC_LABELS, TINY_EFFECT, VQA  # noqa: F401  (METRIC_LABELS: public here too)

#: Version of the saved JSON layout; files without one are version 1 (no stderr, NaN as bare tokens).
FORMAT_VERSION = 2
EXPORT_FORMATS = ("png", "json", "csv")


def _json_array(values: np.ndarray) -> list[Any]:
    """Nested lists with every non-finite float as None, for strict JSON."""
    return [[v if math.isfinite(v) else None for v in row] for row in values.tolist()]


def _from_json_array(values: Any, name: str) -> np.ndarray:
    try:
        return np.array([[np.nan if v is None else v for v in row] for row in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise BlipTraceError(f"the saved result's {name!r} is not a table of numbers") from None


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def _checked_arrays(scores: Any, stderr: Any, positions: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Scores (and standard errors) as float64 positions x layers arrays, or a clear error."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != positions:
        raise BlipTraceError(f"scores must be positions x layers with one token label per position, "
                             f"got {scores.shape} for {positions} tokens")
    if stderr is not None:
        stderr = np.asarray(stderr, dtype=np.float64)
        if stderr.shape != scores.shape:
            raise BlipTraceError(f"stderr has shape {stderr.shape}, scores {scores.shape}")
    return scores, stderr


@dataclass(eq=False)
class TraceResult:
    """Scores of restoring each (position, layer) cell, with the clean and corrupted baselines.

    ``stderr`` is the standard error of each cell's mean over noise samples (NaN with one
    sample); ``total_effect`` is ROME's total effect, clean − corrupted.
    """

    scores: np.ndarray  # positions x layers
    low_score: float  # corrupted, nothing restored
    high_score: float  # clean run
    answer: str
    tokens: list[str]
    block: str
    kind: str
    window: int
    config: dict[str, Any] = field(default_factory=dict)
    stderr: np.ndarray | None = None  # positions x layers
    #: The traced image, kept for plot_on_image; not saved.
    image: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.scores, self.stderr = _checked_arrays(self.scores, self.stderr, len(self.tokens))
        self.low_score = float(self.low_score)
        self.high_score = float(self.high_score)

    @property
    def metric(self) -> str:
        return str(self.config.get("metric", "prob"))

    @property
    def head(self) -> str:
        """The model's head: "vqa", "caption" or "itm" (results saved before captioning was traced are VQA)."""
        return str(self.config.get("head") or VQA)

    @property
    def scored(self) -> str:
        """What the scores are of, in words: "answer 'red'", "caption word 'red'" or "match with 'a red circle'"."""
        if "questions" in self.config:  # an average over a sweep
            return str(self.answer)
        if self.head == ITM:
            what = "ITC similarity" if self.metric == "itc" else "match"
            return f"{what} with {self.config.get('question', '')!r}"
        return f"{HEAD_INFO[self.head].scored if self.head in HEAD_INFO else 'answer'} {self.answer!r}"

    @property
    def is_estimate(self) -> bool:
        """Whether the scores are attribution-patching estimates (``method="estimate"``), not patched runs."""
        return self.config.get("method") == "estimate"

    @property
    def num_layers(self) -> int:
        return int(self.scores.shape[1])

    @property
    def total_effect(self) -> float:
        """ROME's total effect: the clean score minus the corrupted one."""
        return self.high_score - self.low_score

    def is_tiny(self, threshold: float = TINY_EFFECT) -> bool:
        """Whether the corruption barely changes the score: |total effect| < threshold · |clean score|.

        Then the heatmap shows noise, and dividing by the total effect magnifies it.
        """
        return abs(self.total_effect) < threshold * abs(self.high_score) or self.total_effect == 0

    def normalized(self) -> np.ndarray:
        """(score − low) / (high − low): 0 is the corrupted run, 1 the clean run (NaN when they are equal)."""
        span = self.high_score - self.low_score
        if span == 0:
            return np.full_like(self.scores, np.nan)
        return (self.scores - self.low_score) / span

    def indirect_effect(self) -> np.ndarray:
        """ROME's indirect effect: score − low."""
        return self.scores - self.low_score

    # ----- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION, "scores": _json_array(self.scores),
            "stderr": None if self.stderr is None else _json_array(self.stderr),
            "low_score": _finite_or_none(self.low_score), "high_score": _finite_or_none(self.high_score),
            "answer": self.answer, "tokens": list(self.tokens), "block": self.block, "kind": self.kind,
            "window": int(self.window), "config": _finite_or_none(self.config),
        }

    @classmethod
    def from_dict(cls, data: Any) -> TraceResult:
        required = ("scores", "low_score", "high_score", "answer", "tokens", "block", "kind", "window")
        if not isinstance(data, dict) or any(key not in data for key in required):
            missing = [k for k in required if not isinstance(data, dict) or k not in data]
            raise BlipTraceError(f"not a saved TraceResult (missing {', '.join(missing)}); "
                                 "load a file written by TraceResult.save or blip-trace")
        version = data.get("format", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise BlipTraceError(f"this result was saved in format {version!r}, newer than this version reads "
                                 f"({FORMAT_VERSION}); upgrade blip-trace-widgets")
        stderr = data.get("stderr")

        def number(key: str) -> float:
            value = data[key]
            return float("nan") if value is None else float(value)

        return cls(scores=_from_json_array(data["scores"], "scores"), low_score=number("low_score"),
                   high_score=number("high_score"), answer=str(data["answer"]), tokens=list(data["tokens"]),
                   block=str(data["block"]), kind=str(data["kind"]), window=int(data["window"]),
                   config=dict(data.get("config") or {}),
                   stderr=None if stderr is None else _from_json_array(stderr, "stderr"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the result as strict JSON; :meth:`load` gives back an equal result."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> TraceResult:
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise BlipTraceError(f"cannot read {str(path)!r}: {error.strerror or error}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise BlipTraceError(f"{str(path)!r} is not valid JSON ({error.msg} at line {error.lineno}); "
                                 "it may be truncated") from None
        return cls.from_dict(data)

    def to_dataframe(self) -> Any:
        """Long form: one row per (position, layer) with token, score, normalised score and the trace's labels."""
        import pandas as pd

        positions, layers = np.meshgrid(np.arange(self.scores.shape[0]), np.arange(self.scores.shape[1]), indexing="ij")
        boxes = (self.config.get("grid") or {}).get("boxes")
        regions = {}
        if boxes:  # image-side traces: where each position is, in fractions of the image (NaN for CLS)
            corners = np.array([box if box else [np.nan] * 4 for box in boxes], dtype=np.float64)[positions.ravel()]
            regions = {name: corners[:, i] for i, name in enumerate(("left", "top", "right", "bottom"))}
        stderr = self.stderr if self.stderr is not None else np.full_like(self.scores, np.nan)
        return pd.DataFrame({
            "position": positions.ravel(), "token": [self.tokens[p] for p in positions.ravel()], "layer": layers.ravel(),
            "score": self.scores.ravel(), "stderr": stderr.ravel(), "normalized": self.normalized().ravel(),
            "low_score": self.low_score, "high_score": self.high_score, "total_effect": self.total_effect,
            "answer": self.answer, "block": self.block, "kind": self.kind, "window": self.window, "metric": self.metric,
            "head": self.head, **regions,
        })

    def export(self, path: Union[str, os.PathLike], fmt: str | None = None, *, normalized: bool = False) -> Path:
        """Write the heatmap (``png``), the result (``json``) or its DataFrame (``csv``); ``fmt`` defaults
        to the path's suffix. The explorer's save buttons and the command line both use this."""
        path = Path(path)
        fmt = (fmt or path.suffix.lstrip(".")).lower()
        if fmt not in EXPORT_FORMATS:
            raise BlipTraceError(f"unknown export format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "json":
            return self.save(path)
        if fmt == "csv":
            self.to_dataframe().to_csv(path, index=False)
            return path
        from .plotting import heatmap_png

        path.write_bytes(heatmap_png(self, normalized=normalized))
        return path

    # ----- figures ---------------------------------------------------------------------------
    def plot(self, ax: Any = None, *, normalized: bool = False, title: str | None = None, show: str = "scores",
             **options: Any) -> Any:
        """A ROME-style heatmap (tokens down, layers across, colour bar of the score); returns the axes, which a
        notebook shows as the figure when they are a cell's value.

        ``show="stderr"`` draws each cell's standard error over noise samples instead; ``top`` and ``tiny``
        are :func:`~.plotting.plot_trace`'s.
        """
        from .plotting import plot_trace

        return plot_trace(self, ax=ax, normalized=normalized, title=title, show=show, **options)

    def plot_on_image(self, image: Any = None, *, layer: Any = None, normalized: bool = True, **kw: Any) -> Any:
        """For an image-side trace: each region's effect over the image, one panel per layer (see plotting)."""
        from .plotting import plot_on_image

        return plot_on_image(self, image, layer=layer, normalized=normalized, **kw)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TraceResult):
            return NotImplemented
        return self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]
