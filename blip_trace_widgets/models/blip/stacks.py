"""BLIP's stacks: its post-LN BERT text transformer and its ViT, layer by layer, built from the model's own
modules as :mod:`blip_trace_widgets.models.anatomy` lists them.

    >>> from blip_trace_widgets import load_model
    >>> from blip_trace_widgets.models.blip.stacks import TextStack
    >>> stack = TextStack(load_model("demo").model, "question_encoder")
    >>> len(stack) >= 4
    True

Tests check every stack against the model's own forward pass with hooks.
"""
from __future__ import annotations

from typing import Any

import torch

from ...core.errors import BlipTraceError
from ...core.names import (
    BLOCK_LABELS,
    CAUSAL_BLOCKS,
    TEXT_HEAD_KINDS,
    TEXT_KINDS,
    VISION_ENCODER,
    VISION_HEAD_KINDS,
    VISION_KINDS,
)
from .. import anatomy
from ..attention import Cut, Cuts, Dial, Edit, attend, attention_weights, cross_context, edit_heads, no_edit
from ..runs import Run


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
        return attention_weights(*self.self_qk(j, h), mask)

    def cross_attention(self, j: int, h1: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Layer j's cross-attention weights for its residual ``h1`` [B, T, D] over ``keys`` [B, H, N, D/H]:
        [B, H, T, N]."""
        query = self.layers[j].cross_query
        assert query is not None, "layer j has no cross-attention"
        return attention_weights(self._split(query(h1)), keys, None)

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
        edit: Edit = no_edit,
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
        self.block = VISION_ENCODER
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
        return attention_weights(qkv[0], qkv[1], None)

    def layer(self, j: int, h: torch.Tensor, cross: Any = None, mask: Any = None, edit: Edit = no_edit,
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
