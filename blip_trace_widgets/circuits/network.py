"""BLIP VQA's question encoder and answer decoder run layer by layer, with every receiver channel's input open.

    >>> from blip_trace_widgets import load_model, demo_samples
    >>> from blip_trace_widgets.circuits.inputs import circuit_inputs
    >>> bundle = load_model("demo")
    >>> pair = circuit_inputs(bundle, *demo_samples()[0][:2], samples=1)
    >>> net = Network(bundle)
    >>> record = net.forward(pair.img, net.embed("qe", pair.question_ids), net.embed("dec", pair.decoder_ids), pair)
    >>> round(float(record.score[0].exp()), 3)   # p(red), as the model's own forward pass gives it
    0.969

A forward pass asks a *source* for each point's channel inputs (:class:`Live`: the residual stream as it is; others
override some rows' channels, add gradient taps, or build every channel's input from frozen node outputs), and
records every node's output (a head's slice of the attention context, an MLP's output, the embeddings).

:meth:`Network.chain` is the frozen-node residual chain of the post-LayerNorm BERT: a channel's input recomputed
from node outputs, each node's contribution taken from one of two runs by a gate (1: the first run's value).
Head contributions are ``W_O^h z_h`` (the output projection's slice), the projection's bias is added once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..core.names import ANSWER_DECODER, QUESTION_ENCODER
from ..models import anatomy
from .graph import Point, Shape, shape_of
from .names import CROSS, DEC, QE, SELF

BLOCKS = {QE: QUESTION_ENCODER, DEC: ANSWER_DECODER}


class Source(Protocol):
    def at(self, point: Point, default: torch.Tensor) -> torch.Tensor | None:
        """Each channel's input at ``point`` [B, C, T, D], or None: every channel reads ``default`` [B, T, D]."""


class Live:
    """Every channel reads the residual stream (a plain forward pass)."""

    def at(self, point: Point, default: torch.Tensor) -> torch.Tensor | None:
        return None


@dataclass
class Record:
    """The node outputs of one run (batch B): image embeddings, embeddings, head contexts [B, H, T, dh], MLP outputs."""

    img: torch.Tensor
    emb: dict[str, torch.Tensor] = field(default_factory=dict)
    heads: dict[tuple[str, int, str], torch.Tensor] = field(default_factory=dict)
    mlp: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    final: dict[str, torch.Tensor] = field(default_factory=dict)
    score: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # log p(answer) [B]

    def detached(self) -> Record:
        return Record(self.img.detach(), {k: v.detach() for k, v in self.emb.items()},
                      {k: v.detach() for k, v in self.heads.items()}, {k: v.detach() for k, v in self.mlp.items()},
                      {k: v.detach() for k, v in self.final.items()}, self.score.detach())


