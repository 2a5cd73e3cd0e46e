"""A caption traced word by word: one heatmap per word, and where each word is carried.

    >>> from blip_trace_widgets import load_model, trace_caption, demo_samples
    >>> image, _, _ = demo_samples()[0]
    >>> traced = trace_caption(load_model("demo-caption"), image, samples=2)
    >>> traced.words
    ['a', 'red', 'triangle']
    >>> [row["word"] for row in traced.summary()]
    ['a', 'red', 'triangle']

Each word k of the caption (the model's own greedy caption, or one you supply, teacher-forced)
is scored given the prefix before it: ``trace(..., word=k)``; ``trace(..., word="all")`` and
:func:`~.tracing.trace_caption` give every word. One :class:`~.tracing.Tracer`
serves every word, so the clean pass and the corrupted image are computed once.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from ..core.names import BLOCK_LABELS, KIND_LABELS, facts
from .config import TraceConfig
from .results import TraceResult


@dataclass
class CaptionTrace:
    """One :class:`TraceResult` per word of a caption, in order."""

    prompt: str
    words: list[str]
    results: list[TraceResult]

    @property
    def caption(self) -> str:
        return " ".join(self.words)

    def summary(self) -> list[dict[str, Any]]:
        """Per word: its clean and corrupted scores, the total effect, and the cell whose restoring brings back
        the most (its layer, position, and that share of the total effect). For a decoder, also the best cell
        at an *earlier* position than the one that predicts the word (``earlier_*``): restoring the predicting
        position's last hidden state restores the word by construction, so the earlier positions say where else
        it is carried. ``tiny`` marks a word the corruption hardly moved, whose map is mostly noise."""
        rows = []
        for k, (word, result) in enumerate(zip(self.words, self.results)):
            effect = result.indirect_effect()
            total = result.total_effect
            row: dict[str, Any] = {"index": k, "word": word, "clean": result.high_score, "corrupted": result.low_score,
                                   "total_effect": total, "tiny": result.is_tiny()}
            for prefix, part in (("peak", effect), ("earlier", effect[:-1] if not facts(result.block).image_side else None)):
                if part is None or part.size == 0 or not np.isfinite(part).any():
                    row.update({f"{prefix}_layer": None, f"{prefix}_token": None, f"{prefix}_share": None})
                    continue
                position, layer = np.unravel_index(int(np.nanargmax(part)), part.shape)
                row.update({f"{prefix}_layer": int(layer), f"{prefix}_token": result.tokens[int(position)],
                            f"{prefix}_share": float(part[position, layer] / total) if total else None})
            rows.append(row)
        return rows

    def describe(self) -> str:
        """The summary in sentences, one per word, stating what this model shows."""
        if not self.results:
            return "no words"
        first = self.results[0]
        what = f"{BLOCK_LABELS.get(first.block, first.block)} {KIND_LABELS.get(first.kind, first.kind)}"
        lines = []
        for row in self.summary():
            if row["tiny"]:
                lines.append(f"{row['word']!r}: the corruption hardly changes it (total effect "
                             f"{row['total_effect']:.3g}); its map is noise")
                continue
            line = (f"{row['word']!r}: restoring {what} at {row['peak_token']!r}, layer {row['peak_layer']}, "
                    f"brings back {row['peak_share']:.0%} of the total effect ({row['total_effect']:.3g})")
            if row["earlier_token"] is not None and row["earlier_token"] != row["peak_token"]:
                line += (f"; at an earlier position, {row['earlier_token']!r} layer {row['earlier_layer']} brings back "
                         f"{row['earlier_share']:.0%}")
            lines.append(line)
        return "\n".join(lines)

    def to_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.summary())

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "words": list(self.words), "summary": self.summary(),
                "results": [result.to_dict() for result in self.results]}

    def to_json(self) -> str:
        """Strict JSON (no NaN): the results' own JSON, and the summary."""
        return json.dumps(self.to_dict(), allow_nan=False)

    def plot(self, *, normalized: bool = False) -> Any:
        from .plots import plot_traces

        return plot_traces(self.results, normalized=normalized)


class WordTracer(Protocol):
    """What tracing a caption word by word needs (a :class:`~.tracing.Tracer`)."""

    @property
    def question(self) -> str: ...

    def caption_words(self, caption: str | None = None) -> list[str]: ...

    def trace(self, config: TraceConfig | None = None, **overrides: Any) -> TraceResult: ...


def trace_words(tracer: WordTracer, config: TraceConfig,
                each: Callable[[int, str, TraceResult], None] | None = None) -> CaptionTrace:
    """Every word of the caption ``config`` scores (``config.answer``, or the model's own), ``config.word`` set to
    each in turn, on one tracer (the clean pass and the corrupted image are computed once); ``each(k, word,
    result)`` is told of every word as it is traced."""
    words = tracer.caption_words(config.answer)
    results = []
    for k, word in enumerate(words):
        results.append(tracer.trace(replace(config, word=k)))
        if each is not None:
            each(k, word, results[-1])
    return CaptionTrace(tracer.question, words, results)
