"""Internal confidence (Jiang et al., ICLR 2025, "Interpreting and editing vision-language representations to
mitigate hallucinations"): for each image position of BLIP-2's language model, the largest probability a word gets
under the logit lens over the layers.

    >>> from blip_trace_widgets import load_model, demo_samples
    >>> from blip_trace_widgets.lenses import confidence
    >>> image, question, _ = demo_samples()[0]           # a red triangle
    >>> table = confidence(load_model("demo-blip2"), image, ["red", "blue"])
    >>> table.shape, list(table.columns[:2])
    ((2, 8), ['q0', 'q1'])

A word the image shows should be more confident at some query than a word it does not: :func:`image_confidence`
takes the maximum over queries too. The lens reads one forward pass (the queries precede the prompt in a causal
language model, so BLIP-2's query states do not depend on the prompt; InstructBLIP's read the instruction through
the Q-Former: pass ``question``).
"""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from ..core.errors import BlipTraceError
from ..core.inputs import ImageLike
from ..core.names import LANGUAGE_MODEL
from ..models.heads import head_of_model
from ..models.loading import BlipBundle
from .core import QUERY_QUESTION, lens_log_probs
from .reading import check_bundle, read


def _word_ids(bundle: BlipBundle, words: Sequence[str]) -> list[int]:
    if isinstance(words, str) or not words:
        raise BlipTraceError("words=...: pass a list of words, such as ['red', 'blue']")
    task = head_of_model(bundle.model)
    return [int(task.answer_tokens(bundle.tokenizer, word, "word")[0]) for word in words]


def confidence(bundle: BlipBundle, image: ImageLike, words: Sequence[str], question: str | None = None) -> pd.DataFrame:
    """Words x image queries: the largest p(word) (its first token, as the model would say it) over the layers of
    the logit lens at each query position of the language model."""
    bundle = check_bundle(bundle)
    task = head_of_model(bundle.model)
    if task.decoder != LANGUAGE_MODEL:
        raise BlipTraceError(f"internal confidence reads the image queries of a BLIP-2 or InstructBLIP decoder-only "
                             f"language model; {task.a_model} has none: load one such as load_model('demo-blip2')")
    if question is None and task.reads_instruction:
        raise BlipTraceError("InstructBLIP's queries read the instruction: pass question='...'")
    ids = _word_ids(bundle, words)
    reading = read(bundle, image, question or QUERY_QUESTION, LANGUAGE_MODEL)
    logp = lens_log_probs(bundle, reading)[:, :reading.queries]  # [layers, queries, vocabulary]
    best = logp[..., ids].exp().amax(0)  # [queries, words]
    return pd.DataFrame(best.T.cpu().numpy().astype(float), index=pd.Index(list(words), name="word"),
                        columns=reading.labels[:reading.queries])


def image_confidence(bundle: BlipBundle, image: ImageLike, words: Sequence[str],
                     question: str | None = None) -> pd.Series:
    """Each word's internal confidence: the largest p(word) over every query and layer."""
    return confidence(bundle, image, words, question).max(axis=1)


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """The area under the ROC curve of ``positive`` against ``negative`` scores: P(positive > negative), ties half.

    >>> auroc([0.9, 0.8], [0.1, 0.85])
    0.75
    """
    pos, neg = torch.tensor(list(positive), dtype=torch.float64), torch.tensor(list(negative), dtype=torch.float64)
    if not len(pos) or not len(neg):
        raise BlipTraceError("AUROC needs at least one positive and one negative score")
    greater = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
    return float(greater.mean())
