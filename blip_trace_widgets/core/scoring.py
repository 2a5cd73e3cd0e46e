"""What a trace scores (a :class:`Target`), and scores from a head's outputs.

    >>> import torch
    >>> from blip_trace_widgets.core.scoring import Target, score_rows
    >>> logits = torch.zeros(1, 1, 4)  # one row, one decoder position, a vocabulary of 4
    >>> round(float(score_rows(logits, Target(inputs=(0,), tokens=(2,)), "prob")[0]), 6)
    0.25
    >>> round(float(score_rows(torch.tensor([[0.0, 0.0]]), Target(inputs=(1, 2), readout="match"), "prob")[0]), 6)
    0.5

A target says which tokens a text block reads (``inputs``), and what is scored from the
head's outputs: for a decoder (VQA's answer, a caption word) the log-probabilities of
``tokens``, the first predicted at position ``offset``; for image-text matching the ITM
head's p(match), or the ITC cosine similarity. Targets are frozen, so they key caches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

Readout = Literal["decoder", "match", "itc"]


class Scores(NamedTuple):
    """Per cell: the mean score over noise samples, its standard error, and whether it is exact (a patched run)
    rather than estimated; ``draws``: each sample's score [samples, cells] where the cells share the corrupted
    draws (NaN for a cell not run; None when each cell has draws of its own). What every scorer returns
    (:class:`~.exact.ExactScorer`, :class:`~.estimates.Estimator`, :class:`~.exact.VerifiedScorer`)."""

    mean: np.ndarray
    stderr: np.ndarray
    exact: np.ndarray
    draws: np.ndarray | None = None


@dataclass(frozen=True)
class Target:
    """What one trace scores.

    ``inputs``: the token ids the scored text block reads (decoder inputs from its start token, or
    the ITM encoder's text). ``tokens``: the tokens scored (a decoder's); ``offset``: the decoder
    position that predicts ``tokens[0]``. ``contrast``: the token a logit difference compares with.
    ``readout``: "decoder" (a language-model head), "match" (the ITM head) or "itc" (cosine).
    """

    inputs: tuple[int, ...]
    tokens: tuple[int, ...] = ()
    offset: int = 0
    contrast: int | None = None
    readout: Readout = "decoder"

    @property
    def positions(self) -> int:
        """Positions of the scored text block that can change the score."""
        return self.offset + len(self.tokens) if self.readout == "decoder" else len(self.inputs)


def score_rows(outputs: torch.Tensor, target: Target, metric: str) -> torch.Tensor:
    """Score each row of a head's outputs: decoder logits [R, T, V], ITM logits [R, 2] or ITC cosines [R].

    A multi-token answer's probability is the product of its tokens' probabilities, summed in
    log space and in float64, so that a long answer does not underflow before the exponential (a
    float32 probability is 0 below 1e-45; a float64 one below 1e-308). Half-precision outputs are scored in
    float32; float32 and float64 ones in their own dtype, so a float64 model is scored to float64 rounding.
    """
    outputs = outputs if outputs.dtype in (torch.float32, torch.float64) else outputs.float()
    if target.readout == "itc":
        return outputs
    if target.readout == "match":
        logprobs = torch.log_softmax(outputs, dim=-1)[:, 1].double()
        return logprobs if metric == "logprob" else logprobs.exp()
    first = target.offset
    if metric == "logit_diff":
        return outputs[:, first, target.tokens[0]] - outputs[:, first, target.contrast]
    logprobs = torch.log_softmax(outputs[:, first : first + len(target.tokens)], dim=-1)
    index = torch.tensor(target.tokens, device=outputs.device)
    total = logprobs[:, torch.arange(len(target.tokens), device=outputs.device), index].double().sum(-1)
    return total if metric == "logprob" else total.exp()
