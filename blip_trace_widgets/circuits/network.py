"""The hand-written forward of each family's circuit graph, layer by layer, with every receiver channel's input open:
BLIP VQA's question encoder and answer decoder, BLIP-2's Q-Former with an OPT or a Flan-T5 language model.

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

:class:`QueryNetwork` is the same for BLIP-2 and InstructBLIP (OPT): the Q-Former (post-LayerNorm, cross-attention
on every ``cross_every``-th layer, the queries' own MLP, InstructBLIP's instruction rows through the text MLP), the
projection of its query rows into the language model's rows 0..Q-1, and OPT (pre-LayerNorm, causal), whose
channels are the residual before each receiver's own LayerNorm. Its chain (:meth:`QueryNetwork.chain`) gates every
node of the graph: a language-model channel's input recomputes the Q-Former's chain to its final output (query rows),
the projection and the language model's residual sum. :class:`T5Network` is the same with a T5 language model
(encoder and decoder, pre-RMSNorm, unscaled attention with each stack's relative position bias as a constant, the
feed-forward called whole, the tied head's scale): its chain recomputes an encoder channel's input from the
Q-Former's chain, the projection and the encoder's sum, the decoder's keys and values from that through the
encoder's final norm, and a decoder channel's from the decoder's own sum. Both share the Q-Former's forward
(:class:`QFormerNetwork`). :func:`network_of` picks the class from the graph's shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..core.names import ANSWER_DECODER, LM_DECODER, LM_ENCODER, QFORMER, QUESTION_ENCODER
from ..models import anatomy
from .graph import Point, QueryShape, Shape, T5Shape, shape_of
from .names import CROSS, DEC, ENC, LM, QE, QF, SELF

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
    #: BLIP-2's language-model residual at each layer's input (and, at the layer count, its final state).
    states: dict[int, torch.Tensor] = field(default_factory=dict)

    def detached(self) -> Record:
        return Record(self.img.detach(), {k: v.detach() for k, v in self.emb.items()},
                      {k: v.detach() for k, v in self.heads.items()}, {k: v.detach() for k, v in self.mlp.items()},
                      {k: v.detach() for k, v in self.final.items()}, self.score.detach(),
                      {k: v.detach() for k, v in self.states.items()})


class Network:
    """The question encoder and answer decoder of a BLIP VQA bundle, run layer by layer (see the module)."""

    #: The block whose channels a run may reach without rerunning the earlier one (the decoder reads the question
    #: encoder's final output).
    last_block = DEC

    def path_key(self, graph: Any, path: Any) -> tuple[bool, int]:
        """Where a path run's receivers sit, to batch alike runs: whether all are in the decoder."""
        return min(graph.places[r][0].block == DEC for r in path.receivers), 0

    def __init__(self, bundle: Any) -> None:
        model = getattr(bundle, "model", bundle)
        self.shape: Shape = shape_of(model)  # type: ignore[assignment]
        self.layers = {b: anatomy.text_layers(model, name) for b, name in BLOCKS.items()}
        self.embeddings = {b: anatomy.text_embeddings(model, name) for b, name in BLOCKS.items()}
        self.lm_head = anatomy.answer_head(model)
        self.heads = self.shape.heads

    def embed(self, block: str, ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings[block](input_ids=ids)

    def clean_inputs(self, pair: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return pair.img, self.embed(QE, pair.question_ids), self.embed(DEC, pair.decoder_ids)

    def corrupted_inputs(self, pair: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return pair.corrupted_img, self.embed(QE, pair.corrupted_question_ids), self.embed(DEC, pair.decoder_ids)

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


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            scale: float | None = None) -> torch.Tensor:
    """Attention of q over k and v, scores scaled by ``scale`` (1/sqrt(d) unless given; T5's are unscaled) and
    ``mask`` (a bias) added."""
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores = scores / math.sqrt(q.shape[-1]) if scale is None else scores * scale
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


def network_of(bundle: Any) -> Network | QueryNetwork | T5Network:
    """The network of a bundle's family: :class:`Network` for BLIP VQA, :class:`QueryNetwork` for BLIP-2 and
    InstructBLIP with an OPT language model, :class:`T5Network` with a T5 one."""
    return NETWORKS[type(shape_of(getattr(bundle, "model", bundle)))](bundle)


class QFormerNetwork:
    """BLIP-2's or InstructBLIP's Q-Former run layer by layer (post-LayerNorm, cross-attention on every
    ``cross_every``-th layer, the queries' own MLP, InstructBLIP's instruction rows through the text MLP): what
    :class:`QueryNetwork` (OPT) and :class:`T5Network` (T5) share."""

    def __init__(self, model: Any, qf_heads: int) -> None:
        self.qf = anatomy.text_layers(model, QFORMER)
        self.qf_heads = qf_heads
        self.query_tokens, self.qf_norm = anatomy.queries(model)
        self.instruction = anatomy.instruction_embeddings(model)
        self.count = int(self.query_tokens.shape[1])

    def run_qformer(self, record: Record, qf_emb: torch.Tensor, source: Source) -> torch.Tensor:
        """The Q-Former's layers on its input ``qf_emb``, recorded: its final output."""
        h = record.emb[QF] = qf_emb.expand(record.img.shape[0], -1, -1)
        for j in range(len(self.qf)):
            h = self.qf_layer(j, h, record.img, source, record)
        return h


    def qf_embed(self, ids: torch.Tensor | None) -> torch.Tensor:
        """``qf.emb``: the Q-Former's layer-0 input [1, Q (+ T), D]: its queries (and InstructBLIP's instruction
        ``ids``, with their learned positions), layer-normed."""
        h = self.query_tokens
        if ids is not None and ids.shape[1] and self.instruction is not None:
            words, positions = self.instruction
            h = torch.cat([h, (words(ids) + positions(torch.arange(ids.shape[1], device=ids.device))[None]).to(h)], 1)
        return self.qf_norm(h)

    def qf_layer(self, j: int, h: torch.Tensor, img: torch.Tensor, source: Source, record: Record) -> torch.Tensor:
        L, H = self.qf[j], self.qf_heads
        x = source.at(Point(QF, j, "in"), h)
        parts = [None, None, None] if x is None else [x[:, :H], x[:, H:2 * H], x[:, 2 * H:]]
        q, k, v = (project_heads(lin, h, p, H) for lin, p in zip((L.self_query, L.self_key, L.self_value), parts))
        z = record.heads[(QF, j, SELF)] = _attend(q, k, v, None)
        h1 = L.self_norm(L.self_out(_merge(z)) + h)
        h2 = h1 if L.cross_out is None else self.qf_cross(j, h1, img, source, record)
        x = source.at(Point(QF, j, "post"), h2)
        m = record.mlp[(QF, j)] = self.qf_mlp(L, h2 if x is None else x[:, 0])
        return self.qf_mlp_norm(L, m + h2)

    def qf_cross(self, j: int, h1: torch.Tensor, img: torch.Tensor, source: Source, record: Record) -> torch.Tensor:
        """A cross-attention sublayer: only the queries' rows attend to the image; the instruction's pass by."""
        L, H, Q = self.qf[j], self.qf_heads, self.count
        assert L.cross_query is not None and L.cross_key is not None and L.cross_value is not None
        assert L.cross_out is not None and L.cross_norm is not None
        x = source.at(Point(QF, j, "mid"), h1)
        q = project_heads(L.cross_query, h1[:, :Q], None if x is None else x[:, :, :Q], H)
        x = source.at(Point(QF, j, "kv"), img)
        k = project_heads(L.cross_key, img, None if x is None else x[:, :H], H)
        v = project_heads(L.cross_value, img, None if x is None else x[:, H:], H)
        z = _attend(q, k, v, None)
        rest = h1.shape[1] - Q
        record.heads[(QF, j, CROSS)] = torch.cat([z, z.new_zeros(*z.shape[:2], rest, z.shape[-1])], 2)
        return torch.cat([L.cross_norm(L.cross_out(_merge(z)) + h1[:, :Q]), h1[:, Q:]], 1)

    def qf_mlp(self, L: Any, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward: the queries' rows through the query MLP, the instruction's through the text MLP."""
        Q = self.count
        m = L.mlp_out(L.mlp_act(L.mlp_in(x[..., :Q, :])))
        if x.shape[-2] == Q:
            return m
        return torch.cat([m, L.text_mlp_out(L.text_mlp_act(L.text_mlp_in(x[..., Q:, :])))], -2)

    def qf_mlp_norm(self, L: Any, x: torch.Tensor) -> torch.Tensor:
        Q = self.count
        if x.shape[-2] == Q:
            return L.mlp_norm(x)
        return torch.cat([L.mlp_norm(x[..., :Q, :]), L.text_mlp_norm(x[..., Q:, :])], -2)

class QueryNetwork(QFormerNetwork):
    """BLIP-2's or InstructBLIP's Q-Former and OPT language model, run layer by layer with every receiver channel's
    input open (the interface of :class:`Network`; see the module). Points are the graph's: a Q-Former layer's
    ``in``, ``mid`` and ``kv`` (cross-attention layers only) and ``post``; a language-model layer's ``in`` and
    ``post``, whose channels are the pre-LayerNorm residual (each head's and the MLP's LayerNorm is applied to its
    own input), and ``out``."""

    def __init__(self, bundle: Any) -> None:
        model = getattr(bundle, "model", bundle)
        self.shape: QueryShape = shape_of(model)  # type: ignore[assignment]
        super().__init__(model, self.shape.qf_heads)
        self.lm = anatomy.decoder_layers(model)
        parts = anatomy.language_model_parts(model)
        self.projection, self.tokens, self.positions = parts["projection"], parts["tokens"], parts["positions"]
        self.final_norm, self.lm_head = parts["final_norm"], parts["head"]
        self.qf_slots = len(self.shape.slot_names(QF))

    #: As :attr:`Network.last_block`: the language model reads the Q-Former's final output.
    last_block = LM
    #: The blocks whose contributions the chain gates, in the graph's node order.
    blocks = (QF, LM)

    def chain_blocks(self, point: Point) -> tuple[str, ...]:
        """The blocks whose contributions a point's chain reads (those recorded by the time it is reached)."""
        return (QF,) if point.block == QF else (QF, LM)

    def resume(self, points: list[Point], base: Record, pick: Any) -> dict[str, Any]:
        """Where run B may start when its receivers sit at ``points``: at the first receiver's language-model layer
        from the base run's residual (``pick`` takes the run's rows), when all are in the language model."""
        if not all(p.block == LM for p in points):
            return {}
        first = min(p.layer for p in points)
        return {"lm_state": pick(base.states[first]), "start": first}

    def path_key(self, graph: Any, path: Any) -> tuple[bool, int]:
        """Whether all of a path run's receivers are in the language model, and their first layer there."""
        points = [graph.places[r][0] for r in path.receivers]
        late = all(p.block == LM for p in points)
        return late, min(p.layer for p in points) if late else 0

    # ----- inputs --------------------------------------------------------------------------------------
    def lm_embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``lm.emb``: the prompt's token embeddings after Q zero rows, plus OPT's positions at every row."""
        text = self.tokens(ids)
        h = torch.cat([torch.zeros(1, self.count, text.shape[-1], dtype=text.dtype, device=text.device), text], 1)
        index = torch.arange(h.shape[1], device=h.device) + int(getattr(self.positions, "offset", 2))
        return h + self.positions.weight[index].to(h.dtype)

    def clean_inputs(self, pair: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return pair.img, self.qf_embed(pair.instruction_ids), self.lm_embed(pair.question_ids)

    def corrupted_inputs(self, pair: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return pair.corrupted_img, self.qf_embed(pair.instruction_ids), self.lm_embed(pair.question_ids)

    def lm_input(self, lm_emb: torch.Tensor, qf_final: torch.Tensor) -> torch.Tensor:
        """The language model's layer-0 input: ``lm.emb`` plus the projected queries at rows 0..Q-1."""
        image = self.projection(qf_final[..., : self.count, :])
        pad = image.new_zeros(*image.shape[:-2], lm_emb.shape[-2] - self.count, image.shape[-1])
        return lm_emb + torch.cat([image, pad], -2)

    # ----- the forward pass ----------------------------------------------------------------------------
    def forward(self, img: torch.Tensor, qf_emb: torch.Tensor, lm_emb: torch.Tensor, pair: Any,
                source: Source | None = None, qf_states: torch.Tensor | None = None, rows: int = 1,
                lm_state: torch.Tensor | None = None, start: int = 0) -> Record:
        """One run (as :meth:`Network.forward`); with ``qf_states`` (the Q-Former's output) only the language
        model runs; with ``lm_state``, its residual at layer ``start``'s input, only its layers from there."""
        source = source or Live()
        rows = max(rows, img.shape[0], qf_emb.shape[0], lm_emb.shape[0], 0 if qf_states is None else qf_states.shape[0])
        record = Record(img.expand(rows, -1, -1))
        bind = getattr(source, "bind", None)
        if bind is not None:
            bind(record)
        if qf_states is None and lm_state is None:
            qf_states = self.run_qformer(record, qf_emb, source)
        record.emb[LM] = lm_emb.expand(rows, -1, -1)
        if lm_state is None:
            assert qf_states is not None
            record.final[QF] = qf_states.expand(rows, -1, -1)
            h = self.lm_input(record.emb[LM], record.final[QF])
        else:
            h = lm_state.expand(rows, -1, -1)
        mask = _causal(h)
        for j in range(start, len(self.lm)):
            record.states[j] = h
            h = self.lm_layer(j, h, source, record, mask)
        record.final[LM] = record.states[len(self.lm)] = h
        x = source.at(Point(LM, len(self.lm), "out"), h)
        logits = self.lm_head(self.final_norm((h if x is None else x[:, 0])[:, pair.offset]))
        logprob = torch.log_softmax(logits.float(), -1)[:, pair.answer]
        record.score = logprob.exp() if getattr(pair, "metric", "logprob") == "prob" else logprob
        return record

    def lm_layer(self, j: int, h: torch.Tensor, source: Source, record: Record,
                 mask: torch.Tensor | None) -> torch.Tensor:
        L, H = self.lm[j], self.shape.lm_heads
        x = source.at(Point(LM, j, "in"), h)
        normed = L.norm1(h if x is None else x)
        parts = [None, None, None] if x is None else [normed[:, :H], normed[:, H:2 * H], normed[:, 2 * H:]]
        q, k, v = (project_heads(lin, normed, p, H) for lin, p in zip((L.query, L.key, L.value), parts))
        z = record.heads[(LM, j, SELF)] = _attend(q, k, v, mask)
        h1 = h + L.attn_out(_merge(z))
        x = source.at(Point(LM, j, "post"), h1)
        m = record.mlp[(LM, j)] = L.fc2(L.act(L.fc1(L.norm2(h1 if x is None else x[:, 0]))))
        return h1 + m

    # ----- the frozen-node residual chain --------------------------------------------------------------
    def contributions(self, record: Record, block: str) -> torch.Tensor:
        """The block's senders' contributions recorded so far [B, S, T, D], in the graph's slot order (see
        :meth:`Network.contributions`)."""
        parts = [record.emb[block][:, None]]
        for j, L in enumerate(self.qf if block == QF else self.lm):
            outs = [(L.self_out if block == QF else L.attn_out, (block, j, SELF))]
            if block == QF and L.cross_out is not None:
                outs.append((L.cross_out, (QF, j, CROSS)))
            for linear, key in outs:
                if key not in record.heads:
                    return torch.cat(parts, 1)
                parts.append(head_outputs(linear, record.heads[key]))
            if (block, j) not in record.mlp:
                break
            parts.append(record.mlp[(block, j)][:, None])
        return torch.cat(parts, 1)

    def chain(self, base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], gates: torch.Tensor,
              upto: Point) -> torch.Tensor:
        """The input of ``upto``'s channels [R, C, T, D] recomputed from node contributions: node u contributes
        ``base[u] + gates[:, c, u] * delta[u]`` (base, delta per block [R or 1, S, T, D]; gates [R, C, nodes] over
        the graph's nodes, ``img`` first); LayerNorms, the projection and the biases recomputed, nothing else."""
        qf_gates = gates[:, :, 1:1 + self.qf_slots]
        if upto.block == QF:
            return chain_qf(self, base[QF], delta[QF], qf_gates, upto)
        Q = self.count
        final = chain_qf(self, base[QF][..., :Q, :], delta[QF][..., :Q, :], qf_gates, None)
        return chain_lm(self, base[LM], delta[LM], gates[:, :, 1 + self.qf_slots:], upto, final)


def project_heads(linear: Any, default: torch.Tensor, x: torch.Tensor | None, heads: int) -> torch.Tensor:
    """Every head's projection of ``default`` [B, T, Din], or each head's own rows on its own input ``x``
    [B, H, T, Din]: [B, H, T, dh]."""
    if x is None:
        b, t, _ = default.shape
        return linear(default).view(b, t, heads, -1).transpose(1, 2)
    w = linear.weight.view(heads, -1, linear.weight.shape[-1])
    out = torch.einsum("bhtd,hed->bhte", x, w)
    return out if linear.bias is None else out + linear.bias.view(heads, 1, -1)


def head_outputs(linear: Any, z: torch.Tensor) -> torch.Tensor:
    """Each head's contribution through its slice of the output projection (no bias): [B, H, T, D]."""
    w = linear.weight.view(linear.weight.shape[0], z.shape[1], -1)
    return torch.einsum("bhte,dhe->bhtd", z, w)


def mixed_slots(base: torch.Tensor, delta: torch.Tensor, gates: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Slots a..b-1 summed, each ``base + gate * delta``: [R, C, T, D]."""
    rows = max(gates.shape[0], delta.shape[0])
    d = delta[:, a:b].expand(rows, -1, -1, -1)
    return base[:, a:b].sum(1)[:, None] + torch.einsum("rcs,rstd->rctd", gates[:, :, a:b].expand(rows, -1, -1), d)


def chain_qf(net: QFormerNetwork, base: torch.Tensor, delta: torch.Tensor, gates: torch.Tensor,
             upto: Point | None) -> torch.Tensor:
    """The Q-Former's residual chain (post-LayerNorm) to ``upto`` (None: its final output)."""
    H, Q = net.qf_heads, net.count
    h, s = mixed_slots(base, delta, gates, 0, 1), 1
    for j, L in enumerate(net.qf):
        if upto == Point(QF, j, "in"):
            return h
        h = L.self_norm(h + mixed_slots(base, delta, gates, s, s + H) + L.self_out.bias)
        s += H
        if L.cross_out is not None and L.cross_norm is not None:
            if upto == Point(QF, j, "mid"):
                return h
            c = mixed_slots(base, delta, gates, s, s + H)[..., :Q, :] + L.cross_out.bias
            h = torch.cat([L.cross_norm(h[..., :Q, :] + c), h[..., Q:, :]], -2)
            s += H
        if upto == Point(QF, j, "post"):
            return h
        h = net.qf_mlp_norm(L, h + mixed_slots(base, delta, gates, s, s + 1))
        s += 1
    return h


def chain_lm(net: QueryNetwork, base: torch.Tensor, delta: torch.Tensor, gates: torch.Tensor, upto: Point,
             qf_final: torch.Tensor) -> torch.Tensor:
    """The language model's residual stream (pre-LayerNorm: a sum) to ``upto``, its query rows reading the
    projection of ``qf_final`` [R, C, Q, Dq]."""
    H = net.shape.lm_heads
    h, s = net.lm_input(mixed_slots(base, delta, gates, 0, 1), qf_final), 1
    for j, L in enumerate(net.lm):
        if upto == Point(LM, j, "in"):
            return h
        h = h + mixed_slots(base, delta, gates, s, s + H) + L.attn_out.bias
        s += H
        if upto == Point(LM, j, "post"):
            return h
        h = h + mixed_slots(base, delta, gates, s, s + 1)
        s += 1
    return h


class T5Network(QFormerNetwork):
    """BLIP-2's or InstructBLIP's Q-Former and T5 language model, run layer by layer with every receiver channel's
    input open (the interface of :class:`QueryNetwork`). The encoder reads the projected queries and the prompt;
    the decoder runs on its start token, cross-attending to the encoder's output (after its final norm). Both are
    pre-RMSNorm: their channels are the residual before each receiver's own norm; the decoder's keys and values
    read the encoder's output. Attention is unscaled, with each stack's relative position bias (a constant, from
    positions only). ``out`` is the decoder's final state, normed, scaled by d_model ** -0.5 where the configuration
    says so, then ``lm_head``."""

    last_block = DEC
    blocks = (QF, ENC, DEC)

    def __init__(self, bundle: Any) -> None:
        model = getattr(bundle, "model", bundle)
        self.shape: T5Shape = shape_of(model)  # type: ignore[assignment]
        super().__init__(model, self.shape.qf_heads)
        self.stacks: dict[str, list[Any]] = {ENC: anatomy.t5_layers(model, LM_ENCODER),
                                             DEC: anatomy.t5_layers(model, LM_DECODER)}
        self.positions = {ENC: anatomy.t5_position_bias(model, LM_ENCODER),
                          DEC: anatomy.t5_position_bias(model, LM_DECODER)}
        parts = anatomy.t5_parts(model)
        self.projection, self.tokens, self.lm_head = parts["projection"], parts["tokens"], parts["head"]
        self.enc_norm, self.final_norm = parts["encoder_norm"], parts["decoder_norm"]
        config = anatomy.text_config(model)
        scaled = getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", True))
        self.output_scale = float(config.d_model) ** -0.5 if scaled else 1.0
        self.starts = {QF: 1, ENC: 1 + len(self.shape.slot_names(QF))}
        self.starts[DEC] = self.starts[ENC] + len(self.shape.slot_names(ENC))

    def path_key(self, graph: Any, path: Any) -> tuple[int, int]:
        """How late a path run may start (the decoder's layer, or the encoder, or the start), to batch alike runs."""
        points = [graph.places[r][0] for r in path.receivers]
        late = min(self.blocks.index(p.block) for p in points)
        return late, min(p.layer for p in points) if late == 2 else 0

    def chain_blocks(self, point: Point) -> tuple[str, ...]:
        if point.block == DEC:
            return (QF, ENC) if point.where == "kv" else (DEC,)
        return (QF,) if point.block == QF else (QF, ENC)

    def resume(self, points: list[Point], base: Record, pick: Any) -> dict[str, Any]:
        """Where run B may start: at the first receiver's decoder layer from the base run's encoder output and
        residual when all receivers are in the decoder, after the Q-Former when all are in the T5 stacks."""
        if all(p.block == DEC for p in points):
            first = min(p.layer for p in points)
            return {"enc_out": pick(base.final[ENC]), "dec_state": pick(base.states[first]), "start": first}
        return {"qf_states": pick(base.final[QF])} if all(p.block != QF for p in points) else {}

    # ----- inputs --------------------------------------------------------------------------------------
    def enc_embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``enc.emb``: the prompt's token embeddings after Q zero rows (T5 adds no positions)."""
        text = self.tokens(ids)
        return torch.cat([text.new_zeros(1, self.count, text.shape[-1]), text], 1)

    def clean_inputs(self, pair: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return pair.img, self.qf_embed(pair.instruction_ids), self.enc_embed(pair.question_ids)

    def corrupted_inputs(self, pair: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return pair.corrupted_img, self.qf_embed(pair.instruction_ids), self.enc_embed(pair.question_ids)

    def lm_input(self, enc_emb: torch.Tensor, qf_final: torch.Tensor) -> torch.Tensor:
        """The encoder's layer-0 input: ``enc.emb`` plus the projected queries at rows 0..Q-1."""
        image = self.projection(qf_final[..., : self.count, :])
        pad = image.new_zeros(*image.shape[:-2], enc_emb.shape[-2] - self.count, image.shape[-1])
        return enc_emb + torch.cat([image, pad], -2)

    def self_bias(self, block: str, h: torch.Tensor) -> torch.Tensor:
        """A stack's relative position bias [1, H, T, T] (the decoder's with its causal mask)."""
        t = h.shape[-2]
        bias = self.positions[block].compute_bias(t, t, device=h.device).to(h.dtype)
        mask = _causal(h) if block == DEC else None
        return bias if mask is None else bias + mask

    # ----- the forward pass ----------------------------------------------------------------------------
    def forward(self, img: torch.Tensor, qf_emb: torch.Tensor, enc_emb: torch.Tensor, pair: Any,
                source: Source | None = None, qf_states: torch.Tensor | None = None, rows: int = 1,
                enc_out: torch.Tensor | None = None, dec_state: torch.Tensor | None = None, start: int = 0) -> Record:
        """One run (as :meth:`QueryNetwork.forward`); with ``qf_states`` the Q-Former is skipped; with ``enc_out``
        (the encoder's output) and ``dec_state`` (the decoder's residual at layer ``start``'s input) only the
        decoder's layers from there run."""
        source = source or Live()
        given = [t.shape[0] for t in (qf_states, enc_out, dec_state) if t is not None]
        rows = max(rows, img.shape[0], qf_emb.shape[0], enc_emb.shape[0], *given)
        record = Record(img.expand(rows, -1, -1))
        bind = getattr(source, "bind", None)
        if bind is not None:
            bind(record)
        if enc_out is None:
            if qf_states is None:
                qf_states = self.run_qformer(record, qf_emb, source)
            record.final[QF] = qf_states.expand(rows, -1, -1)
            h = record.emb[ENC] = enc_emb.expand(rows, -1, -1)
            h = self.lm_input(h, record.final[QF])
            bias = self.self_bias(ENC, h)
            for j in range(len(self.stacks[ENC])):
                h = self.t5_layer(ENC, j, h, None, bias, source, record)
            enc_out = self.enc_norm(h)
        encoded = record.final[ENC] = enc_out.expand(rows, -1, -1)
        h = record.emb[DEC] = self.tokens(pair.decoder_ids).expand(rows, -1, -1)
        h = h if dec_state is None else dec_state.expand(rows, -1, -1)
        bias = self.self_bias(DEC, h)
        for j in range(start, len(self.stacks[DEC])):
            record.states[j] = h
            h = self.t5_layer(DEC, j, h, encoded, bias, source, record)
        record.final[DEC] = record.states[len(self.stacks[DEC])] = h
        x = source.at(Point(DEC, len(self.stacks[DEC]), "out"), h)
        final = self.final_norm((h if x is None else x[:, 0])[:, pair.offset]) * self.output_scale
        logprob = torch.log_softmax(self.lm_head(final).float(), -1)[:, pair.answer]
        record.score = logprob.exp() if getattr(pair, "metric", "logprob") == "prob" else logprob
        return record

    def t5_layer(self, block: str, j: int, h: torch.Tensor, encoded: torch.Tensor | None, bias: torch.Tensor,
                 source: Source, record: Record) -> torch.Tensor:
        """Layer j of a T5 stack: h + SA(norm(h)), in the decoder + XA(norm(.)) over ``encoded``, + FF(norm(.))."""
        L, H = self.stacks[block][j], self.shape.sizes(block)[1]
        x = source.at(Point(block, j, "in"), h)
        normed = L.norm1(h if x is None else x)
        parts = [None, None, None] if x is None else [normed[:, :H], normed[:, H:2 * H], normed[:, 2 * H:]]
        q, k, v = (project_heads(lin, normed, p, H) for lin, p in zip((L.query, L.key, L.value), parts))
        z = record.heads[(block, j, SELF)] = _attend(q, k, v, bias, scale=1.0)
        h = h + L.attn_out(_merge(z))
        if encoded is not None:
            x = source.at(Point(block, j, "mid"), h)
            normed = L.cross_norm(h if x is None else x)
            q = project_heads(L.cross_query, normed, None if x is None else normed, H)
            x = source.at(Point(block, j, "kv"), encoded)
            k = project_heads(L.cross_key, encoded, None if x is None else x[:, :H], H)
            v = project_heads(L.cross_value, encoded, None if x is None else x[:, H:], H)
            z = record.heads[(block, j, CROSS)] = _attend(q, k, v, None, scale=1.0)
            h = h + L.cross_out(_merge(z))
        x = source.at(Point(block, j, "post"), h)
        m = record.mlp[(block, j)] = L.mlp(L.norm2(h if x is None else x[:, 0]))
        return h + m

    # ----- the frozen-node residual chain --------------------------------------------------------------
    def contributions(self, record: Record, block: str) -> torch.Tensor:
        """The block's senders' contributions recorded so far [B, S, T, D], in the graph's slot order."""
        if block == QF:
            return qf_contributions(self, record)
        parts = [record.emb[block][:, None]]
        for j, L in enumerate(self.stacks[block]):
            for linear, kind in ((L.attn_out, SELF), (L.cross_out, CROSS)):
                if linear is None:
                    continue
                if (block, j, kind) not in record.heads:
                    return torch.cat(parts, 1)
                parts.append(head_outputs(linear, record.heads[(block, j, kind)]))
            if (block, j) not in record.mlp:
                break
            parts.append(record.mlp[(block, j)][:, None])
        return torch.cat(parts, 1)

    def chain(self, base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], gates: torch.Tensor,
              upto: Point) -> torch.Tensor:
        """The input of ``upto``'s channels [R, C, T, D] recomputed from node contributions, node u contributing
        ``base[u] + gates[:, c, u] * delta[u]`` (gates over the graph's nodes, ``img`` first): the Q-Former's chain,
        its query rows projected into the encoder's sum; the encoder's final norm for the decoder's keys and
        values; the decoder's own sum for its other channels. Norms, the projection and any biases recomputed."""
        def block_gates(block: str) -> torch.Tensor:
            end = self.starts[block] + len(self.shape.slot_names(block))
            return gates[:, :, self.starts[block]:end]

        if upto.block == QF:
            return chain_qf(self, base[QF], delta[QF], block_gates(QF), upto)
        if upto.block == DEC and upto.where != "kv":
            h = mixed_slots(base[DEC], delta[DEC], block_gates(DEC), 0, 1)
            return chain_pre(self.stacks[DEC], self.shape.dec_heads, base[DEC], delta[DEC], block_gates(DEC), h, DEC, upto)
        Q = self.count
        final = chain_qf(self, base[QF][..., :Q, :], delta[QF][..., :Q, :], block_gates(QF), None)
        h = self.lm_input(mixed_slots(base[ENC], delta[ENC], block_gates(ENC), 0, 1), final)
        h = chain_pre(self.stacks[ENC], self.shape.enc_heads, base[ENC], delta[ENC], block_gates(ENC), h, ENC, upto)
        return h if upto.block == ENC else self.enc_norm(h)


def qf_contributions(net: QFormerNetwork, record: Record) -> torch.Tensor:
    """The Q-Former's senders' contributions recorded so far [B, S, T, D] (see :meth:`QueryNetwork.contributions`)."""
    parts = [record.emb[QF][:, None]]
    for j, L in enumerate(net.qf):
        for linear, kind in ((L.self_out, SELF), (L.cross_out, CROSS)):
            if linear is None:
                continue
            if (QF, j, kind) not in record.heads:
                return torch.cat(parts, 1)
            parts.append(head_outputs(linear, record.heads[(QF, j, kind)]))
        if (QF, j) not in record.mlp:
            break
        parts.append(record.mlp[(QF, j)][:, None])
    return torch.cat(parts, 1)


def chain_pre(layers: list[Any], heads: int, base: torch.Tensor, delta: torch.Tensor, gates: torch.Tensor,
              h: torch.Tensor, block: str, upto: Point) -> torch.Tensor:
    """A pre-norm stack's residual sum from its input ``h`` to ``upto`` (or its last state): per layer its self
    heads, its cross heads where it has them, its MLP, each slot ``base + gate * delta``."""
    s = 1
    for j, L in enumerate(layers):
        if upto == Point(block, j, "in"):
            return h
        sublayers = (L.attn_out,) if L.cross_out is None else (L.attn_out, L.cross_out)
        for n, linear in enumerate(sublayers):
            if n and upto == Point(block, j, "mid"):
                return h
            h = h + mixed_slots(base, delta, gates, s, s + heads)
            h = h if linear.bias is None else h + linear.bias
            s += heads
        if upto == Point(block, j, "post"):
            return h
        h = h + mixed_slots(base, delta, gates, s, s + 1)
        s += 1
    return h


#: The network of each graph shape's family.
NETWORKS: dict[type, Any] = {Shape: Network, QueryShape: QueryNetwork, T5Shape: T5Network}
