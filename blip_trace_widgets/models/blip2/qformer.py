"""BLIP-2's Q-Former, layer by layer: BLIP's text stack with the learned queries (and InstructBLIP's
instruction) in front.

    >>> from blip_trace_widgets import load_model
    >>> from blip_trace_widgets.models.blip2.qformer import QFormerStack
    >>> len(QFormerStack(load_model("demo-blip2").model)) >= 2
    True
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ...core.errors import BlipTraceError
from .. import anatomy
from ..attention import Cuts, Edit, edit_heads, no_edit
from ..blip.stacks import TextStack


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
              mask: torch.Tensor | None = None, edit: Edit = no_edit, cuts: Cuts = (None, None),
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
