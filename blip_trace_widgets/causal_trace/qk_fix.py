"""The QK fix of an attribution-patching estimate: the next layer's attention softmax recomputed exactly.

    >>> import torch
    >>> from blip_trace_widgets.causal_trace.qk_fix import qk_correction
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k, dq, dk = (torch.randn(1, 2, 4, 3, generator=g, dtype=torch.float64) for _ in range(4))
    >>> scores = q @ k.transpose(-1, -2) / 3 ** 0.5
    >>> weights, grad_weights = scores.softmax(-1), torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64)
    >>> grad_scores = weights * (grad_weights - (weights * grad_weights).sum(-1, keepdim=True))
    >>> qk_correction(q, k, dq, dk, scores, weights, grad_scores, grad_weights).shape   # [samples, positions]
    torch.Size([1, 4])

Attribution patching linearises everything between a restored state and the score, the attention softmax
included. Where a softmax is saturated its gradient is about zero, and restoring a state that moves the
attention a lot is estimated to do nothing: a false negative (Kramár et al. 2024, "AtP*", arXiv 2403.00745, name
this failure and its fix; ``koayon/atp_star``'s ``atp_q_contribution``/``atp_k_contribution`` compute the
patched attention probabilities and take ``(A' − A) · ∂score/∂A``, which is what this module does for BLIP).

A hidden state of text layer ``l`` at position ``p`` is the input of layer ``l + 1``, whose self-attention reads
it as query ``p`` (row ``p`` of the attention) and as key ``p`` (column ``p`` of every row). With the fix, the part
of a cell's estimate that goes through those attention logits,

    first order:  Σ ΔL · ∂score/∂L                  (ΔL: the logits' first-order change),

is replaced by the change of the attention weights computed exactly, still taken linearly from there on,

    QK fix:       Σ (softmax(L + ΔL_exact) − softmax(L)) · ∂score/∂A.

Both sides are taken at the run the trace patches into (the corrupted run when denoising, the clean run when
noising). :func:`qk_correction` returns the difference, added to the plain estimate cell by cell; the gradients
come from :func:`attention_gradients`, one more forward and backward pass. The last layer's states feed no
attention of their block and keep the plain estimate. The vision encoder is pre-norm (its queries and keys read
``LayerNorm(h)``, not ``h``), and is not offered the fix.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models.blip.stacks import TextStack


@dataclass
class AttentionProbe:
    """Given to a text layer as its self-attention "cut": the softmax as usual, with zero leaves added to its logits
    and its weights so that a backward pass gives ∂score/∂logits and ∂score/∂weights; what it saw is kept."""

    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        logits_leaf = torch.zeros_like(scores, requires_grad=True)
        weights = torch.softmax(scores + logits_leaf, dim=-1)
        weights_leaf = torch.zeros_like(weights, requires_grad=True)
        self.seen.append((scores.detach(), weights.detach(), logits_leaf, weights_leaf))
        return weights + weights_leaf


@dataclass(frozen=True)
class LayerAttention:
    """One layer's self-attention on the base run, per sample: logits (the mask included) and weights, and the
    score's gradients with respect to each, [S, H, T, T]."""

    scores: torch.Tensor
    weights: torch.Tensor
    grad_scores: torch.Tensor
    grad_weights: torch.Tensor


def attention_gradients(stack: TextStack, start: torch.Tensor, cross: Any,
                        score: Callable[[torch.Tensor], torch.Tensor]) -> list[LayerAttention]:
    """One forward pass of ``stack`` from ``start`` [S, T, D] attending to ``cross``, scored per sample by ``score``
    (final states [S, 1, T, D] -> [S]), and one backward pass: every layer's self-attention and its gradients."""
    probes = [AttentionProbe() for _ in range(len(stack))]
    mask = stack.self_mask(start.shape[1], start.dtype, start.device)
    with torch.enable_grad():
        h = start[:, None]
        for j in range(len(stack)):
            h = stack.layer(j, h, cross[j], mask, cuts=(probes[j], None))
        leaves = [leaf for probe in probes for _, _, *pair in probe.seen for leaf in pair]
        grads = iter(torch.autograd.grad(score(h).sum(), leaves))
    return [LayerAttention(scores, weights, next(grads), next(grads))
            for probe in probes for scores, weights, _, _ in probe.seen]


def qk_correction(q: torch.Tensor, k: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, scores: torch.Tensor,
                  weights: torch.Tensor, grad_scores: torch.Tensor, grad_weights: torch.Tensor) -> torch.Tensor:
    """Per sample and position p, what the QK fix adds to the estimate of restoring the layer's input at p alone:
    the attention's exact change times ∂score/∂weights, minus its first-order change times ∂score/∂logits.

    ``q``, ``k``: the base run's queries and keys [S, H, T, d]; ``dq``, ``dk``: their change when the input at each
    position is restored (row p of ``dq`` moves query p only); ``scores``, ``weights``: the logits (mask included)
    and softmax [S, H, T, T]; ``grad_*``: the score's gradients with respect to them. Returns [S, T], float64."""
    q, k, dq, dk, scores, weights, grad_scores, grad_weights = (
        x.double() for x in (q, k, dq, dk, scores, weights, grad_scores, grad_weights))
    scale = 1.0 / math.sqrt(q.shape[-1])
    rows = torch.einsum("shpd,shtd->shpt", dq, k) * scale  # row p when query p moves: [S, H, P, T]
    cols = torch.einsum("shtd,shpd->shtp", q, dk) * scale  # column p when key p moves: [S, H, T, P]
    first = (rows * grad_scores).sum((1, 3)) + (cols * grad_scores).sum((1, 2))  # [S, P]
    positions = q.shape[2]
    # The exact logits with position p restored, for every p at once: [S, P, H, T, T].
    change = cols.permute(0, 3, 1, 2)[..., None].expand(-1, -1, -1, -1, positions).clone()
    eye = torch.eye(positions, dtype=torch.bool, device=q.device)
    change = change * eye[None, :, None, None, :]  # column p only
    both = torch.einsum("shpd,shpd->shp", q + dq, dk) * scale  # (q_p + Δq_p)·Δk_p: the entry (p, p) in full
    own_row = (rows + torch.diag_embed(both)).permute(0, 2, 1, 3)  # [S, P, H, T]: row p of cell p
    change[:, torch.arange(positions), :, torch.arange(positions), :] = own_row.permute(1, 0, 2, 3)
    patched = torch.softmax(scores[:, None] + change, dim=-1)
    exact = ((patched - weights[:, None]) * grad_weights[:, None]).sum((2, 3, 4))  # [S, P]
    return exact - first
