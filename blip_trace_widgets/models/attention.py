"""Attention, piece by piece, shared by every stack: the per-head edits, the weights and contexts, and
knockout's cuts (:class:`Cut`, :class:`Dial`, the empty-row rules).

    >>> import torch
    >>> from blip_trace_widgets.models.attention import attend
    >>> q = k = v = torch.ones(1, 2, 3, 4)
    >>> attend(q, k, v, None).shape
    torch.Size([1, 2, 3, 4])
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..core.errors import BlipTraceError
from ..core.names import Kind

Cell = tuple[tuple[int, int], ...]  # ((layer, position), ...)


Edit = Callable[[str, torch.Tensor], torch.Tensor]


Progress = Callable[[int, int], None]


Cuts = tuple[Any, Any]  # (self-attention, cross-attention): a Cut, a Dial or None each


def no_edit(_kind: str, x: torch.Tensor) -> torch.Tensor:
    return x


class Stack(Protocol):
    """A transformer run layer by layer: what :func:`record_run` and :func:`staircase` need."""

    kinds: tuple[Kind, ...]

    def __len__(self) -> int: ...

    def self_mask(self, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None: ...

    def layer(self, j: int, h: torch.Tensor, cross: Any, mask: torch.Tensor | None = None,
              edit: Edit = ..., cuts: Cuts = ..., drop: bool = ...) -> torch.Tensor: ...


def edit_heads(edit: Edit, kind: str, ctx: torch.Tensor, heads: int) -> torch.Tensor:
    """``edit`` applied to an attention context [S, C, T, D] seen per head: as [S, C, H·T, D/H], unit ``h·T + t``
    being head h at position t. The engine's cells then index heads like positions; the context comes back
    [S, C, T, D] (the same tensor when nothing was edited)."""
    wanted = getattr(edit, "kinds", None)  # the kinds an edit touches, when it says
    if edit is no_edit or (wanted is not None and kind not in wanted):
        return ctx
    s, c, t, d = ctx.shape
    flat = ctx.reshape(s, c, t, heads, d // heads).transpose(2, 3).reshape(s, c, heads * t, d // heads)
    out = edit(kind, flat)
    if out is flat:
        return ctx
    return out.reshape(s, c, heads, t, d // heads).transpose(2, 3).reshape(s, c, t, d)


def head_unit(head: int, position: int, positions: int) -> int:
    """The unit of head ``head`` at ``position`` in :func:`edit_heads`'s per-head view."""
    return head * positions + position


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, cut: Cut | Dial | None = None,
             scaled: bool = True) -> torch.Tensor:
    """Attention weights as BLIP computes them: softmax(q k^T / sqrt(d) + mask), with ``cut`` edges knocked out
    (T5's, ``scaled=False``: without the 1 / sqrt(d), its relative position bias in ``mask``)."""
    scores = torch.matmul(q, k.transpose(-1, -2))
    if scaled:
        scores = scores / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    if cut is None:
        return torch.softmax(scores, dim=-1)
    return cut.apply(scores)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           cut: Cut | Dial | None = None, scaled: bool = True) -> torch.Tensor:
    """Scaled dot-product attention as BLIP computes it (eager, additive mask), ``cut`` edges knocked out."""
    return torch.matmul(attention_weights(q, k, mask, cut, scaled), v)


def cross_context(q: torch.Tensor, cross: tuple[torch.Tensor, torch.Tensor], cut: Cut | Dial | None,
                  scaled: bool = True) -> torch.Tensor:
    """Cross-attention's context [S, C, T, D] for queries ``q`` [S, C, T, D] (after the query projection) over
    keys and values [S, Ck, H, N, D/H]: with Ck == 1 the cells are folded into the query axis (one K/V per
    sample), else each row reads its own."""
    s, c, t, d = q.shape
    keys, values = cross
    heads, head_dim = keys.shape[2], keys.shape[-1]
    if keys.shape[1] == 1:
        qh = q.reshape(s, c * t, heads, head_dim).transpose(1, 2)
        ctx = attend(qh, keys[:, 0], values[:, 0], None, cut, scaled)
    else:
        qh = q.reshape(s * c, t, heads, head_dim).transpose(1, 2)
        n = keys.shape[-2]
        ctx = attend(qh, keys.reshape(s * c, heads, n, head_dim), values.reshape(s * c, heads, n, head_dim), None,
                     cut, scaled)
    return ctx.transpose(1, 2).reshape(s, c, t, d)


