"""The circuit graph of a BLIP VQA model, or of BLIP-2 / InstructBLIP with an OPT or a T5 language model: nodes,
receiver channels and the edges between them.

    >>> from blip_trace_widgets import load_model
    >>> graph = circuit_graph(load_model("demo"))
    >>> len(graph.nodes), len(graph.channels), len(graph.edges)
    (75, 201, 3417)
    >>> graph.edges[0], len(graph.edges_between("qe", "dec"))
    ('qe.emb → qe.L0.H0.q', 1184)
    >>> graph.select_nodes("qe.L1.self")[:2]
    ['qe.L1.H0', 'qe.L1.H1']

Nodes: ``img`` (the vision encoder's output), ``qe.emb`` and ``dec.emb`` (a block's embedding output),
``{block}.L{l}.H{h}`` (self-attention head h of layer l: its slice of the attention context, before the output
projection), ``{block}.L{l}.X{h}`` (cross-attention head) and ``{block}.L{l}.mlp`` (the MLP's output before its
residual add and LayerNorm); ``out`` reads the decoder's final state. A receiver channel is the input one node reads:
a head's ``.q``, ``.k`` or ``.v`` (as its own rows of the projection read it), an MLP's input, ``out``'s input. Every
node upstream of a channel's input sends to it: within a block every earlier node, ``img`` to the question encoder's
cross-attention keys and values, every question-encoder node to the decoder's cross-attention keys and values
(through the question encoder's final output). Edges are named ``"sender → receiver"``.

BLIP-2 and InstructBLIP (OPT language model; LLaMA is refused, T5 is below) have their own shape,
:class:`QueryShape`:

    >>> blip2 = circuit_graph(load_model("demo-blip2"))
    >>> len(blip2.nodes), len(blip2.channels), len(blip2.edges), len(blip2.edges_between("qf", "lm"))
    (61, 155, 4185, 2262)

Its nodes are ``img`` (``image_embeds``, what the Q-Former cross-attends), ``qf.emb`` (the Q-Former's layer-0 input:
the layer-normed queries, in InstructBLIP followed by the instruction), ``qf.L{l}.H{h}``, ``qf.L{l}.X{h}`` (on the
layers with cross-attention, ``l % cross_every == 0``), ``qf.L{l}.mlp`` (the query MLP's output at the query rows,
the text MLP's at InstructBLIP's instruction rows), ``lm.emb`` (the prompt's token embeddings, zero at the Q query
rows, plus OPT's positions), ``lm.L{l}.H{h}`` (a head's slice of the attention output before ``out_proj``, whose bias
belongs to no head) and ``lm.L{l}.mlp``; its channels are the heads' ``.q``/``.k``/``.v``, the MLPs' inputs and
``out``. ``img`` sends to the cross-attention keys and values only; every Q-Former node sends to every
language-model channel and to ``out`` (through the Q-Former's final output, the projection and the language model's
rows 0..Q-1), as does ``lm.emb``; within each block as within a BLIP text block. Where the definition leaves a
choice, this graph reads it as BLIP's does: ``out`` is a channel and not in :attr:`CircuitGraph.nodes`; a channel's
senders are listed in node order (the Q-Former's before the language model's); a language-model channel is carried
as the residual before its LayerNorm, which the receiver applies itself (the same input, as LayerNorm is fixed); a
cross-attention head contributes zero at InstructBLIP's instruction rows, which pass its sublayer unchanged (as
transformers runs it).

With a Flan-T5 language model the shape is :class:`T5Shape`: the Q-Former's nodes as above, then the T5 encoder's
``enc.emb`` (the prompt's token embeddings, zero at the Q query rows; T5 adds no positions), ``enc.L{l}.H{h}`` (a
head's slice of the attention output before ``o``) and ``enc.L{l}.mlp`` (the feed-forward's ``wo`` output, gated or
not, before its residual add), then the decoder's ``dec.emb`` (the start token's embedding), ``dec.L{l}.H{h}``,
``dec.L{l}.X{h}`` (cross-attention) and ``dec.L{l}.mlp``. Its channels are every head's ``.q``/``.k``/``.v`` and
every MLP's input, and ``out`` (``lm_head``'s input: the decoder's final state after its final norm and, where the
configuration scales it, ``d_model ** -0.5``). Every Q-Former node and ``enc.emb`` send to every encoder channel and
to every decoder cross-attention ``.k``/``.v``; within the encoder as within OPT; every encoder node sends to every
decoder cross-attention ``.k``/``.v`` (through the encoder's final norm); within the decoder ``dec.emb``, every
earlier layer's nodes and, in the same layer, the self heads to the cross-attention ``.q`` and the MLP, the cross
heads to the MLP; only the decoder's nodes send to ``out`` (``edges_between("qf", "dec")`` are keys and values
only). The relative position bias is a constant of the computation, never a node. Where the definition leaves a
choice, this graph reads it as BLIP-2's does: ``out`` is a channel, not a node; senders are in node order (the
Q-Former's, the encoder's, the decoder's); an encoder or decoder channel that a norm reads is carried as the
residual before that RMSNorm, which the receiver applies itself (the same input, the norm being fixed); the
decoder's keys and values read the encoder's output after ``encoder.final_layer_norm``, recomputed from the
frozen nodes (so every decoder layer's ``.k``/``.v`` has its own edges from each encoder and Q-Former node); the
tied-head scale belongs to ``out``'s receiver (recomputed, as the final norm is); any bias of an attention's output
projection belongs to no head (T5 has none).
"""
from __future__ import annotations