class Network:
    """The question encoder and answer decoder of a BLIP VQA bundle, run layer by layer (see the module)."""

    def __init__(self, bundle: Any) -> None:
        model = getattr(bundle, "model", bundle)
        self.shape: Shape = shape_of(model)
        self.layers = {b: anatomy.text_layers(model, name) for b, name in BLOCKS.items()}
        self.embeddings = {b: anatomy.text_embeddings(model, name) for b, name in BLOCKS.items()}
        self.lm_head = anatomy.answer_head(model)
        self.heads = self.shape.heads

    def embed(self, block: str, ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings[block](input_ids=ids)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def _per_head(self, linear: Any, x: torch.Tensor) -> torch.Tensor:
        """Each head's own rows of ``linear`` on its own input ``x`` [B, H, T, Din]: [B, H, T, dh]."""
        w = linear.weight.view(self.heads, -1, linear.weight.shape[-1])
        return torch.einsum("bhtd,hed->bhte", x, w) + linear.bias.view(self.heads, 1, -1)

    def project(self, linear: Any, x: torch.Tensor) -> torch.Tensor:
        """Every head's projection of ``x`` [B, T, Din]: [B, H, T, dh]."""
        return self._split(linear(x))

    def _project(self, linear: Any, default: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        return self._split(linear(default)) if x is None else self._per_head(linear, x)

    def forward(self, img: torch.Tensor, qemb: torch.Tensor, demb: torch.Tensor, pair: Any,
                source: Source | None = None, question_states: torch.Tensor | None = None,
                rows: int = 1) -> Record:
        """One run on inputs of batch B (or 1, broadcast): the record of its node outputs and its score. With
        ``question_states`` (the question encoder's output), only the decoder runs, reading them; ``rows``: at least
        this batch."""
        source = source or Live()
        bind = getattr(source, "bind", None)
        rows = max(rows, img.shape[0], qemb.shape[0], demb.shape[0],
                   1 if question_states is None else question_states.shape[0])
        record = Record(img.expand(rows, -1, -1))
        if bind is not None:
            bind(record)  # a source that reads this run's node outputs as they are made
        encoder = record.img if question_states is None else question_states.expand(rows, -1, -1)
        blocks = ((QE, qemb), (DEC, demb)) if question_states is None else ((DEC, demb),)
        for block, start in blocks:
            h = start.expand(rows, -1, -1)
            record.emb[block] = h
            for layer in range(self.shape.layers(block)):
                h = self.layer(block, layer, h, encoder, source, record)
            record.final[block] = h
            encoder = h
        x = source.at(Point(DEC, self.shape.dec_layers, "out"), h)
        final = h if x is None else x[:, 0]
        logits = self.lm_head(final[:, pair.offset])
        logprob = torch.log_softmax(logits.float(), -1)[:, pair.answer]
        record.score = logprob.exp() if getattr(pair, "metric", "logprob") == "prob" else logprob
        return record

    def layer(self, block: str, j: int, h: torch.Tensor, encoder: torch.Tensor, source: Source,
              record: Record) -> torch.Tensor:
        L, H = self.layers[block][j], self.heads
        tap = getattr(source, "projected", _untapped)  # a source may tap each head's q, k and v
        x = source.at(Point(block, j, "in"), h)
        parts = [None, None, None] if x is None else [x[:, :H], x[:, H:2 * H], x[:, 2 * H:]]
        q, k, v = tap(Point(block, j, "in"), tuple(self._project(lin, h, p) for lin, p in
                                                   zip((L.self_query, L.self_key, L.self_value), parts)))
        z = _attend(q, k, v, _causal(h) if block == DEC else None)
        record.heads[(block, j, SELF)] = z
        h1 = L.self_norm(L.self_out(_merge(z)) + h)
        x = source.at(Point(block, j, "mid"), h1)
        (q,) = tap(Point(block, j, "mid"), (self._project(L.cross_query, h1, x),))
        x = source.at(Point(block, j, "kv"), encoder)
        k, v = tap(Point(block, j, "kv"), (self._project(L.cross_key, encoder, None if x is None else x[:, :H]),
                                           self._project(L.cross_value, encoder, None if x is None else x[:, H:])))
        z = _attend(q, k, v, None)
        record.heads[(block, j, CROSS)] = z
        assert L.cross_norm is not None and L.cross_out is not None, "every BLIP VQA text layer cross-attends"
        h2 = L.cross_norm(L.cross_out(_merge(z)) + h1)
        x = source.at(Point(block, j, "post"), h2)
        m = L.mlp_out(L.mlp_act(L.mlp_in(h2 if x is None else x[:, 0])))
        record.mlp[(block, j)] = m
        return L.mlp_norm(m + h2)

    # ----- the frozen-node residual chain ---------------------------------------------------------------
    def contributions(self, record: Record, block: str, slots: int | None = None,
                      cache: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The block's first ``slots`` senders' contributions to its residual stream [B, S, T, D], in the graph's
        slot order (embedding; per layer self heads, cross heads, MLP): only those recorded so far are needed.
        ``cache``: the parts an earlier call on the same record made (reused, and extended)."""
        slots = self.shape.slots(block) if slots is None else slots
        parts = cache if cache is not None else []
        if not parts:
            parts.append(record.emb[block][:, None])
        count = sum(p.shape[1] for p in parts)
        j, kind = divmod(len(parts) - 1, 3)
        while count < slots:
            L = self.layers[block][j]
            part = (self._out(L.self_out, record.heads[(block, j, SELF)]) if kind == 0 else
                    self._out(L.cross_out, record.heads[(block, j, CROSS)]) if kind == 1 else
                    record.mlp[(block, j)][:, None])
            parts.append(part)
            count += part.shape[1]
            j, kind = (j + 1, 0) if kind == 2 else (j, kind + 1)
        return torch.cat(parts, 1)[:, :slots]

    def linears(self, point: Point) -> tuple[Any, ...]:
        """The projections a point's channels read through, in the point's channel order (none for an MLP's or
        ``out``'s input, read whole)."""
        L = self.layers[point.block][point.layer] if point.where != "out" else None
        if L is None or point.where == "post":
            return ()
        return {"in": (L.self_query, L.self_key, L.self_value), "mid": (L.cross_query,),
                "kv": (L.cross_key, L.cross_value)}[point.where]

    def unproject(self, point: Point, grads: list[torch.Tensor]) -> torch.Tensor:
        """Gradients at each head's projection outputs ([B, H, T, dh] per projection) as gradients at its input:
        [B, C, T, Din], C in the point's channel order."""
        parts = []
        for linear, grad in zip(self.linears(point), grads):
            w = linear.weight.view(self.heads, -1, linear.weight.shape[-1])
            parts.append(torch.einsum("bhte,hed->bhtd", grad, w))
        return torch.cat(parts, 1)

    def project_change(self, point: Point, change: torch.Tensor) -> list[torch.Tensor]:
        """``change`` [B, T, Din] of a point's input through each head's rows of its projections (no bias):
        [B, H, T, dh] per projection."""
        return [torch.einsum("btd,hed->bhte", change, lin.weight.view(self.heads, -1, lin.weight.shape[-1]))
                for lin in self.linears(point)]

    def _out(self, linear: Any, z: torch.Tensor) -> torch.Tensor:
        """Each head's contribution through its slice of the output projection (no bias): [B, H, T, D]."""
        w = linear.weight.view(linear.weight.shape[0], self.heads, -1)
        return torch.einsum("bhte,dhe->bhtd", z, w)

    def chain(self, block: str, base: torch.Tensor, delta: torch.Tensor, gates: torch.Tensor,
              upto: Point) -> torch.Tensor:
        """The residual at ``upto`` [R, C, T, D] recomputed from node contributions: slot s contributes
        ``base[s] + gates[:, c, s] * delta[s]`` (base, delta [R or 1, S, T, D]; gates [R, C, S]); LayerNorms
        recomputed, nothing else. ``upto`` = Point(block, layers, "in") is the block's final state."""
        return chain_many(self, block, base, delta, gates, [(upto, 0, gates.shape[1])])[0]

    def chain_scores(self, block: str, base: torch.Tensor, delta: torch.Tensor,
                     grads: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        """g_r · J_{r,u} Δc_u for the channels of each (state index, g [R, C, T, D]) in ``grads`` and every slot u:
        [R, C, S] each. J is the Jacobian of the residual chain at ``base`` (LayerNorm statistics included),
        applied backwards by hand: one forward of the chain, then one pass back that the channels join at their
        state (:func:`state_index`), scoring each sublayer's slots as it passes them."""
        # the backward pass runs on the gradient run's rows (one, when every draw shares the base run); only the
        # scoring reads each draw's change
        rows, H = max(base.shape[0], *(g.shape[0] for _, g in grads)), self.heads
        total = max(rows, delta.shape[0])
        norms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]] = []
        states = [base[:, 0].expand(rows, -1, -1)]
        for L in self.layers[block]:
            assert L.cross_norm is not None and L.cross_out is not None
            for norm, bias, count in ((L.self_norm, L.self_out.bias, H), (L.cross_norm, L.cross_out.bias, H),
                                      (L.mlp_norm, None, 1)):
                first = 1 + (len(norms) // 3) * (2 * H + 1) + (0, H, 2 * H)[len(norms) % 3]
                x = states[-1] + base[:, first:first + count].sum(1) + (0 if bias is None else bias)
                mu, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
                sigma = torch.sqrt(var + norm.eps)
                norms.append(((x - mu) / sigma, sigma, norm.weight, first, first + count))
                states.append(norm(x))
        delta = delta.expand(total, -1, -1, -1)
        joined: list[tuple[int, int]] = []  # (index in grads, its first column)
        grad = torch.zeros(rows, 0, *states[0].shape[1:], dtype=states[0].dtype)
        scores = torch.zeros(total, sum(g.shape[1] for _, g in grads), delta.shape[1], dtype=states[0].dtype)
        for i in range(len(states) - 1, -1, -1):
            for n, (where, g) in enumerate(grads):
                if where == i:
                    joined.append((n, grad.shape[1]))
                    grad = torch.cat([grad, g.expand(rows, -1, -1, -1)], 1)
            if grad.shape[1] == 0:
                continue
            if i == 0:
                scores[:, : grad.shape[1], 0] = torch.einsum("rctd,rtd->rc", grad.expand(total, -1, -1, -1), delta[:, 0])
                break
            xhat, sigma, gamma, first, end = norms[i - 1]
            grad = _ln_vjp(grad, xhat[:, None], sigma[:, None], gamma)
            scores[:, : grad.shape[1], first:end] = torch.einsum("rctd,rstd->rcs", grad.expand(total, -1, -1, -1),
                                                                 delta[:, first:end])
        starts = dict(joined)
        return [scores[:, starts[n]: starts[n] + g.shape[1]] for n, (_, g) in enumerate(grads)]



def chain_many(network: Network, block: str, base: torch.Tensor, delta: torch.Tensor, gates: torch.Tensor,
               stops: list[tuple[Point, int, int]]) -> list[torch.Tensor]:
    """:meth:`Network.chain` for many channels at once: for each stop (point, first, end), channels first..end-1 of
    ``gates`` read at that point, all in one pass."""
    rows, H = gates.shape[0], network.heads
    found: dict[int, torch.Tensor] = {}
    final = Point(block, len(network.layers[block]), "in")  # the block's final state ("out" reads it)
    stops = [(final if where.where == "out" else where, first, end) for where, first, end in stops]

    def mixed(a: int, b: int) -> torch.Tensor:
        d = delta[:, a:b].expand(rows, -1, -1, -1)
        return base[:, a:b].sum(1)[:, None] + torch.einsum("rcs,rstd->rctd", gates[:, :, a:b], d)

    def stop(point: Point, h: torch.Tensor) -> bool:
        for i, (where, first, end) in enumerate(stops):
            if where == point:
                found[i] = h[:, first:end]
        return len(found) == len(stops)

    h = mixed(0, 1)
    for j, L in enumerate(network.layers[block]):
        first = 1 + j * (2 * H + 1)
        if stop(Point(block, j, "in"), h):
            break
        h = L.self_norm(h + mixed(first, first + H) + L.self_out.bias)
        if stop(Point(block, j, "mid"), h):
            break
        assert L.cross_norm is not None and L.cross_out is not None
        h = L.cross_norm(h + mixed(first + H, first + 2 * H) + L.cross_out.bias)
        if stop(Point(block, j, "post"), h):
            break
        h = L.mlp_norm(h + mixed(first + 2 * H, first + 2 * H + 1))
    else:
        stop(final, h)
    return [found[i] for i in range(len(stops))]

def _untapped(point: Point, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tensors


def state_index(point: Point) -> int:
    """Where a point reads the residual chain: after how many sublayers of its block (3 per layer)."""
    offset = {"in": 0, "mid": 1, "post": 2, "out": 0}[point.where]
    return 3 * point.layer + offset


def _ln_vjp(grad: torch.Tensor, xhat: torch.Tensor, sigma: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """A LayerNorm's vector-Jacobian product: the gradient at its input for ``grad`` at its output (statistics
    included): (γg − mean(γg) − x̂·mean(γg·x̂)) / σ."""
    g = grad * gamma
    return (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True)) / sigma


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _merge(z: torch.Tensor) -> torch.Tensor:
    b, h, t, e = z.shape
    return z.transpose(1, 2).reshape(b, t, h * e)


def _causal(h: torch.Tensor) -> torch.Tensor | None:
    t = h.shape[1]
    if t == 1:
        return None
    return torch.full((t, t), torch.finfo(h.dtype).min, dtype=h.dtype, device=h.device).triu(1)