@dataclass(frozen=True)
class EmptyRow:
    """What a query reads when a knockout cuts every key it could read: one home for the rule's name, its label
    on figures and explorers, and its help on the command line."""

    name: str
    label: str  # a whole sentence, for figures and explorers
    help: str  # what such a query reads, after "reads" (the command line, the explorer's tooltip)


#: The rules for a query left with no key, by name (see :class:`Cut`).
EMPTY_ROWS: dict[str, EmptyRow] = {rule.name: rule for rule in (
    EmptyRow("zero", "a query with every key cut reads zero",
             "nothing, so its attention adds only its output bias (an ablation to zero)"),
    EmptyRow("mean", "a query with every key cut reads their mean",
             "the mean of the values it was cut from, as a softmax over equal minimum logits gives (Hugging Face's "
             "masking rule)"),
)}


DEFAULT_EMPTY = "zero"


def check_empty(empty: object) -> str:
    """``empty`` if it names a rule of :data:`EMPTY_ROWS`, else a clear error."""
    if not isinstance(empty, str) or empty not in EMPTY_ROWS:
        raise BlipTraceError(f"empty={empty!r}: use one of {', '.join(map(repr, EMPTY_ROWS))} (what a query with "
                             "every key cut reads)")
    return empty


def _visible_cut(edges: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Per query, the uniform weights over the cut keys its own mask let it read (the causal mask's future and
    padding never included), as ``scores``'s dtype; zero where there are none."""
    was = edges & (scores > torch.finfo(scores.dtype).min / 2)
    return (was / was.sum(-1, keepdim=True).clamp_min(1)).to(scores.dtype)


@dataclass
class Cut:
    """Attention edges knocked out at one layer: ``edges`` [R, T, M] is True where query t of row r may not read
    key m (R rows; the scores' batch holds S x R rows, or S rows with the R rows folded into the query axis).

    A knocked-out edge's logit is set to the dtype's minimum before the softmax. A query left with no edge at all
    reads, by ``empty`` (:data:`EMPTY_ROWS`): nothing (``"zero"``, a zero context), or the mean of the values of
    the keys it was cut from (``"mean"``, what a softmax over equal minimum logits gives; keys its block's own mask
    hides, such as a causal mask's future, are never read).
    """

    edges: torch.Tensor
    empty: str = DEFAULT_EMPTY

    def shaped(self, scores: torch.Tensor) -> torch.Tensor:
        """``edges`` broadcastable to ``scores`` [B, H, Q, M]."""
        r, t, m = self.edges.shape
        if scores.shape[-2] == t:  # one row of the batch per row
            return self.edges.repeat(scores.shape[0] // r, 1, 1)[:, None]
        return self.edges.reshape(r * t, m)  # rows folded into the query axis

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        low = torch.finfo(scores.dtype).min
        edges = self.shaped(scores)
        cut = scores.masked_fill(edges, low)
        weights = torch.softmax(cut, dim=-1)
        none_left = cut.amax(-1, keepdim=True) <= low / 2
        if self.empty == "mean":
            return torch.where(none_left, _visible_cut(edges, scores), weights)
        return weights.masked_fill(none_left, 0.0)


@dataclass
class Dial:
    """Edge groups whose weights are scaled, for gradients: ``edges`` [G, T, M] and ``scales`` [G] (1 is the clean
    run, 0 knocks the group out), applied in turn to every row. A query that keeps an edge of a group is
    renormalised, as the knockout's softmax is; one that keeps none shrinks with the scale toward what
    :class:`Cut` gives it by ``empty``: the zero context, or (``"mean"``) the mean of the values cut. At scale 0,
    one group alone gives :class:`Cut`'s weights."""

    edges: torch.Tensor
    scales: torch.Tensor
    empty: str = DEFAULT_EMPTY

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(scores, dim=-1)
        for edges, scale in zip(self.edges, self.scales):
            kept = (weights * ~edges).sum(-1, keepdim=True)
            scaled = weights * torch.where(edges, scale, torch.ones_like(scale))
            # renormalised to the mass it came with, so that a group at scale 1 is the identity for the others
            came = weights.sum(-1, keepdim=True)
            mass = came / scaled.sum(-1, keepdim=True)
            emptied = scaled
            if self.empty == "mean":  # the cut mass moves to the mean of the values cut, in proportion
                emptied = scaled + (1 - scale) * came * _visible_cut(edges.expand_as(scores), scores)
            weights = torch.where(kept > 0, scaled * mass, emptied)
        return weights
