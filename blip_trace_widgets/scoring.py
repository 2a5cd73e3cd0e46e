"""Scores of the answer from decoder logits: p(answer), log p(answer) or a logit difference.

    >>> import torch
    >>> from blip_trace_widgets.scoring import score_rows
    >>> logits = torch.zeros(1, 1, 4)  # one row, one answer position, a vocabulary of 4
    >>> float(score_rows(logits, [2], "prob", None)[0])
    0.25
"""
from __future__ import annotations

import torch


def score_rows(logits: torch.Tensor, targets: list[int], metric: str, contrast: int | None) -> torch.Tensor:
    """Score each row of decoder logits [R, Td, V]; the Td-th position predicts targets[Td].

    A multi-token answer's probability is the product of its tokens' probabilities, summed in
    log space so that a long answer does not underflow before the exponential.
    """
    logits = logits.float()
    if metric == "logit_diff":
        return logits[:, 0, targets[0]] - logits[:, 0, contrast]
    logprobs = torch.log_softmax(logits, dim=-1)
    index = torch.tensor(targets, device=logits.device)
    total = logprobs[:, torch.arange(len(targets), device=logits.device), index].sum(-1)
    return total if metric == "logprob" else total.exp()
