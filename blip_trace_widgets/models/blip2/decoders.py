"""BLIP-2's decoder-only language models, layer by layer: OPT, and LLaMA (rotary positions) for
InstructBLIP.

    >>> from blip_trace_widgets import load_model
    >>> from blip_trace_widgets.models.blip2.decoders import language_model_stack
    >>> type(language_model_stack(load_model("demo-blip2").model)).__name__
    'DecoderStack'
"""
from __future__ import annotations

from typing import Any

import torch

from ...core.names import DECODER_KINDS
from .. import anatomy
from ..attention import Cuts, Edit, attend, attention_weights, edit_heads, no_edit


def text_states(tokens: Any, ids: torch.Tensor, image: torch.Tensor, prompt: torch.Tensor | None) -> torch.Tensor:
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
        h = torch.cat([image, text_states(self.tokens, ids, image, prompt)], -2)
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
        return attention_weights(self._split(L.query(x)), self._split(L.key(x)), mask)

    def layer(self, j: int, h: torch.Tensor, cross: Any = None, mask: torch.Tensor | None = None,
              edit: Edit = no_edit, cuts: Cuts = (None, None), drop: bool = False) -> torch.Tensor:
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
        return torch.cat([image, text_states(self.tokens, ids, image, prompt)], -2)

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
        return attention_weights(q, k, mask)

    def layer(self, j: int, h: torch.Tensor, cross: Any = None, mask: torch.Tensor | None = None,
              edit: Edit = no_edit, cuts: Cuts = (None, None), drop: bool = False) -> torch.Tensor:
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
