"""TraceResult: one causal-trace heatmap with everything needed to read, plot and reload it.

    >>> import numpy as np
    >>> from blip_trace_widgets import TraceResult
    >>> r = TraceResult(scores=np.array([[0.5, 0.75]]), low_score=0.5, high_score=1.0, answer="red",
    ...                 tokens=["[CLS]"], block="question_encoder", kind="hidden", window=1, config={})
    >>> r.normalized().tolist()
    [[0.0, 0.5]]

Results serialise to JSON (exactly: floats are written with full precision) and to a
long-form pandas DataFrame, one row per (position, layer).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

METRIC_LABELS = {"prob": "p(answer)", "logprob": "log p(answer)", "logit_diff": "logit(answer) − logit(contrast)",
                 "effect": "indirect effect (score − low)", "normalized": "normalised indirect effect"}


@dataclass
class TraceResult:
    """Scores of restoring each (position, layer) cell, with the clean and corrupted baselines."""

    scores: np.ndarray  # positions x layers
    low_score: float  # corrupted, nothing restored
    high_score: float  # clean run
    answer: str
    tokens: list[str]
    block: str
    kind: str
    window: int
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if self.scores.ndim != 2 or self.scores.shape[0] != len(self.tokens):
            raise ValueError(
                f"scores must be positions x layers with one token label per position, "
                f"got {self.scores.shape} for {len(self.tokens)} tokens"
            )
        self.low_score = float(self.low_score)
        self.high_score = float(self.high_score)

    @property
    def metric(self) -> str:
        return str(self.config.get("metric", "prob"))

    @property
    def num_layers(self) -> int:
        return int(self.scores.shape[1])

    def normalized(self) -> np.ndarray:
        """(score − low) / (high − low): 0 is the corrupted run, 1 the clean run."""
        span = self.high_score - self.low_score
        if span == 0:
            return np.full_like(self.scores, np.nan)
        return (self.scores - self.low_score) / span

    def indirect_effect(self) -> np.ndarray:
        """ROME's indirect effect: score − low."""
        return self.scores - self.low_score

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scores"] = self.scores.tolist()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TraceResult":
        return cls(**{**data, "scores": np.asarray(data["scores"], dtype=np.float64)})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=True)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the result as JSON; :meth:`load` gives back an equal result."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "TraceResult":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dataframe(self):
        """Long form: one row per (position, layer) with token, score, normalised score and the trace's labels."""
        import pandas as pd

        positions, layers = np.meshgrid(np.arange(self.scores.shape[0]), np.arange(self.scores.shape[1]), indexing="ij")
        boxes = (self.config.get("grid") or {}).get("boxes")
        regions = {}
        if boxes:  # image-side traces: where each position is, in fractions of the image (NaN for CLS)
            corners = np.array([box if box else [np.nan] * 4 for box in boxes], dtype=np.float64)[positions.ravel()]
            regions = {name: corners[:, i] for i, name in enumerate(("left", "top", "right", "bottom"))}
        return pd.DataFrame(
            {
                "position": positions.ravel(),
                "token": [self.tokens[p] for p in positions.ravel()],
                "layer": layers.ravel(),
                "score": self.scores.ravel(),
                "normalized": self.normalized().ravel(),
                "low_score": self.low_score,
                "high_score": self.high_score,
                "answer": self.answer,
                "block": self.block,
                "kind": self.kind,
                "window": self.window,
                "metric": self.metric,
                **regions,
            }
        )

    def plot(self, ax: Any = None, *, normalized: bool = False, title: str | None = None) -> Any:
        """A ROME-style heatmap (tokens down, layers across, colour bar of the score); returns the axes."""
        from .plotting import plot_trace

        return plot_trace(self, ax=ax, normalized=normalized, title=title)

    def plot_on_image(self, image: Any = None, *, layer: Any = None, normalized: bool = True, **kw: Any) -> Any:
        """For an image-side trace: each region's effect over the image, one panel per layer (see plotting)."""
        from .plotting import plot_on_image

        return plot_on_image(self, image, layer=layer, normalized=normalized, **kw)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TraceResult):
            return NotImplemented
        return self.to_json() == other.to_json()