import fnmatch
import functools
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from ..core.errors import BlipTraceError
from ..core.names import ANSWER_DECODER, LANGUAGE_MODEL, LM_DECODER, LM_ENCODER, QFORMER, QUESTION_ENCODER
from ..models import anatomy
from .names import (
    BLOCK_NAMES,
    BLOCK_PREFIXES,
    CHANNELS,
    CROSS,
    DEC,
    ENC,
    IMAGE,
    LM,
    OUT,
    QE,
    QF,
    QF_ENC,
    QF_LM,
    SELF,
    channel_name,
    edge_name,
    emb_name,
    head_name,
    mlp_name,
    split_edge,
)

#: Where in a block a channel reads: a layer's input (self-attention q/k/v), the residual after self-attention
#: (cross-attention queries), the encoder states (cross-attention keys and values), the residual after
#: cross-attention (the MLP), the block's final state (``out``).
WHERES = ("in", "mid", "kv", "post", "out")


class Point(NamedTuple):
    block: str
    layer: int
    where: str


@dataclass(frozen=True)
class Shape:
    """The sizes a graph is built from: layers of each block and heads per layer."""

    qe_layers: int
    dec_layers: int
    heads: int

    def layers(self, block: str) -> int:
        return self.qe_layers if block == QE else self.dec_layers

    def slots(self, block: str) -> int:
        """A block's senders: its embedding, then per layer its self heads, cross heads and MLP."""
        return 1 + self.layers(block) * (2 * self.heads + 1)

    def node_names(self) -> list[str]:
        return [IMAGE, *self.slot_names(QE), *self.slot_names(DEC)]

    def slot_names(self, block: str) -> list[str]:
        names = [emb_name(block)]
        for layer in range(self.layers(block)):
            names += [head_name(block, layer, SELF, h) for h in range(self.heads)]
            names += [head_name(block, layer, CROSS, h) for h in range(self.heads)]
            names.append(mlp_name(block, layer))
        return names

    def points(self) -> list[Point]:
        """Every point channels read, in the order a forward pass reaches them."""
        out = []
        for block in BLOCK_PREFIXES:
            for layer in range(self.layers(block)):
                out += [Point(block, layer, where) for where in ("in", "mid", "kv", "post")]
        return [*out, Point(DEC, self.dec_layers, "out")]

    def channels_at(self, point: Point) -> list[str]:
        b, layer, where = point
        h = range(self.heads)
        if where == "in":
            return [channel_name(b, layer, SELF, i, part) for part in CHANNELS for i in h]
        if where == "mid":
            return [channel_name(b, layer, CROSS, i, "q") for i in h]
        if where == "kv":
            return [channel_name(b, layer, CROSS, i, part) for part in ("k", "v") for i in h]
        return [mlp_name(b, layer)] if where == "post" else [OUT]

    def source_block(self, point: Point) -> str:
        """The block whose nodes send to a point's channels (``img`` for the question encoder's keys and values)."""
        if point.where == "kv":
            return IMAGE if point.block == QE else QE
        return point.block

    def senders_at(self, point: Point) -> int:
        """How many of the source block's slots send to the point's channels (the first ones)."""
        b, layer, where = point
        if where == "kv":
            return 1 if b == QE else self.slots(QE)
        base = 1 + layer * (2 * self.heads + 1)
        return {"in": base, "mid": base + self.heads, "post": base + 2 * self.heads, "out": self.slots(DEC)}[where]


