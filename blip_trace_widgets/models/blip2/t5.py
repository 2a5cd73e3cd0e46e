"""Flan-T5, BLIP-2's encoder-decoder language model: its encoder or decoder layer by layer (pre-LN, RMSNorm,
relative position biases).

    >>> from blip_trace_widgets.models.blip2.t5 import T5Stack
    >>> T5Stack.__name__
    'T5Stack'
"""
from __future__ import annotations

import torch

from ...core.names import CAUSAL_BLOCKS, kinds_of
from .. import anatomy
from ..attention import Cuts, Edit, attend, attention_weights, cross_context, edit_heads, no_edit
from ..runs import Run
from .decoders import text_states


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
        return torch.cat([image, text_states(self.tokens, ids, image, prompt)], -2)

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
        return attention_weights(self._split(L.query(x)), self._split(L.key(x)), mask, scaled=False)

    def cross_attention(self, j: int, h1: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Layer j's cross-attention weights for its residual ``h1`` [B, T, D] over ``keys`` [B, H, N, D/H]."""
        L = self.layers[j]
        assert L.cross_query is not None and L.cross_norm is not None, "the encoder has no cross-attention"
        return attention_weights(self._split(L.cross_query(L.cross_norm(h1))), keys, None, scaled=False)

    def layer(self, j: int, h: torch.Tensor, cross: tuple[torch.Tensor, torch.Tensor] | None = None,
              mask: torch.Tensor | None = None, edit: Edit = no_edit, cuts: Cuts = (None, None),
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
