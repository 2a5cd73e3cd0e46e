"""TraceResult: one causal-trace heatmap with everything needed to read, plot and reload it.

    >>> import numpy as np
    >>> from blip_trace_widgets import TraceResult
    >>> r = TraceResult(scores=np.array([[0.5, 0.75]]), low_score=0.5, high_score=1.0, answer="red",
    ...                 tokens=["[CLS]"], block="question_encoder", kind="hidden", window=1, config={})
    >>> r.normalized().tolist(), r.total_effect
    ([[0.0, 0.5]], 0.5)

Results serialise to strict JSON (floats with full precision; NaN, which strict parsers
reject, is written as ``null``, and infinities as the strings ``"inf"`` and ``"-inf"``, so
that every value loads back as it was) and to a long-form pandas DataFrame, one row per
(position, layer).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..core.errors import BlipTraceError
from ..core.names import METRIC_LABELS, NEGATIVE_STDERRS, TINY_ABSOLUTE, TINY_EFFECT, VQA  # noqa: F401  (METRIC_LABELS: public here too)
from ..core.significance import Uncertainty
from ..models import heads
from ..models.heads import metric_label
from . import directions

#: Version of the saved JSON layout; files without one are version 1 (no stderr, NaN as bare tokens); version 2
#: has no per-draw effects (``draws``).
FORMAT_VERSION = 3
EXPORT_FORMATS = ("png", "json", "csv")


def _json_number(value: float) -> Any:
    """A float for strict JSON: itself when finite, None for NaN, "inf" or "-inf" for infinities."""
    if math.isfinite(value):
        return value
    return None if math.isnan(value) else ("inf" if value > 0 else "-inf")


def json_number(value: Any, name: str) -> float:
    """The float a strict-JSON value stands for (see :func:`_json_number`), or a clear error."""
    if value is None:
        return float("nan")
    if value in ("inf", "-inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BlipTraceError(f"the saved result's {name!r} holds {value!r}, not a number")
    return float(value)


def json_array(values: np.ndarray) -> list[Any]:
    """Nested lists of strict-JSON numbers (see :func:`_json_number`)."""
    return [[_json_number(v) for v in row] for row in values.tolist()]


def array_from_json(values: Any, name: str) -> np.ndarray:
    if not isinstance(values, list) or not all(isinstance(row, list) for row in values):
        raise BlipTraceError(f"the saved result's {name!r} is not a table of numbers")
    return np.array([[json_number(v, name) for v in row] for row in values], dtype=np.float64).reshape(len(values), -1)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return _json_number(value)
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def draws_from_json(values: Any) -> np.ndarray | None:
    """Per-draw effects [draws, rows, layers] from strict JSON (None when absent)."""
    if values is None:
        return None
    if not isinstance(values, list) or not values:
        raise BlipTraceError("the saved result's 'draws' is not a list of tables of numbers")
    return np.stack([array_from_json(table, "draws") for table in values])


def _as_floats(values: Any, name: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise BlipTraceError(f"{name} must be numbers, got {type(values).__name__} holding "
                             f"{np.asarray(values).dtype}") from None


def _checked_arrays(scores: Any, stderr: Any, positions: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Scores (and standard errors) as float64 positions x layers arrays, or a clear error."""
    if isinstance(scores, np.ndarray) and scores.dtype.kind not in "biuf" or isinstance(scores, str):
        raise BlipTraceError(f"scores must be numbers, got an array of {np.asarray(scores).dtype}")
    scores = _as_floats(scores, "scores")
    if scores.ndim != 2 or scores.shape[0] != positions:
        raise BlipTraceError(f"scores must be positions x layers with one token label per position, "
                             f"got {scores.shape} for {positions} tokens")
    if stderr is not None:
        stderr = _as_floats(stderr, "stderr")
        if stderr.shape != scores.shape:
            raise BlipTraceError(f"stderr has shape {stderr.shape}, scores {scores.shape}")
    return scores, stderr