@dataclass(frozen=True)
class QueryShape:
    """BLIP-2's or InstructBLIP's graph sizes (OPT language model): Q-Former layers and heads, which layers
    cross-attend (``l % cross_every == 0``), language-model layers and heads."""

    qf_layers: int
    qf_heads: int
    cross_every: int
    lm_layers: int
    lm_heads: int

    #: The blocks in the order a forward pass runs them (and the figure draws them).
    blocks = (QF, LM)

    @property
    def heads(self) -> int:
        return max(self.qf_heads, self.lm_heads)

    def crosses(self, layer: int) -> bool:
        return layer % self.cross_every == 0

    def slot_names(self, block: str) -> list[str]:
        """A block's senders in order: its embedding, then per layer its self heads, (cross heads) and MLP;
        ``qf+lm``: the Q-Former's, then the language model's."""
        if block == QF_LM:
            return self.slot_names(QF) + self.slot_names(LM)
        heads, layers = (self.qf_heads, self.qf_layers) if block == QF else (self.lm_heads, self.lm_layers)
        names = [emb_name(block)]
        for layer in range(layers):
            names += [head_name(block, layer, SELF, h) for h in range(heads)]
            if block == QF and self.crosses(layer):
                names += [head_name(block, layer, CROSS, h) for h in range(heads)]
            names.append(mlp_name(block, layer))
        return names

    def node_names(self) -> list[str]:
        return [IMAGE, *self.slot_names(QF), *self.slot_names(LM)]

    def points(self) -> list[Point]:
        out = []
        for layer in range(self.qf_layers):
            wheres = ("in", "mid", "kv", "post") if self.crosses(layer) else ("in", "post")
            out += [Point(QF, layer, where) for where in wheres]
        for layer in range(self.lm_layers):
            out += [Point(LM, layer, where) for where in ("in", "post")]
        return [*out, Point(LM, self.lm_layers, "out")]

    def channels_at(self, point: Point) -> list[str]:
        b, layer, where = point
        h = range(self.qf_heads if b == QF else self.lm_heads)
        if where == "in":
            return [channel_name(b, layer, SELF, i, part) for part in CHANNELS for i in h]
        if where == "mid":
            return [channel_name(b, layer, CROSS, i, "q") for i in h]
        if where == "kv":
            return [channel_name(b, layer, CROSS, i, part) for part in ("k", "v") for i in h]
        return [mlp_name(b, layer)] if where == "post" else [OUT]

    def source_block(self, point: Point) -> str:
        if point.block == LM:
            return QF_LM
        return IMAGE if point.where == "kv" else QF

    def senders_at(self, point: Point) -> int:
        """How many of the source block's slots send to the point's channels (the first ones)."""
        b, layer, where = point
        if where == "kv":
            return 1
        names = self.slot_names(b)
        start = names.index(emb_name(b)) + 1 if layer == 0 else names.index(mlp_name(b, layer - 1)) + 1
        if b == QF:
            heads = self.qf_heads * (2 if self.crosses(layer) else 1)
            return {"in": start, "mid": start + self.qf_heads, "post": start + heads}[where]
        qf = len(self.slot_names(QF))
        if where == "out":
            return qf + len(names)
        return qf + {"in": start, "post": start + self.lm_heads}[where]


