"""The patching engine: BLIP's text transformer run layer by layer, many restorations per pass.

    >>> from blip_trace_widgets import load_model
    >>> from blip_trace_widgets.engine import TextStack
    >>> stack = TextStack(load_model("demo").model, "question_encoder")
    >>> len(stack) >= 4
    True

A *cell* is a set of (layer, position) pairs whose ``kind`` output is set to its clean
value in every corrupted row; a heatmap is a grid of cells. The engine scores many
cells at once and does each piece of shared work once:

* every cell x noise sample is one batch row, in chunks sized from a memory budget;
* the corrupted run is computed once, and a cell whose first restored layer is ``l``
  starts from that run's state at layer ``l`` (for ``hidden``, at ``l + 1``): the
  prefix is never recomputed;
* cross-attention keys and values of the (corrupted) image embeddings, or of the
  corrupted question for decoder traces, are computed once per noise sample. Cells are
  folded into the query axis, so all cells of a sample share one key/value tensor.

The arithmetic is BLIP's own post-LN BERT layer, built from the model's modules as
listed in :mod:`blip_trace_widgets.anatomy`; tests check it against the model's own
forward pass with hooks.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from . import anatomy
from .errors import BlipTraceError
from .names import (
    BLOCK_LABELS,
    CAUSAL_BLOCKS,
    DECODER_KINDS,
    SEVER_AT,
    TEXT_HEAD_KINDS,
    TEXT_KINDS,
    VISION_HEAD_KINDS,
    VISION_KINDS,
    Kind,
    kinds_of,
)

Cell = tuple[tuple[int, int], ...]  # ((layer, position), ...)
Edit = Callable[[str, torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]
Cuts = tuple[Any, Any]  # (self-attention, cross-attention): a Cut, a Dial or None each

DEFAULT_MEMORY_BUDGET = 128 << 20  # bytes of activations per chunk: faster than larger chunks on a CPU, and lean


def _no_edit(_kind: str, x: torch.Tensor) -> torch.Tensor:
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
    if edit is _no_edit or (wanted is not None and kind not in wanted):
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


def _weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, cut: Cut | Dial | None = None,
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
    return torch.matmul(_weights(q, k, mask, cut, scaled), v)


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


class TextStack:
    """One of BLIP's text transformers (question encoder, answer or caption decoder, ITM encoder), layer by layer."""

    kinds = (*TEXT_KINDS, *TEXT_HEAD_KINDS)

    def __init__(self, model: torch.nn.Module, block: str) -> None:
        self.block = anatomy.check_block(block)
        self.layers = anatomy.text_layers(model, block)
        self.embeddings = anatomy.text_embeddings(model, block) if block in anatomy.EMBEDDINGS else None
        self.heads = anatomy.num_heads(model, block)
        self.causal = block in CAUSAL_BLOCKS

    def has_cross(self, j: int) -> bool:
        """Whether layer j cross-attends (every BLIP text layer; a Q-Former layer every few)."""
        return self.layers[j].cross_query is not None

    @property
    def absent(self) -> dict[str, list[int]]:
        """Per kind, the layers where it does not exist (cross-attention in a Q-Former layer without it)."""
        layers = [j for j in range(len(self)) if not self.has_cross(j)]
        return {"cross_attn": layers, "cross_attn_head": layers} if layers else {}

    def __len__(self) -> int:
        return len(self.layers)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token + position embeddings of ``ids`` [1, T] -> [1, T, D]."""
        if self.embeddings is None:
            raise BlipTraceError(f"the {BLOCK_LABELS.get(self.block, self.block)} reads no tokens: its input is its "
                                 "learned queries")
        return self.embeddings(input_ids=ids)

    def self_mask(self, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        if not self.causal or length == 1:
            return None
        return torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """[B, M, D] -> [B, H, M, D/H]."""
        b, m, d = x.shape
        return x.view(b, m, self.heads, d // self.heads).transpose(1, 2)

    def self_qk(self, j: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer j's self-attention queries and keys for its input ``h`` [B, T, D]: [B, H, T, D/H] each."""
        L = self.layers[j]
        return self._split(L.self_query(h)), self._split(L.self_key(h))

    def self_attention(self, j: int, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Layer j's self-attention weights for its input ``h`` [B, T, D]: [B, H, T, T]."""
        return _weights(*self.self_qk(j, h), mask)

    def cross_attention(self, j: int, h1: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Layer j's cross-attention weights for its residual ``h1`` [B, T, D] over ``keys`` [B, H, N, D/H]:
        [B, H, T, N]."""
        query = self.layers[j].cross_query
        assert query is not None, "layer j has no cross-attention"
        return _weights(self._split(query(h1)), keys, None)

    def cross_input(self, run: Run, j: int) -> torch.Tensor:
        """What layer j's cross-attention reads in ``run``: the residual after its self-attention, h1."""
        return run.kinds["post_self_attn"][j]

    def cross_kv(self, j: int, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cross-attention keys and values of ``states`` [B, N, D'] at layer j: [B, H, N, D/H] each (None for a
        layer without cross-attention)."""
        layer = self.layers[j]
        if layer.cross_key is None or layer.cross_value is None:
            return None
        return self._split(layer.cross_key(states)), self._split(layer.cross_value(states))

    def layer(
        self,
        j: int,
        h: torch.Tensor,
        cross: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None = None,
        edit: Edit = _no_edit,
        cuts: Cuts = (None, None),
        drop: bool = False,
    ) -> torch.Tensor:
        """Layer j on ``h`` [S, C, T, D]: S samples x C cells.

        ``cross`` holds keys and values [S, Ck, H, N, D/H] (None at a layer without cross-attention), with
        Ck == 1 when every cell of a sample attends to the same states, or Ck == C.  ``edit(kind, x)``
        may replace each sublayer's output (see anatomy.KINDS), and each attention context per head
        (see :func:`edit_heads`). ``cuts`` knocks attention edges out of the (self-, cross-) attention. With
        ``drop`` the sublayers read their inputs detached: a backward pass then reaches the layer's input only along
        its skip connections (GradDrop's "layer dropped", see :mod:`~.estimates`); the forward values are the same.
        """
        L = self.layers[j]
        h1 = self._self_sublayer(L, h, mask, edit, cuts, drop)
        h2 = self._cross(L, h1, cross, edit, cuts, drop) if cross is not None else self._no_cross(h1, edit)
        m = edit("mlp", L.mlp_out(L.mlp_act(L.mlp_in(h2.detach() if drop else h2))))
        return edit("hidden", L.mlp_norm(m + h2))

    def _self_sublayer(self, L: Any, h: torch.Tensor, mask: torch.Tensor | None, edit: Edit, cuts: Cuts,
                       drop: bool) -> torch.Tensor:
        """The self-attention sublayer on ``h`` [S, C, T, D]: h1 = LN(h + SA(h))."""
        s, c, t, d = h.shape
        rows = h.reshape(s * c, t, d)
        read = rows.detach() if drop else rows
        ctx = attend(self._split(L.self_query(read)), self._split(L.self_key(read)), self._split(L.self_value(read)), mask,
                     cuts[0])
        ctx = edit_heads(edit, "self_attn_head", ctx.transpose(1, 2).reshape(s, c, t, d), self.heads)
        sa = edit("self_attn", L.self_out(ctx))
        return edit("post_self_attn", L.self_norm(sa + h))

    def _no_cross(self, h1: torch.Tensor, edit: Edit) -> torch.Tensor:
        """A layer without cross-attention (a Q-Former's): its cross-attention adds nothing, so its kinds are zero
        (restoring them changes nothing) and the residual after it is ``h1``."""
        ctx = edit_heads(edit, "cross_attn_head", torch.zeros_like(h1), self.heads)
        return edit("post_cross_attn", h1 + edit("cross_attn", ctx * 0.0))  # (ctx in the graph: its gradient is 0)

    def _cross(self, L: Any, h1: torch.Tensor, cross: tuple[torch.Tensor, torch.Tensor], edit: Edit, cuts: Cuts,
               drop: bool) -> torch.Tensor:
        """The cross-attention sublayer on ``h1`` [S, C, T, D]: h2 = LN(h1 + XA(h1))."""
        ctx = edit_heads(edit, "cross_attn_head", self._cross_context(L, h1, cross, cuts[1], drop), self.heads)
        ca = edit("cross_attn", L.cross_out(ctx))
        return edit("post_cross_attn", L.cross_norm(ca + h1))

    def _cross_context(self, L: Any, h1: torch.Tensor, cross: tuple[torch.Tensor, torch.Tensor], cut: Cut | Dial | None,
                       drop: bool) -> torch.Tensor:
        """The cross-attention's context [S, C, T, D] for ``h1`` [S, C, T, D], before its output projection."""
        return cross_context(L.cross_query(h1.detach() if drop else h1), cross, cut)


class VisionStack:
    """BLIP's vision encoder (a pre-LN ViT), layer by layer, in the same interface as :class:`TextStack`."""

    kinds = (*VISION_KINDS, *VISION_HEAD_KINDS)

    def __init__(self, model: torch.nn.Module) -> None:
        self.block = anatomy.VISION_BLOCK
        self.layers = anatomy.vision_layers(model)
        self.embeddings = anatomy.vision_embeddings(model)
        self.post_norm = anatomy.vision_post_norm(model)
        self.heads = anatomy.vision_heads(model)

    def __len__(self) -> int:
        return len(self.layers)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch embeddings with CLS and positions: [B, 3, H, W] -> [B, 1 + g*g, D]."""
        return self.embeddings(pixels)

    def self_mask(self, length: int, dtype: torch.dtype, device: torch.device) -> None:
        return None

    def no_cross(self) -> list[None]:
        return [None] * len(self)

    def run(self, pixels: torch.Tensor) -> torch.Tensor:
        """The vision encoder's output (after its final LayerNorm) for ``pixels``, without recording."""
        h = self.embed(pixels)[:, None]
        for j in range(len(self)):
            h = self.layer(j, h)
        return self.post_norm(h[:, 0])

    def self_attention(self, j: int, h: torch.Tensor, mask: Any = None) -> torch.Tensor:
        """Layer j's self-attention weights for its input ``h`` [B, N, D]: [B, H, N, N]."""
        L = self.layers[j]
        b, n, d = h.shape
        qkv = L.qkv(L.norm1(h)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return _weights(qkv[0], qkv[1], None)

    def layer(self, j: int, h: torch.Tensor, cross: Any = None, mask: Any = None, edit: Edit = _no_edit,
              cuts: Cuts = (None, None), drop: bool = False) -> torch.Tensor:
        """Layer j on ``h`` [S, C, N, D]; ``edit(kind, x)`` may replace the self-attention, MLP or layer output;
        ``cuts[0]`` knocks self-attention edges out; ``drop`` detaches the sublayers' inputs (as for text layers)."""
        L = self.layers[j]
        s, c, n, d = h.shape
        rows = h.reshape(s * c, n, d)
        read = rows.detach() if drop else rows
        qkv = L.qkv(L.norm1(read)).reshape(s * c, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        ctx = attend(qkv[0], qkv[1], qkv[2], None, cuts[0])
        ctx = edit_heads(edit, "attn_head", ctx.transpose(1, 2).reshape(s, c, n, d), self.heads)
        sa = edit("self_attn", L.attn_out(ctx))
        h1 = h + sa
        m = edit("mlp", L.fc2(L.act(L.fc1(L.norm2(h1.detach() if drop else h1)))))
        return edit("hidden", h1 + m)


class QFormerStack(TextStack):
    """BLIP-2's Q-Former, layer by layer: a post-LN BERT whose positions are learned queries, which cross-attend to
    the image every ``cross_attention_frequency`` layers and run their own feed-forward. InstructBLIP's also reads
    the instruction: tokens after the queries, which attend to the queries and each other but not to the image,
    and run the layer's other feed-forward (``intermediate``/``output``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model, anatomy.QFORMER)
        self.query_tokens, self.norm = anatomy.queries(model)
        self.instruction = anatomy.instruction_embeddings(model)
        self.count = int(self.query_tokens.shape[1])

    def queries(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The Q-Former's input after its first LayerNorm, [1, Q (+ T), D]: its learned queries, then (InstructBLIP)
        the instruction ``ids`` [1, T] embedded with their learned positions."""
        h = self.query_tokens
        if ids is not None and ids.shape[1]:
            if self.instruction is None:
                raise BlipTraceError("BLIP-2's Q-Former reads no text: only InstructBLIP's reads an instruction")
            words, positions = self.instruction
            text = words(ids) + positions(torch.arange(ids.shape[1], device=ids.device))[None]
            h = torch.cat([h, text.to(h.dtype)], 1)
        return self.norm(h.to(self.norm.weight.dtype))

    def layer(self, j: int, h: torch.Tensor, cross: tuple[torch.Tensor, torch.Tensor] | None,
              mask: torch.Tensor | None = None, edit: Edit = _no_edit, cuts: Cuts = (None, None),
              drop: bool = False) -> torch.Tensor:
        """Layer j on ``h`` [S, C, Q + T, D]: as BLIP-2's on the queries; the instruction's T positions attend (self)
        but never cross-attend (their cross kinds are zero, the residual after it ``h1``) and run the text MLP."""
        q = self.count
        if h.shape[2] == q:
            return super().layer(j, h, cross, mask, edit, cuts, drop)
        L = self.layers[j]
        if L.text_mlp_in is None or L.text_mlp_act is None or L.text_mlp_out is None or L.text_mlp_norm is None:
            raise BlipTraceError("this Q-Former has no feed-forward for text (BLIP-2's): it reads only its queries")
        h1 = self._self_sublayer(L, h, mask, edit, cuts, drop)
        if cross is None:
            h2 = self._no_cross(h1, edit)
        else:
            assert L.cross_out is not None and L.cross_norm is not None, "a layer with cross keys has cross-attention"
            cut = cuts[1] if cuts[1] is None else replace(cuts[1], edges=cuts[1].edges[:, :q])  # queries' rows only
            ctx = torch.cat([self._cross_context(L, h1[:, :, :q], cross, cut, drop), torch.zeros_like(h1[:, :, q:])], 2)
            ctx = edit_heads(edit, "cross_attn_head", ctx, self.heads)
            ca = edit("cross_attn", torch.cat([L.cross_out(ctx[:, :, :q]), torch.zeros_like(h1[:, :, q:])], 2))
            h2 = edit("post_cross_attn", torch.cat([L.cross_norm(ca[:, :, :q] + h1[:, :, :q]), h1[:, :, q:]], 2))
        read = h2.detach() if drop else h2
        m = edit("mlp", torch.cat([L.mlp_out(L.mlp_act(L.mlp_in(read[:, :, :q]))),
                                   L.text_mlp_out(L.text_mlp_act(L.text_mlp_in(read[:, :, q:])))], 2))
        return edit("hidden", torch.cat([L.mlp_norm(m[:, :, :q] + h2[:, :, :q]),
                                         L.text_mlp_norm(m[:, :, q:] + h2[:, :, q:])], 2))


def _text_states(tokens: Any, ids: torch.Tensor, image: torch.Tensor, prompt: torch.Tensor | None) -> torch.Tensor:
    """A language model's text embeddings [..., T, D] of ``ids`` [1, T], shaped as ``image`` [..., Q, D] is; with
    ``prompt`` [S, P, D] in place of the first P (a corrupted question)."""
    text = tokens(ids)[0].expand(*image.shape[:-2], -1, -1).to(image.dtype)
    if prompt is None:
        return text
    if prompt.dim() < text.dim():  # one prompt per sample, every cell of it: [S, P, D] -> [S, C, P, D]
        prompt = prompt[:, None].expand(-1, text.shape[1], -1, -1)
    return torch.cat([prompt.to(image.dtype), text[..., prompt.shape[-2]:, :]], -2)


class DecoderStack:
    """BLIP-2's language model (a pre-LN causal OPT decoder), layer by layer, in the interface of :class:`TextStack`.
    Its input is the projected queries followed by the text's token embeddings, plus learned positions."""

    kinds = (*DECODER_KINDS, "self_attn_head")
    causal = True

    def __init__(self, model: torch.nn.Module) -> None:
        self.block = anatomy.LANGUAGE_MODEL
        self.layers = anatomy.decoder_layers(model)
        parts = anatomy.language_model_parts(model)
        self.projection, self.tokens, self.positions = parts["projection"], parts["tokens"], parts["positions"]
        self.final_norm, self.head = parts["final_norm"], parts["head"]
        self.heads = anatomy.num_heads(model, anatomy.LANGUAGE_MODEL)
        self.count = int(anatomy.queries(model)[0].shape[1])  # the Q-Former's queries, the image's positions here
        self.absent: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.layers)

    def embed(self, queries: torch.Tensor, ids: torch.Tensor, projected: bool = False,
              prompt: torch.Tensor | None = None) -> torch.Tensor:
        """The first states [..., Q + T, D]: Q-Former outputs [..., Q (+ T'), Dq] projected (the first Q, its
        queries': InstructBLIP's instruction outputs are not read; ``projected``: they are already), then the tokens
        ``ids`` [1, T] embedded (``prompt`` [S, P, D]: the first P, corrupted), plus OPT's learned positions (offset
        by 2, as OPT's own embedding is)."""
        image = queries if projected else self.projection(queries[..., : self.count, :])
        h = torch.cat([image, _text_states(self.tokens, ids, image, prompt)], -2)
        index = torch.arange(h.shape[-2], device=h.device) + int(getattr(self.positions, "offset", 2))
        return h + self.positions.weight[index].to(h.dtype)

    def logits(self, final: torch.Tensor) -> torch.Tensor:
        return self.head(self.final_norm(final))

    def self_mask(self, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        if length == 1:
            return None
        return torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, m, d = x.shape
        return x.view(b, m, self.heads, d // self.heads).transpose(1, 2)

    def self_attention(self, j: int, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Layer j's self-attention weights for its input ``h`` [B, T, D]: [B, H, T, T]."""
        L = self.layers[j]
        x = L.norm1(h)
        return _weights(self._split(L.query(x)), self._split(L.key(x)), mask)

    def layer(self, j: int, h: torch.Tensor, cross: Any = None, mask: torch.Tensor | None = None,
              edit: Edit = _no_edit, cuts: Cuts = (None, None), drop: bool = False) -> torch.Tensor:
        """Layer j on ``h`` [S, C, T, D]: h1 = h + SA(LN1(h)), h2 = h1 + MLP(LN2(h1)); ``edit``, ``cuts`` and ``drop``
        as for :class:`TextStack` (``cuts[0]``: self-attention)."""
        L = self.layers[j]
        s, c, t, d = h.shape
        rows = h.reshape(s * c, t, d)
        x = L.norm1(rows.detach() if drop else rows)
        ctx = attend(self._split(L.query(x)), self._split(L.key(x)), self._split(L.value(x)), mask, cuts[0])
        ctx = edit_heads(edit, "self_attn_head", ctx.transpose(1, 2).reshape(s, c, t, d), self.heads)
        h1 = h + edit("self_attn", L.attn_out(ctx))
        m = edit("mlp", L.fc2(L.act(L.fc1(L.norm2(h1.detach() if drop else h1)))))
        return edit("hidden", h1 + m)


class LlamaStack(DecoderStack):
    """BLIP-2's or InstructBLIP's LLaMA (Vicuna) language model, layer by layer, as :class:`DecoderStack` runs OPT:
    pre-RMSNorm layers h1 = h + SA(LN1(h)), h2 = h1 + MLP(LN2(h1)), but with rotary positions on the queries and
    keys (as ``apply_rotary_pos_emb`` rotates them), grouped keys and values, and a gated MLP (the model's module)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        config = anatomy.text_config(model)
        self.rotary = anatomy.language_model_parts(model)["rotary"]
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.groups = int(config.num_attention_heads) // int(getattr(config, "num_key_value_heads", None)
                                                             or config.num_attention_heads)

    def embed(self, queries: torch.Tensor, ids: torch.Tensor, projected: bool = False,
              prompt: torch.Tensor | None = None) -> torch.Tensor:
        """As OPT's, without learned positions: the rotary embedding rotates each layer's queries and keys."""
        image = queries if projected else self.projection(queries[..., : self.count, :])
        return torch.cat([image, _text_states(self.tokens, ids, image, prompt)], -2)

    def _qkv(self, L: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer L's queries, keys and values of its normed input ``x`` [B, T, D], rotated and with the key/value
        heads repeated for their groups: [B, H, T, D/H] each."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

        b, t, _ = x.shape
        q, k, v = (proj(x).view(b, t, -1, self.head_dim).transpose(1, 2) for proj in (L.query, L.key, L.value))
        cos, sin = self.rotary(x, torch.arange(t, device=x.device)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, repeat_kv(k, self.groups), repeat_kv(v, self.groups)

    def self_attention(self, j: int, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Layer j's self-attention weights for its input ``h`` [B, T, D]: [B, H, T, T]."""
        q, k, _ = self._qkv(self.layers[j], self.layers[j].norm1(h))
        return _weights(q, k, mask)

    def layer(self, j: int, h: torch.Tensor, cross: Any = None, mask: torch.Tensor | None = None,
              edit: Edit = _no_edit, cuts: Cuts = (None, None), drop: bool = False) -> torch.Tensor:
        """Layer j on ``h`` [S, C, T, D]; ``edit``, ``cuts`` and ``drop`` as for :class:`TextStack`."""
        L = self.layers[j]
        s, c, t, d = h.shape
        rows = h.reshape(s * c, t, d)
        ctx = attend(*self._qkv(L, L.norm1(rows.detach() if drop else rows)), mask, cuts[0])
        ctx = edit_heads(edit, "self_attn_head", ctx.transpose(1, 2).reshape(s, c, t, -1), self.heads)
        h1 = h + edit("self_attn", L.attn_out(ctx))
        m = edit("mlp", L.mlp(L.norm2(h1.detach() if drop else h1)))
        return edit("hidden", h1 + m)


def language_model_stack(model: torch.nn.Module) -> DecoderStack:
    """The stack of ``model``'s decoder-only language model: OPT's, or LLaMA's (rotary positions)."""
    return LlamaStack(model) if anatomy.language_model_row(model).rotary else DecoderStack(model)


class T5Stack:
    """A Flan-T5 language model's encoder or decoder, layer by layer, in the interface of :class:`TextStack`. Its
    layers are pre-LN (RMSNorm): h1 = h + SA(LN(h)), in the decoder h2 = h1 + XA(LN(h1)) over the encoder's output,
    then h3 = h2 + FF(LN(h2)); attention is unscaled, with a relative position bias that the first layer computes
    and every layer adds (:meth:`self_mask` returns it, with the decoder's causal mask)."""

    def __init__(self, model: torch.nn.Module, block: str) -> None:
        self.block = block
        self.layers = anatomy.t5_layers(model, block)
        self.bias = anatomy.t5_position_bias(model, block)
        parts = anatomy.t5_parts(model)
        self.projection, self.tokens, self.head = parts["projection"], parts["tokens"], parts["head"]
        self.final_norm = parts["encoder_norm" if block == anatomy.LM_ENCODER else "decoder_norm"]
        config = anatomy.text_config(model)
        self.heads = int(config.num_heads)
        self.causal = block in CAUSAL_BLOCKS
        self.kinds = kinds_of(block)
        # T5 scales its decoder's output by d_model^-0.5 before a head tied to the embeddings (not Flan-T5's)
        scaled = getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", True))
        self.output_scale = float(config.d_model) ** -0.5 if scaled else 1.0
        self.count = int(anatomy.queries(model)[0].shape[1])
        self.absent: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.layers)

    def embed(self, queries: torch.Tensor, ids: torch.Tensor, projected: bool = False,
              prompt: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's first states [..., Q + T, D]: the Q-Former's first Q outputs [..., Q (+ T'), Dq] projected
        (``projected``: they are already), then the tokens ``ids`` [1, T] embedded (``prompt`` [S, P, D]: the first
        P, corrupted; T5 adds no positions: its attention's bias holds them)."""
        image = queries if projected else self.projection(queries[..., : self.count, :])
        return torch.cat([image, _text_states(self.tokens, ids, image, prompt)], -2)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The decoder's first states [1, T, D]: its tokens ``ids`` [1, T] embedded."""
        return self.tokens(ids)

    def output(self, final: torch.Tensor) -> torch.Tensor:
        """The final norm of the last layer's states: the encoder's output, what the decoder reads."""
        return self.final_norm(final)

    def logits(self, final: torch.Tensor) -> torch.Tensor:
        return self.head(self.final_norm(final) * self.output_scale)

    def self_mask(self, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The relative position bias [1, H, T, T] every layer adds to its self-attention's scores, and in the
        decoder the causal mask."""
        bias = self.bias.compute_bias(length, length, device=device).to(dtype)
        if not self.causal:
            return bias
        future = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
        return bias.masked_fill(future, torch.finfo(dtype).min)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, m, d = x.shape
        return x.view(b, m, self.heads, d // self.heads).transpose(1, 2)

    def cross_input(self, run: Run, j: int) -> torch.Tensor:
        """What layer j's cross-attention reads in ``run``: the residual after its self-attention, h + SA."""
        return run.inputs[j] + run.kinds["self_attn"][j]

    def cross_kv(self, j: int, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The decoder's cross-attention keys and values of the encoder's output ``states`` [B, N, D] at layer j
        (None in the encoder)."""
        layer = self.layers[j]
        if layer.cross_key is None or layer.cross_value is None:
            return None
        return self._split(layer.cross_key(states)), self._split(layer.cross_value(states))

    def self_attention(self, j: int, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Layer j's self-attention weights for its input ``h`` [B, T, D]: [B, H, T, T]."""
        L = self.layers[j]
        x = L.norm1(h)
        return _weights(self._split(L.query(x)), self._split(L.key(x)), mask, scaled=False)

    def cross_attention(self, j: int, h1: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Layer j's cross-attention weights for its residual ``h1`` [B, T, D] over ``keys`` [B, H, N, D/H]."""
        L = self.layers[j]
        assert L.cross_query is not None and L.cross_norm is not None, "the encoder has no cross-attention"
        return _weights(self._split(L.cross_query(L.cross_norm(h1))), keys, None, scaled=False)

    def layer(self, j: int, h: torch.Tensor, cross: tuple[torch.Tensor, torch.Tensor] | None = None,
              mask: torch.Tensor | None = None, edit: Edit = _no_edit, cuts: Cuts = (None, None),
              drop: bool = False) -> torch.Tensor:
        """Layer j on ``h`` [S, C, T, D]; ``edit``, ``cuts`` and ``drop`` as for :class:`TextStack`."""
        L = self.layers[j]
        s, c, t, d = h.shape
        rows = h.reshape(s * c, t, d)
        x = L.norm1(rows.detach() if drop else rows)
        ctx = attend(self._split(L.query(x)), self._split(L.key(x)), self._split(L.value(x)), mask, cuts[0], False)
        ctx = edit_heads(edit, "self_attn_head", ctx.transpose(1, 2).reshape(s, c, t, -1), self.heads)
        h1 = h + edit("self_attn", L.attn_out(ctx))
        if cross is not None:
            assert L.cross_query is not None and L.cross_norm is not None and L.cross_out is not None
            q = L.cross_query(L.cross_norm(h1.detach() if drop else h1))
            ctx = edit_heads(edit, "cross_attn_head", cross_context(q, cross, cuts[1], scaled=False), self.heads)
            h1 = h1 + edit("cross_attn", L.cross_out(ctx))
        m = edit("mlp", L.mlp(L.norm2(h1.detach() if drop else h1)))
        return edit("hidden", h1 + m)


@dataclass
class Run:
    """A recorded pass over one stack: layer inputs (``inputs[L]`` is the output) and kind outputs.

    Every tensor is [S, T, D], S = 1 for the clean run.
    """

    inputs: list[torch.Tensor]
    kinds: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    @property
    def output(self) -> torch.Tensor:
        return self.inputs[-1]


def record_run(stack: Stack, h0: torch.Tensor, cross: Sequence[Any]) -> Run:
    """Run ``stack`` on ``h0`` [S, T, D] without patches, keeping every state a trace restores."""
    mask = stack.self_mask(h0.shape[1], h0.dtype, h0.device)
    run = Run(inputs=[h0], kinds={kind: [] for kind in stack.kinds})

    def keep(kind: str, x: torch.Tensor) -> torch.Tensor:
        run.kinds[kind].append(x[:, 0])
        return x

    h = h0[:, None]
    for j in range(len(stack)):
        h = stack.layer(j, h, cross[j], mask, keep)
        run.inputs.append(h[:, 0])
    return run


def shared_cross(stack: Any, states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer cross K/V of ``states`` [S, N, D'], shaped [S, 1, H, N, D/H] for sharing."""
    out: list[Any] = []
    for j in range(len(stack)):
        kv = stack.cross_kv(j, states)
        out.append(None if kv is None else (kv[0][:, None], kv[1][:, None]))
    return out


def window_layers(layer: int, window: int, num_layers: int) -> range:
    """ROME's window: ``window`` consecutive layers centred on ``layer``, clipped at the ends."""
    return range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2)))


def grid_cells(positions: int, num_layers: int, window: int) -> list[Cell]:
    """The cells of a heatmap, position-major: cell (p, l) restores ``window`` layers around l at p."""
    return group_cells([[p] for p in range(positions)], num_layers, window)


def group_cells(groups: Sequence[Sequence[int]], num_layers: int, window: int) -> list[Cell]:
    """Cells that restore each group of positions together (an image region), group-major."""
    return [
        tuple((j, p) for j in window_layers(layer, window, num_layers) for p in group)
        for group in groups
        for layer in range(num_layers)
    ]


def cell_pairs(cells: Sequence[Cell], device: torch.device, *, every_layer: bool) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the (cell index, position) pairs as two index tensors.

    ``every_layer``: key -1 holds each cell's positions once, for edits that apply at every layer.
    """
    pairs: dict[int, tuple[list[int], list[int]]] = {}
    for ci, cell in enumerate(cells):
        if every_layer:
            for pos in sorted({pos for _, pos in cell}):
                pairs.setdefault(-1, ([], []))[0].append(ci)
                pairs[-1][1].append(pos)
        else:
            for layer, pos in cell:
                pairs.setdefault(layer, ([], []))[0].append(ci)
                pairs[layer][1].append(pos)
    return {layer: (torch.tensor(c, device=device), torch.tensor(p, device=device)) for layer, (c, p) in pairs.items()}


def _set(x: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor], values: torch.Tensor, first_cell: int) -> torch.Tensor:
    """``x`` [S, C', T, D] with ``values`` [T, D] or [S, T, D] written at the index pairs of cells from ``first_cell``."""
    cells, positions = index
    keep = (cells >= first_cell) & (cells < first_cell + x.shape[1])
    if not bool(keep.any()):
        return x
    cells, positions = cells[keep] - first_cell, positions[keep]
    x = x.clone()
    x[:, cells, positions] = values[..., positions, :]
    return x


@dataclass
class ChunkEdits:
    """Which (cell, position) pairs each layer restores, and which it severs, as index tensors.

    Severing holds the ``sever`` sublayer at its corrupted values at every layer: at the
    positions each cell restores (``sever_at="restored"``, ROME's frozen-MLP procedure),
    or at every position (``"all"``).
    """

    kind: str
    clean: list[torch.Tensor]  # per layer, [T, D]
    by_layer: dict[int, tuple[torch.Tensor, torch.Tensor]]
    sever: str | None = None
    severed: list[torch.Tensor] | None = None  # per layer, [S, T, D]
    sever_at: str = "restored"
    sever_index: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build(cls, kind: str, clean: list[torch.Tensor], cells: Sequence[Cell], device: torch.device,
              sever: str | None = None, severed: list[torch.Tensor] | None = None,
              sever_at: str = "restored") -> ChunkEdits:
        if sever_at not in SEVER_AT:
            raise BlipTraceError(f"unknown sever_at {sever_at!r}: use one of {', '.join(SEVER_AT)}")
        sever_index = cell_pairs(cells, device, every_layer=True).get(-1) if sever and sever_at == "restored" else None
        return cls(kind=kind, clean=clean, by_layer=cell_pairs(cells, device, every_layer=False), sever=sever,
                   severed=severed, sever_at=sever_at, sever_index=sever_index)

    def restore(self, j: int, x: torch.Tensor, first_cell: int = 0) -> torch.Tensor:
        """Set restored positions of layer j in ``x`` [S, C', T, D] (cells from ``first_cell``)."""
        if j not in self.by_layer:
            return x
        return _set(x, self.by_layer[j], self.clean[j], first_cell)

    def hold(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """The severed sublayer's output at layer j: its corrupted values where this edit severs."""
        assert self.severed is not None
        if self.sever_at == "all":
            return self.severed[j][:, None].expand_as(x)
        if self.sever_index is None:
            return x
        return _set(x, self.sever_index, self.severed[j], 0)

    def at(self, j: int) -> Edit:
        def edit(kind: str, x: torch.Tensor) -> torch.Tensor:
            if kind == self.sever:
                return self.hold(j, x)
            if kind == self.kind:
                return self.restore(j, x)
            return x

        edit.kinds = frozenset({self.kind, self.sever})  # type: ignore[attr-defined]
        return edit


def staircase(
    stack: Stack,
    corrupted: Run,
    cross: Sequence[tuple[torch.Tensor, torch.Tensor]],
    cells: Sequence[Cell],
    edits: ChunkEdits,
) -> torch.Tensor:
    """Final states [S, C, T, D] of ``cells``, each starting from the corrupted run where it first differs.

    ``cells`` must be sorted by :func:`start_layer`.
    """
    n_layers = len(stack)
    starts = [start_layer(cell, edits.kind, n_layers) for cell in cells]
    s, t, d = corrupted.inputs[0].shape
    mask = stack.self_mask(t, corrupted.inputs[0].dtype, corrupted.inputs[0].device)
    h: torch.Tensor | None = None
    joined = 0

    def join(j: int) -> None:
        nonlocal h, joined
        count = 0
        while joined + count < len(cells) and starts[joined + count] == j:
            count += 1
        if not count:
            return
        new = corrupted.inputs[j][:, None].expand(s, count, t, d)
        if edits.kind == "hidden" and j > 0:  # the skipped layer j-1 ends in the restore
            new = edits.restore(j - 1, new, first_cell=joined)
        h = new if h is None else torch.cat([h, new], dim=1)
        joined += count

    for j in range(starts[0], n_layers):
        join(j)
        assert h is not None
        h = stack.layer(j, h, cross[j], mask, edits.at(j))
    join(n_layers)
    assert h is not None and h.shape[1] == len(cells)
    return h


def cut_staircase(
    stack: Stack,
    clean: Run,
    cross: Sequence[Any],
    starts: Sequence[int],
    cuts_at: Callable[[int, int], Cuts],
) -> torch.Tensor:
    """Final states [S, R, T, D] of R knockout rows on the clean run [S, T, D]: row r follows the clean run up to
    layer ``starts[r]`` (sorted), so no row recomputes the layers before its first cut; ``cuts_at(j, rows)`` gives
    layer j's cuts for the first ``rows`` rows."""
    n_layers = len(stack)
    s, t, d = clean.inputs[0].shape
    mask = stack.self_mask(t, clean.inputs[0].dtype, clean.inputs[0].device)
    h: torch.Tensor | None = None
    joined = 0
    for j in range(starts[0], n_layers + 1):
        count = sum(1 for start in starts[joined:] if start == j)
        if count:
            new = clean.inputs[j][:, None].expand(s, count, t, d)
            h = new if h is None else torch.cat([h, new], dim=1)
            joined += count
        if j < n_layers:
            assert h is not None
            h = stack.layer(j, h, cross[j], mask, cuts=cuts_at(j, joined))
    assert h is not None and h.shape[1] == len(starts)
    return h


def start_layer(cell: Cell, kind: str, num_layers: int) -> int:
    """First layer whose input differs from the corrupted run (``num_layers`` for an empty cell)."""
    if not cell:
        return num_layers
    first = min(layer for layer, _ in cell)
    return first + 1 if kind == "hidden" else first


def vision_rows_per_chunk(
    samples: int,
    patches: int,
    vision_hidden: int,
    vision_intermediate: int,
    vision_heads: int,
    tokens: int,
    text_hidden: int,
    text_intermediate: int,
    text_heads: int,
    element_size: int,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    max_batch_rows: int | None = None,
) -> int:
    """Rows (cell x sample) of an image-side trace that fit the memory budget: a ViT layer, then the text pass."""
    vit = patches * (8 * vision_hidden + 2 * vision_intermediate) + 2 * vision_heads * patches * patches
    text = tokens * (8 * text_hidden + 2 * text_intermediate) + 2 * patches * text_hidden + 2 * text_heads * tokens * patches
    per_row = (max(vit, text) + patches * vision_hidden) * element_size
    return _rows_within(per_row, samples, memory_budget, max_batch_rows)


def _rows_within(per_row: int, samples: int, memory_budget: int, max_batch_rows: int | None) -> int:
    """Rows of ``per_row`` bytes within the budget (at least one noise sample's worth), capped by max_batch_rows."""
    rows = max(samples, memory_budget // max(per_row, 1))
    if max_batch_rows is not None:
        if max_batch_rows < 1:
            raise BlipTraceError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        rows = min(rows, max_batch_rows)
    return max(1, rows)


def rows_per_chunk(
    samples: int,
    tokens: int,
    cross_tokens: int,
    hidden: int,
    intermediate: int,
    heads: int,
    vocab: int,
    decoder_tokens: int,
    element_size: int,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    max_batch_rows: int | None = None,
) -> int:
    """How many rows (cell x sample) fit the memory budget, counting one layer's peak activations."""
    per_row = (
        tokens * (8 * hidden + 2 * intermediate)
        + 2 * heads * tokens * cross_tokens
        + decoder_tokens * (8 * hidden + 2 * intermediate + 2 * heads * tokens + 2 * vocab)
        + 2 * tokens * hidden
    ) * element_size
    return _rows_within(per_row, samples, memory_budget, max_batch_rows)


def chunks(cells_order: list[int], cells_per_chunk: int) -> list[list[int]]:
    return [cells_order[i : i + cells_per_chunk] for i in range(0, len(cells_order), cells_per_chunk)]