def _absent_mask(config: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    """Cells without the restored sublayer, n/a: a Q-Former's layers without cross-attention, and the positions of
    InstructBLIP's instruction, which never cross-attend."""
    rows, layers = shape
    return (np.isin(np.arange(layers), config.get("absent_layers", []))[None, :]
            | np.isin(np.arange(rows), config.get("absent_positions", []))[:, None])


def _cell_mask(pairs: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A boolean map of ``shape`` true at the [row, layer] ``pairs`` of a result's config."""
    mask = np.zeros(shape, dtype=bool)
    for row, layer in pairs or []:
        mask[int(row), int(layer)] = True
    return mask


def _check_types(data: dict[str, Any]) -> None:
    """A clear error when a saved result's fields have the wrong types."""
    for key in ("answer", "block", "kind"):
        if not isinstance(data[key], str):
            raise BlipTraceError(f"the saved result's {key!r} must be text, got {data[key]!r}")
    if not isinstance(data["tokens"], list) or not all(isinstance(t, str) for t in data["tokens"]):
        raise BlipTraceError("the saved result's 'tokens' must be a list of texts")
    window = data["window"]
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise BlipTraceError(f"the saved result's 'window' must be a whole number >= 1, got {window!r}")
    if data.get("config") is not None and not isinstance(data["config"], dict):
        raise BlipTraceError("the saved result's 'config' must be an object")


def _fields_of(data: Any) -> dict[str, Any]:
    """TraceResult's fields from a saved result's JSON, checked."""
    required = ("scores", "low_score", "high_score", "answer", "tokens", "block", "kind", "window")
    if not isinstance(data, dict) or any(key not in data for key in required):
        missing = [k for k in required if not isinstance(data, dict) or k not in data]
        raise BlipTraceError(f"not a saved TraceResult (missing {', '.join(missing)}); "
                             "load a file written by TraceResult.save or blip-trace")
    version = data.get("format", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise BlipTraceError(f"this result's format is {version!r}, not a version (1 to {FORMAT_VERSION}); "
                             "load a file written by TraceResult.save or blip-trace")
    if version > FORMAT_VERSION:
        raise BlipTraceError(f"this result was saved in format {version!r}, newer than this version reads "
                             f"({FORMAT_VERSION}); upgrade blip-trace-widgets")
    _check_types(data)
    return {name: decode(data.get(name), name) for name, (_, decode) in JSON_FORMS.items()}


def _optional(codec: Any) -> Any:
    return lambda value, *name: None if value is None else codec(value, *name)


#: Each TraceResult field's strict-JSON form: (to JSON, from JSON); ``to_dict`` and ``from_dict`` are these, field
#: by field (a test checks every field has one).
JSON_FORMS: dict[str, tuple[Any, Any]] = {
    "scores": (json_array, array_from_json),
    "low_score": (_finite_or_none, json_number), "high_score": (_finite_or_none, json_number),
    "answer": (str, lambda value, name: value), "tokens": (list, lambda value, name: list(value)),
    "block": (str, lambda value, name: value), "kind": (str, lambda value, name: value),
    "window": (int, lambda value, name: value),
    "config": (_finite_or_none, lambda value, name: dict(value or {})),
    "stderr": (_optional(json_array), _optional(array_from_json)),
    "draws": (lambda draws: None if draws is None else [json_array(table) for table in draws],
              lambda value, name: draws_from_json(value)),
}


@dataclass(eq=False)
class TraceResult(Uncertainty):
    """Scores of restoring each (position, layer) cell, with the clean and corrupted baselines; ``stderr``: each
    cell's standard error over noise samples (NaN with one); ``total_effect``: ROME's, clean − corrupted;
    ``draws``: each noise sample's paired effect per cell [samples, positions, layers] (see :mod:`~.significance`),
    behind :meth:`statistics`, :meth:`significant` and :meth:`stability`."""

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
    draws: np.ndarray | None = None  # samples x positions x layers: each draw's paired effect
    #: The traced image, kept for plot_on_image; not saved.
    image: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.scores, self.stderr = _checked_arrays(self.scores, self.stderr, len(self.tokens))
        if self.draws is not None:
            self.draws = _as_floats(self.draws, "draws")
            if self.draws.ndim != 3 or self.draws.shape[1:] != self.scores.shape:
                raise BlipTraceError(f"draws has shape {self.draws.shape}, not (samples, *{self.scores.shape})")
        try:
            self.low_score = float(self.low_score)
            self.high_score = float(self.high_score)
        except (TypeError, ValueError):
            raise BlipTraceError("low_score and high_score must be numbers") from None

    @property
    def metric(self) -> str:
        return str(self.config.get("metric", "prob"))

    @property
    def head(self) -> str:
        """The model's head: "vqa", "caption", "itm" or "blip2" (results saved before captioning was traced are VQA)."""
        return str(self.config.get("head") or VQA)

    @property
    def scored(self) -> str:
        """What the scores are of, in words: "answer 'red'", "caption word 'red'" or "match with 'a red circle'"."""
        if "questions" in self.config:  # an average over a sweep
            return str(self.answer)
        return heads.of(self.head).scored_words(self.answer, self.config, self.metric)

    @property
    def is_estimate(self) -> bool:
        """Whether the scores are attribution-patching estimates (``method="estimate"``, or ``"verified"``:
        estimates except the :attr:`exact_cells`), not patched runs."""
        return self.config.get("method") in ("estimate", "verified")

    @property
    def unreliable_cells(self) -> np.ndarray:  # flagged by an order=2 or grad_drop estimate (Tracer.unreliable)
        return _cell_mask(self.config.get("unreliable_cells"), self.scores.shape)

    @property
    def absent_cells(self) -> np.ndarray:  # without the restored sublayer: n/a (see _absent_mask)
        return _absent_mask(self.config, self.scores.shape)

    @property
    def exact_cells(self) -> np.ndarray:
        """Which cells are patched runs: all for an exact trace, none for an estimate, the top ``verify`` cells
        (and any flagged ones) of a verified one."""
        if self.config.get("method") == "verified":
            return _cell_mask(self.config.get("exact_cells"), self.scores.shape)
        return np.full(self.scores.shape, not self.is_estimate)

    @property
    def num_layers(self) -> int:
        return int(self.scores.shape[1])

    @property
    def total_effect(self) -> float:
        """ROME's total effect: the clean score minus the corrupted one."""
        return self.high_score - self.low_score

    @property
    def floor(self) -> float:
        """The smallest total effect, in the metric's units, that is not noise (:data:`~.names.TINY_ABSOLUTE`)."""
        return TINY_ABSOLUTE.get(self.metric, 0.0)

    def is_tiny(self, threshold: float = TINY_EFFECT) -> bool:
        """Whether the corruption barely changes the score: |total effect| < threshold · |clean score|, or
        |total effect| below the metric's floor (:attr:`floor`: 0.01 for probabilities).

        Then the heatmap shows noise, and dividing by the total effect magnifies it.
        """
        return self.tiny_reason(threshold) is not None

    def tiny_reason(self, threshold: float = TINY_EFFECT) -> str | None:
        """Why the map is noise, naming the fix, or None when it is not."""
        return tiny_reason(self, threshold)

    def negative_cells(self) -> np.ndarray:
        """Cells that fall below the corrupted score (away from the clean one) by more than noise: by more than
        NEGATIVE_STDERRS standard errors over the noise samples and more than a tenth of the metric's floor
        (none when the map is tiny)."""
        return negative_cells(self)

    def normalized(self) -> np.ndarray:
        """The indirect effect over the total effect: (score − low) / (high − low) when denoising (0 is the
        corrupted run, 1 the clean run); (high − score) / (high − low) when noising (1: patching this cell alone
        takes the whole answer away). NaN when clean and corrupted are equal."""
        span = self.high_score - self.low_score
        if span == 0:
            return np.full_like(self.scores, np.nan)
        return self.indirect_effect() / span

    def indirect_effect(self) -> np.ndarray:
        """ROME's indirect effect, score − low; when noising, what a cell takes away, high − score. NaN for n/a
        cells (:attr:`absent_cells`), which have nothing to restore."""
        effect = directions.of(self.direction).effect(self.scores, low=self.low_score, high=self.high_score)
        return np.where(self.absent_cells, np.nan, effect)

    @property
    def direction(self) -> str:  # "denoise": clean states restored into the corrupted run; "noise": the reverse
        return str(self.config.get("direction") or "denoise")

    # ----- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, **{name: encode(getattr(self, name)) for name, (encode, _) in JSON_FORMS.items()}}

    @classmethod
    def from_dict(cls, data: Any) -> TraceResult:
        """The result a :meth:`to_dict` (or a saved file's JSON) describes; a clear error for anything else."""
        return cls(**_fields_of(data))

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
        return cls.from_dict(read_json(path))

    def to_dataframe(self) -> Any:
        """Long form: one row per (position, layer) with token, score, normalised score and the trace's labels
        (with ``exact``: whether the cell is a patched run, and ``unreliable``: flagged by an order=2 or grad_drop estimate)."""
        return _frame(self)

    def export(self, path: Union[str, os.PathLike], fmt: str | None = None, *, normalized: bool = False) -> Path:
        """Write the heatmap (``png``), the result (``json``) or its DataFrame (``csv``); ``fmt`` defaults
        to the path's suffix. The explorer's save buttons and the command line both use this."""
        return _export(self, Path(path), fmt, normalized)

    # ----- figures ---------------------------------------------------------------------------
    def plot(self, ax: Any = None, *, normalized: bool = False, title: str | None = None, show: str = "scores",
             **options: Any) -> Any:
        """A ROME-style heatmap (tokens down, layers across, colour bar of the score); returns the axes, which a
        notebook shows as the figure when they are a cell's value.

        ``show="stderr"`` draws each cell's standard error over noise samples instead; ``top`` and ``tiny``
        are :func:`~.plotting.plot_trace`'s.
        """
        from .plots import plot_trace

        return plot_trace(self, ax=ax, normalized=normalized, title=title, show=show, **options)

    def plot_on_image(self, image: Any = None, *, layer: Any = None, normalized: bool = True, **kw: Any) -> Any:
        """For an image-side trace: each region's effect over the image, one panel per layer (see plotting)."""
        from .plots import plot_on_image

        return plot_on_image(self, image, layer=layer, normalized=normalized, **kw)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TraceResult):
            return NotImplemented
        return self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]


def read_json(path: Union[str, os.PathLike]) -> Any:
    """The JSON a saved result's file holds, or a clear error naming what is wrong with the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise BlipTraceError(f"cannot read {str(path)!r}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise BlipTraceError(f"{str(path)!r} is not a text file; load a JSON file written by TraceResult.save "
                             "or blip-trace") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise BlipTraceError(f"{str(path)!r} is not valid JSON ({error.msg} at line {error.lineno}); "
                             "it may be truncated") from None


def _export(result: TraceResult, path: Path, fmt: str | None, normalized: bool) -> Path:
    """TraceResult.export."""
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in EXPORT_FORMATS:
        raise BlipTraceError(f"unknown export format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        return result.save(path)
    if fmt == "csv":
        result.to_dataframe().to_csv(path, index=False)
        return path
    from .plots import heatmap_png

    path.write_bytes(heatmap_png(result, normalized=normalized))
    return path


def tiny_reason(result: TraceResult, threshold: float = TINY_EFFECT) -> str | None:
    """Why ``result``'s map is noise, naming the fix, or None when it is not (see :meth:`TraceResult.is_tiny`)."""
    total, label = abs(result.total_effect), metric_label(result.metric, result.head)
    swap = str((result.config.get("corruption") or {}).get("type", "")) in ("image_swap", "word_swap")
    fix = "pick a counterfactual that changes the answer" if swap else "raise the noise level"
    if total == 0 or total < threshold * abs(result.high_score):
        return (f"total effect {result.total_effect:.3g} is under {threshold:g} of the clean score "
                f"{result.high_score:.3g}: {fix}")
    if total < result.floor:
        reason = f"total effect {result.total_effect:.3g} is under {result.floor:g}, the floor of {label}"
        if result.metric == "prob" and abs(result.high_score) < result.floor:
            return (reason + f": the clean {label} is itself only {result.high_score:.3g}, so there is almost nothing "
                    "to bring back; score what the model says, or use metric='logprob'")
        return reason + f": {fix}"
    return None


def negative_cells(result: TraceResult) -> np.ndarray:
    """The cells of ``result`` whose effect runs against the trace's direction (away from the clean score when
    restoring; past it when noising) and is real: significant where the cells are tested; else by more than
    NEGATIVE_STDERRS standard errors and a tenth of the metric's floor (none when the map is tiny)."""
    if result.is_tiny():
        return np.zeros(result.scores.shape, dtype=bool)
    toward_clean = 1.0 if result.total_effect >= 0 else -1.0  # a corruption that raised the score: mirrored
    with np.errstate(invalid="ignore"):
        against = toward_clean * result.indirect_effect() < 0
        stats = result.statistics()
        if stats.tested().any():
            return against & stats.significant() & (np.abs(stats.mean) > 0.1 * result.floor)
        stderr = np.nan_to_num(result.stderr, nan=0.0) if result.stderr is not None else np.zeros_like(result.scores)
        margin = np.maximum(NEGATIVE_STDERRS * stderr, 0.1 * result.floor)
        return against & (np.abs(result.indirect_effect()) > margin)


def _frame(result: TraceResult) -> Any:
    """TraceResult.to_dataframe."""
    import pandas as pd

    positions, layers = np.meshgrid(np.arange(result.scores.shape[0]), np.arange(result.scores.shape[1]), indexing="ij")
    boxes = (result.config.get("grid") or {}).get("boxes")
    regions = {}
    if boxes:  # image-side traces: where each position is, in fractions of the image (NaN for CLS)
        corners = np.array([box if box else [np.nan] * 4 for box in boxes], dtype=np.float64)[positions.ravel()]
        regions = {name: corners[:, i] for i, name in enumerate(("left", "top", "right", "bottom"))}
    stderr = result.stderr if result.stderr is not None else np.full_like(result.scores, np.nan)
    stats = result.statistics()
    low, high = stats.interval()
    keep = ~result.absent_cells.ravel()  # n/a cells have no row
    frame = pd.DataFrame({
        "position": positions.ravel(), "token": [result.tokens[p] for p in positions.ravel()], "layer": layers.ravel(),
        "score": result.scores.ravel(), "stderr": stderr.ravel(), "normalized": result.normalized().ravel(),
        "low_score": result.low_score, "high_score": result.high_score, "total_effect": result.total_effect,
        "answer": result.answer, "block": result.block, "kind": result.kind, "window": result.window, "metric": result.metric,
        "head": result.head, "exact": result.exact_cells.ravel(), "unreliable": result.unreliable_cells.ravel(), **regions,
        "effect": stats.mean.ravel(), "effect_stderr": stats.stderr.ravel(), "effect_low": low.ravel(),
        "effect_high": high.ravel(), "p_value": stats.pvalues.ravel(), "q_value": stats.qvalues.ravel(),
        "significant": stats.significant().ravel(), "samples": stats.samples,
    })
    return frame[keep].reset_index(drop=True)