@dataclass(frozen=True)
class T5Shape:
    """BLIP-2's or InstructBLIP's graph sizes with a T5 language model: the Q-Former's (as :class:`QueryShape`'s),
    then the T5 encoder's and decoder's layers and heads."""

    qf_layers: int
    qf_heads: int
    cross_every: int
    enc_layers: int
    enc_heads: int
    dec_layers: int
    dec_heads: int

    #: The blocks in the order a forward pass runs them (and the figure draws them).
    blocks = (QF, ENC, DEC)

    @property
    def heads(self) -> int:
        return max(self.qf_heads, self.enc_heads, self.dec_heads)

    def crosses(self, layer: int) -> bool:
        return layer % self.cross_every == 0

    def sizes(self, block: str) -> tuple[int, int]:
        """(layers, heads) of a block."""
        return {QF: (self.qf_layers, self.qf_heads), ENC: (self.enc_layers, self.enc_heads),
                DEC: (self.dec_layers, self.dec_heads)}[block]

    def slot_names(self, block: str) -> list[str]:
        """A block's senders in order: its embedding, then per layer its self heads, (cross heads) and MLP;
        ``qf+enc``: the Q-Former's, then the encoder's."""
        if block == QF_ENC:
            return self.slot_names(QF) + self.slot_names(ENC)
        layers, heads = self.sizes(block)
        names = [emb_name(block)]
        for layer in range(layers):
            names += [head_name(block, layer, SELF, h) for h in range(heads)]
            if block == DEC or (block == QF and self.crosses(layer)):
                names += [head_name(block, layer, CROSS, h) for h in range(heads)]
            names.append(mlp_name(block, layer))
        return names

    def node_names(self) -> list[str]:
        return [IMAGE, *self.slot_names(QF), *self.slot_names(ENC), *self.slot_names(DEC)]

    def points(self) -> list[Point]:
        out = []
        for layer in range(self.qf_layers):
            wheres = ("in", "mid", "kv", "post") if self.crosses(layer) else ("in", "post")
            out += [Point(QF, layer, where) for where in wheres]
        out += [Point(ENC, layer, where) for layer in range(self.enc_layers) for where in ("in", "post")]
        out += [Point(DEC, layer, where) for layer in range(self.dec_layers) for where in ("in", "mid", "kv", "post")]
        return [*out, Point(DEC, self.dec_layers, "out")]

    def channels_at(self, point: Point) -> list[str]:
        b, layer, where = point
        h = range(self.sizes(b)[1])
        if where == "in":
            return [channel_name(b, layer, SELF, i, part) for part in CHANNELS for i in h]
        if where == "mid":
            return [channel_name(b, layer, CROSS, i, "q") for i in h]
        if where == "kv":
            return [channel_name(b, layer, CROSS, i, part) for part in ("k", "v") for i in h]
        return [mlp_name(b, layer)] if where == "post" else [OUT]

    def source_block(self, point: Point) -> str:
        """``img`` for the Q-Former's keys and values; the Q-Former and encoder for an encoder channel and the
        decoder's keys and values (the encoder's output); the decoder alone for its other channels."""
        if point.where == "kv":
            return IMAGE if point.block == QF else QF_ENC
        return {QF: QF, ENC: QF_ENC, DEC: DEC}[point.block]

    def senders_at(self, point: Point) -> int:
        """How many of the source block's slots send to the point's channels (the first ones)."""
        b, layer, where = point
        if where == "kv":
            return 1 if b == QF else len(self.slot_names(QF_ENC))
        names = self.slot_names(b)
        if where == "out":
            return len(names)
        start = names.index(emb_name(b)) + 1 if layer == 0 else names.index(mlp_name(b, layer - 1)) + 1
        heads = self.sizes(b)[1]
        crossed = heads * (2 if b == DEC or (b == QF and self.crosses(layer)) else 1)
        earlier = len(self.slot_names(QF)) if b == ENC else 0
        return earlier + {"in": start, "mid": start + heads, "post": start + crossed}[where]


def _opt_shape(model: Any) -> QueryShape:
    anatomy.language_model_row(model)  # refuses a post-LN OPT
    qformer = anatomy.block_config(model, QFORMER)
    return QueryShape(int(qformer.num_hidden_layers), int(qformer.num_attention_heads),
                      int(qformer.cross_attention_frequency), anatomy.num_layers(model, LANGUAGE_MODEL),
                      anatomy.num_heads(model, LANGUAGE_MODEL))


def _t5_shape(model: Any) -> T5Shape:
    qformer, heads = anatomy.block_config(model, QFORMER), int(anatomy.text_config(model).num_heads)
    return T5Shape(int(qformer.num_hidden_layers), int(qformer.num_attention_heads),
                   int(qformer.cross_attention_frequency), len(anatomy.t5_layers(model, LM_ENCODER)), heads,
                   len(anatomy.t5_layers(model, LM_DECODER)), heads)


#: The graph's sizes per BLIP-2 / InstructBLIP language model (its ``model_type``).
LANGUAGE_SHAPES: dict[str, Any] = {"opt": _opt_shape, "t5": _t5_shape}


