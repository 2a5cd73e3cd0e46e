"""Lenses: what each state of a block already says, the logit lens and the tuned lens.

    >>> from blip_trace_widgets import load_model, demo_samples
    >>> from blip_trace_widgets.lenses import lens
    >>> image, question, _ = demo_samples()[0]
    >>> lens(load_model("demo-blip2"), image, question).labels[:3]
    ['q0', 'q1', 'q2']
"""
from __future__ import annotations

from .confidence import confidence, image_confidence
from .core import lens, query_words
from .result import LensResult
from .tuned import TunedLens, train_tuned_lens

__all__ = ["LensResult", "TunedLens", "confidence", "image_confidence", "lens", "query_words", "train_tuned_lens"]