def shape_of(model: Any) -> Shape | QueryShape | T5Shape:
    """The graph's sizes: BLIP VQA's, or BLIP-2's / InstructBLIP's with an OPT or a T5 language model."""
    kind = str(getattr(getattr(model, "config", None), "model_type", ""))
    if kind not in QUERY_MODELS:
        return Shape(len(anatomy.text_layers(model, QUESTION_ENCODER)),
                     len(anatomy.text_layers(model, ANSWER_DECODER)), anatomy.num_heads(model, QUESTION_ENCODER))
    language = str(getattr(anatomy.text_config(model), "model_type", "?"))
    if language not in LANGUAGE_SHAPES:
        raise BlipTraceError(f"circuits of {kind} run with an OPT language model only, or a T5 one, and this one's "
                             f"is {language} (LLaMA is not supported): use BLIP VQA, or BLIP-2 / InstructBLIP with "
                             "OPT or T5 such as load_model('demo-blip2')")
    return LANGUAGE_SHAPES[language](model)  # type: ignore[no-any-return]


#: The architectures (``model_type``) whose graph is :class:`QueryShape`'s or :class:`T5Shape`'s.
QUERY_MODELS = ("blip-2", "instructblip")
#: The shapes whose networks gate every node of the graph (BLIP-2's and InstructBLIP's).
QUERY_SHAPES: tuple[type, ...] = (QueryShape, T5Shape)


def shape_from_dict(data: dict[str, Any]) -> Shape | QueryShape | T5Shape:
    """A shape from its ``vars`` (as a graph's or an edge result's JSON holds it)."""
    kind = next(cls for cls in (T5Shape, QueryShape, Shape) if set(data) == set(cls.__dataclass_fields__))
    return kind(**data)  # type: ignore[no-any-return]


@dataclass
class CircuitGraph:
    """Nodes, channels and edges of one model's circuit graph (see the module's docstring)."""

    shape: Shape | QueryShape | T5Shape
    nodes: list[str] = field(init=False)
    channels: list[str] = field(init=False)
    edges: list[str] = field(init=False)
    senders: np.ndarray = field(init=False)  # per edge: its sender's index in nodes
    receivers: np.ndarray = field(init=False)  # per edge: its receiver's index in channels
    index: dict[Point, np.ndarray] = field(init=False)  # per point: [channels, source slots] edge index or -1
    places: list[tuple[Point, int]] = field(init=False)  # per channel: its point and its place among the point's

    def __post_init__(self) -> None:
        s = self.shape
        self.nodes = s.node_names()
        node_index = {n: i for i, n in enumerate(self.nodes)}
        self.channels = []
        edges: list[str] = []
        senders: list[int] = []
        receivers: list[int] = []
        self.index, self.places = {}, []
        for point in s.points():
            source = s.source_block(point)
            names = [IMAGE] if source == IMAGE else s.slot_names(source)
            table = np.full((len(s.channels_at(point)), len(names)), -1, dtype=np.int64)
            for c, channel in enumerate(s.channels_at(point)):
                self.channels.append(channel)
                self.places.append((point, c))
                for slot in range(s.senders_at(point)):
                    table[c, slot] = len(edges)
                    edges.append(edge_name(names[slot], channel))
                    senders.append(node_index[names[slot]])
                    receivers.append(len(self.channels) - 1)
            self.index[point] = table
        self.edges = edges
        self.senders, self.receivers = np.array(senders), np.array(receivers)
        self._edge_index = {e: i for i, e in enumerate(edges)}

    def __len__(self) -> int:
        return len(self.edges)

    @functools.cached_property
    def point_edges(self) -> dict[Point, tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """Per point: its channels' count, and for every edge into them (its channel's place at the point, its
        sender's index in :attr:`nodes`, its own index)."""
        found: dict[Point, list[tuple[int, int, int]]] = {p: [] for p in self.index}
        for i, (sender, receiver) in enumerate(zip(self.senders.tolist(), self.receivers.tolist())):
            point, place = self.places[receiver]
            found[point].append((place, sender, i))
        out = {}
        for p, rows in found.items():
            table = np.array(rows, dtype=np.int64).reshape(-1, 3)
            out[p] = (len(self.shape.channels_at(p)), table[:, 0], table[:, 1], table[:, 2])
        return out

    def slot_of(self, node: int, block: str) -> int | None:
        """A node's slot among ``block``'s senders (``img``: 0 of "img"), None when it belongs elsewhere."""
        name = self.nodes[node]
        if block == IMAGE:
            return 0 if name == IMAGE else None
        return self.shape.slot_names(block).index(name) if _block_of(name) == block else None

    def edge_index(self, name: str) -> int:
        sender, receiver = split_edge(name)
        key = edge_name(sender, receiver)
        if key not in self._edge_index:
            raise BlipTraceError(f"{key!r} is not an edge of this graph: its sender must be upstream of the receiver "
                                 "channel (see circuit_graph(bundle).edges)")
        return self._edge_index[key]

    def select_nodes(self, spec: str | list[str]) -> list[str]:
        """Nodes named by ``spec``: a name, a block ("img", "qe", "dec"), a group ("qe.heads", "qe.self",
        "qe.cross", "qe.mlp", "qe.L1", "qe.L1.self", "image"), a glob pattern ("qe.L*.X2"), or a list of these."""
        return [n for n in self.nodes if any(_matches(n, s) for s in _specs(spec))] or _nothing(spec, "node")

    def select_channels(self, spec: str | list[str]) -> list[str]:
        """Channels named by ``spec`` as :meth:`select_nodes` reads it, or by their own names ("dec.L2.X3.k")."""
        return [c for c in self.channels if any(_matches(c, s) or _matches(_node_of(c), s) for s in _specs(spec))] \
            or _nothing(spec, "channel")

    def edges_between(self, senders: str | list[str], receivers: str | list[str]) -> list[str]:
        """Edges from nodes ``senders`` selects to channels ``receivers`` selects (see :meth:`select_nodes`)."""
        return [self.edges[i] for i in self.edge_indices_between(senders, receivers)]

    def edge_indices_between(self, senders: str | list[str], receivers: str | list[str]) -> np.ndarray:
        nodes = {self.nodes.index(n) for n in self.select_nodes(senders)}
        channels = {self.channels.index(c) for c in self.select_channels(receivers)}
        return np.array([i for i in range(len(self.edges))
                         if self.senders[i] in nodes and self.receivers[i] in channels], dtype=np.int64)

    def counts(self) -> dict[str, int]:
        """Edges by (sender block → receiver block), e.g. ``{"qe → dec": 1184, ...}``."""
        return dict(Counter(edge_name(_block_of(self.nodes[s]), _block_of(self.channels[r]))
                            for s, r in zip(self.senders, self.receivers)))

    def to_dict(self) -> dict[str, Any]:
        return {"shape": vars(self.shape), "nodes": self.nodes, "channels": self.channels, "edges": self.edges,
                "counts": self.counts()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> CircuitGraph:
        return cls(shape_from_dict(json.loads(text)["shape"]))


def circuit_graph(bundle: Any) -> CircuitGraph:
    """The circuit graph of a BLIP VQA bundle (or model), or of BLIP-2 / InstructBLIP with an OPT or T5 language
    model."""
    return CircuitGraph(shape_of(getattr(bundle, "model", bundle)))


_GROUPS = {"heads": "L*.[HX]*", "self": "L*.H*", "cross": "L*.X*", "mlp": "L*.mlp"}


def _specs(spec: str | list[str]) -> list[str]:
    specs = [spec] if isinstance(spec, str) else list(spec)
    out = []
    for s in specs:
        s = IMAGE if s == "image" else s
        parts = s.split(".")
        if parts[-1] in _GROUPS and len(parts) >= 2:
            out.append(".".join(parts[:-1]) + "." + _GROUPS[parts[-1]].split(".", 1)[1] if len(parts) == 3
                       else parts[0] + "." + _GROUPS[parts[-1]])
        elif s in BLOCK_NAMES[1:] or (len(parts) == 2 and parts[1].startswith("L")):
            out += [s + ".*", s]
        else:
            out.append(s)
    return out


def _matches(name: str, spec: str) -> bool:
    return name == spec or fnmatch.fnmatchcase(name, spec)


def _node_of(channel: str) -> str:
    return channel.rsplit(".", 1)[0] if channel.endswith((".q", ".k", ".v")) else channel


def _block_of(name: str) -> str:
    return name.split(".", 1)[0]


def _nothing(spec: Any, what: str) -> list[str]:
    raise BlipTraceError(f"{spec!r} names no {what} of this graph: use a name, a block ('img', 'qe', 'dec'), a group "
                         "('qe.heads', 'dec.L1.cross') or a glob pattern ('qe.L*.X2')")
