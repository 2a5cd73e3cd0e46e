"""Reference loops for circuit discovery on BLIP-2 and InstructBLIP with an OPT language model: path patching, edge
scores and circuit runs, one forward pass at a time through the Hugging Face model's own modules (forward hooks and
pre-hooks that are always removed), written from the definitions alone so that a fast engine can be checked against
them.

    >>> import torch
    >>> from tiny_blip import BLIP2_VOCAB, tiny_blip2
    >>> model = tiny_blip2(seed=0)          # 3 Q-Former layers (cross-attention on 0 and 2), 3 OPT layers, 4 heads
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> images = model.vision_model(pixel_values=torch.randn(1, 3, 32, 32))[0].detach()
    >>> prompt = torch.tensor([[BLIP2_VOCAB[w] for w in ("[CLS]", "question", ":", "what", "color", "answer", ":")]])
    >>> clean = {"image_embeds": images, "input_ids": prompt, "answer_id": BLIP2_VOCAB["red"]}
    >>> noisy = dict(clean, image_embeds=images + torch.randn_like(images))
    >>> reference_path_patch(model, clean, noisy, [], []) == reference_score(model, clean)  # patching nothing
    True
    >>> len(reference_nodes(model)), len(reference_channels(model)), len(reference_edges(model))
    (42, 103, 1692)
    >>> effect = reference_edge_score(model, clean, noisy, "img -> qf.L0.X0.k")
    >>> isinstance(effect, float) and effect != 0.0
    True

The graph (every name is a plain string):

* nodes: ``img`` (``image_embeds``, the vision model's last hidden state after its post-layernorm); ``qf.emb`` (the
  Q-Former's embedding output, its layer 0's input: the layer-normed query tokens, in InstructBLIP the layer-normed
  queries then instruction embeddings); ``qf.L{l}.H{h}`` (Q-Former self-attention head h of layer l: its slice of
  the attention context, before the output dense); ``qf.L{l}.X{h}`` (cross-attention head, on the layers with
  cross-attention: ``l % cross_attention_frequency == 0``); ``qf.L{l}.mlp`` (``output.dense(intermediate(x))``
  before the residual add and LayerNorm: the query rows from the query MLP ``intermediate_query``/``output_query``,
  InstructBLIP's instruction rows from the text MLP); ``lm.emb`` (OPT's layer-0 input except the projected queries:
  the prompt's token embeddings at the text rows, zero at the query rows, plus the positional embeddings at every
  row); ``lm.L{l}.H{h}`` (OPT self-attention head: its slice of the attention output before ``out_proj``, whose bias
  belongs to no head); ``lm.L{l}.mlp`` (``fc2(activation(fc1(x)))`` before the residual add); ``out``.
* channels (a node's inputs): ``<head>.q``, ``.k``, ``.v`` (the hidden state that head's own rows of the projection
  read: the layer's input for a Q-Former self-attention head, the residual after self-attention for a cross-attention
  query, ``image_embeds`` for a cross-attention key or value, ``self_attn_layer_norm(residual)`` in OPT);
  ``{qf,lm}.L{l}.mlp`` (the MLP's input: the residual after attention in the Q-Former, ``final_layer_norm(residual)``
  in OPT); ``out`` (the input of ``lm_head``).
* edges ``"u → r"`` (``"u -> r"`` is accepted): every node upstream of channel r in the computation sends to it.
  Within the Q-Former as within a BLIP text block: ``qf.emb``, every head and MLP of an earlier layer and, in the
  same layer, the self-attention heads to the cross-attention q and the MLP, the cross-attention heads to the MLP;
  ``img`` to every cross-attention k/v and nowhere else; every Q-Former node (``qf.emb`` included) to every
  language-model channel and to ``out`` (through the Q-Former's final output at the query rows, the projection and
  the language model's input rows 0..Q-1); ``lm.emb`` to every language-model channel and ``out``; within OPT every
  head and MLP of an earlier layer and, in the same layer, the heads to the MLP; every OPT node to ``out``.

The Q-Former is post-LayerNorm, so a channel's input is not a sum of node outputs; patching is defined by freezing
(Wang et al. 2022, Goldowsky-Dill et al. 2023): see :func:`reference_path_patch` and :func:`reference_circuit_score`.
The score is log p (or p) of the answer's first token read at the prompt's last position in the language model,
averaged over the batch's rows.

Inputs are dicts of tensors: ``image_embeds`` (or ``pixel_values``, run through the vision model), ``input_ids``
(the language model's prompt; leading image tokens (``image_token_index``), as a processor writes them, are dropped: the query
rows come first), optional ``attention_mask``, for InstructBLIP ``qformer_input_ids`` and optional
``qformer_attention_mask``, and ``answer_id`` (the answer's first token: an int or one per row; ``answer_ids``, the
answer's tokens, is read too). The corruption changes ``image_embeds`` only.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip_trace_widgets.core.errors import BlipTraceError

ARROW = "→"
BLOCKS = ("qf", "lm")
Score = Callable[[Tensor], float]
Blip2 = Any  # a transformers Blip2ForConditionalGeneration or InstructBlipForConditionalGeneration with OPT

_MLP = re.compile(r"^(qf|lm)\.L(\d+)\.mlp$")
_HEAD_CHANNEL = re.compile(r"^(qf|lm)\.L(\d+)\.([HX])(\d+)\.([qkv])$")


# ----------------------------------------------------------------------------------------------------------------
# The model's parts


def _is_instruct(model: Blip2) -> bool:
    return type(model).__name__.startswith("InstructBlip")


def _decoder(model: Blip2) -> Any:
    """OPT's decoder (refused for any other language model, and for OPT variants outside the definition)."""
    if type(model).__name__ not in ("Blip2ForConditionalGeneration", "InstructBlipForConditionalGeneration"):
        raise BlipTraceError(f"{type(model).__name__} is not a Blip2ForConditionalGeneration or "
                             "InstructBlipForConditionalGeneration; load one of those")
    config = model.config.text_config
    if config.model_type != "opt":
        raise BlipTraceError(f"the language model is {config.model_type!r}; this reference covers OPT only")
    decoder = model.language_model.model.decoder
    if not config.do_layer_norm_before or decoder.project_in is not None or decoder.project_out is not None:
        raise BlipTraceError("this OPT is post-LayerNorm or projects its embeddings (as opt-350m does); the "
                             "definition covers pre-LayerNorm OPT without project_in/project_out")
    return decoder


def _queries(model: Blip2) -> int:
    return int(model.config.num_query_tokens)


# ----------------------------------------------------------------------------------------------------------------
# The graph


@dataclass(frozen=True)
class Shape:
    """What the graph depends on: the Q-Former's layers, which of them cross-attend, OPT's layers, heads."""

    qf_layers: int
    qf_heads: int
    cross: tuple[int, ...]
    lm_layers: int
    lm_heads: int

    @classmethod
    def of(cls, model: Blip2) -> Shape:
        decoder = _decoder(model)
        layers = model.qformer.encoder.layer
        cross = tuple(i for i, layer in enumerate(layers) if getattr(layer, "has_cross_attention", False))
        return cls(len(layers), int(layers[0].attention.attention.num_attention_heads), cross,
                   len(decoder.layers), int(decoder.layers[0].self_attn.num_heads))

    def heads(self, block: str) -> int:
        return self.qf_heads if block == "qf" else self.lm_heads

    def layers(self, block: str) -> int:
        return self.qf_layers if block == "qf" else self.lm_layers

    def kinds(self, block: str, layer: int) -> str:
        """The attention sublayers of a layer: "HX" for a Q-Former layer with cross-attention, else "H"."""
        return "HX" if block == "qf" and layer in self.cross else "H"

    def layer_nodes(self, block: str, layer: int) -> list[str]:
        name = f"{block}.L{layer}"
        heads = range(self.heads(block))
        return [f"{name}.{kind}{h}" for kind in self.kinds(block, layer) for h in heads] + [f"{name}.mlp"]

    def block_nodes(self, block: str) -> list[str]:
        nodes = [f"{block}.emb"]
        for layer in range(self.layers(block)):
            nodes += self.layer_nodes(block, layer)
        return nodes

    def sublayers(self) -> list[tuple[list[str], list[str]]]:
        """(channels, nodes) of each sublayer in topological order; ``out`` last (its channel, no node)."""
        order: list[tuple[list[str], list[str]]] = []
        for block in BLOCKS:
            for layer in range(self.layers(block)):
                name = f"{block}.L{layer}"
                for kind in self.kinds(block, layer):
                    nodes = [f"{name}.{kind}{h}" for h in range(self.heads(block))]
                    order.append(([f"{n}.{c}" for n in nodes for c in "qkv"], nodes))
                order.append(([f"{name}.mlp"], [f"{name}.mlp"]))
        order.append((["out"], []))
        return order

    def senders(self, channel: str) -> list[str]:
        """The nodes upstream of ``channel`` (a channel of this shape) in the computation."""
        qformer = self.block_nodes("qf")
        if channel == "out":
            return qformer + self.block_nodes("lm")
        head, mlp = _HEAD_CHANNEL.match(channel), _MLP.match(channel)
        match = head or mlp
        assert match is not None, channel
        block, layer = match.group(1), int(match.group(2))
        if head and head.group(3) == "X" and head.group(5) in "kv":
            return ["img"]
        nodes = self.block_nodes(block)
        earlier = nodes[: nodes.index(f"{block}.L{layer}.mlp") + 1 - len(self.layer_nodes(block, layer))]
        same = self.layer_nodes(block, layer)[:-1]
        if block == "lm":
            earlier = qformer + earlier
        if head and head.group(3) == "H":
            return earlier
        if head:  # a cross-attention query: after this layer's self-attention
            return earlier + same[: self.qf_heads]
        return earlier + same  # the MLP: after this layer's attention sublayers


@dataclass(frozen=True)
class Graph:
    """Nodes and channels in topological order, and each channel's senders."""

    nodes: tuple[str, ...]
    sublayers: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]
    channels: tuple[str, ...]
    senders: Mapping[str, tuple[str, ...]]


@functools.lru_cache(maxsize=16)
def _graph_of(shape: Shape) -> Graph:
    sublayers = tuple((tuple(c), tuple(n)) for c, n in shape.sublayers())
    channels = tuple(c for group, _ in sublayers for c in group)
    nodes = ("img", *shape.block_nodes("qf"), *shape.block_nodes("lm"), "out")
    return Graph(nodes, sublayers, channels, {c: tuple(shape.senders(c)) for c in channels})


def graph(model: Blip2) -> Graph:
    """The model's graph (computed once per shape)."""
    return _graph_of(Shape.of(model))


def reference_nodes(model: Blip2) -> list[str]:
    """Every node, in topological order: ``img``, the Q-Former's, the language model's, then ``out``."""
    return list(graph(model).nodes)


def reference_channels(model: Blip2) -> list[str]:
    """Every receiver channel, in topological order (``out`` last)."""
    return list(graph(model).channels)


def reference_senders(model: Blip2, channel: str) -> list[str]:
    """The nodes that send to ``channel``: every node upstream of it in the computation (see the module's text)."""
    senders = graph(model).senders.get(channel)
    if senders is None:
        raise BlipTraceError(f"{channel!r} is not a receiver channel of this model; use one of "
                             f"reference_channels(model), e.g. 'qf.L0.H0.q', 'qf.L0.X2.k', 'lm.L1.mlp' or 'out'")
    return list(senders)


def edge_name(sender: str, receiver: str) -> str:
    """``"sender → receiver"``."""
    return f"{sender} {ARROW} {receiver}"


def parse_edge(edge: str | tuple[str, str]) -> tuple[str, str]:
    """(sender, receiver) from ``"u → r"``, ``"u -> r"`` or a pair."""
    if isinstance(edge, tuple):
        return edge
    parts = re.split(r"\s*(?:→|->)\s*", edge.strip())
    if len(parts) != 2 or not all(parts):
        raise BlipTraceError(f"{edge!r} is not an edge; write it as 'sender → receiver' (or 'sender -> receiver'), "
                             "e.g. 'qf.L1.H0 → lm.L2.H3.k'")
    return parts[0], parts[1]


def reference_edges(model: Blip2) -> list[str]:
    """Every edge ``"u → r"`` of the graph, receivers in topological order, senders in topological order."""
    return [edge_name(u, r) for r in reference_channels(model) for u in reference_senders(model, r)]


def check_edge(model: Blip2, edge: str | tuple[str, str]) -> tuple[str, str]:
    """The edge as (sender, receiver); refused (BlipTraceError) where the sender does not send to the receiver."""
    sender, receiver = parse_edge(edge)
    if sender not in reference_nodes(model) or sender == "out":
        raise BlipTraceError(f"{sender!r} is not a sender node of this model; use one of reference_nodes(model) "
                             "other than 'out'")
    if sender not in reference_senders(model, receiver):
        raise BlipTraceError(f"{edge_name(sender, receiver)}: {receiver!r} cannot be reached from {sender!r} "
                             "directly; pick an edge from reference_edges(model)")
    return sender, receiver


# ----------------------------------------------------------------------------------------------------------------
# Inputs and the score


@dataclass(frozen=True)
class Inputs:
    """One forward's tensors: the image embeddings, the language model's prompt (without the query rows) and its
    mask, InstructBLIP's Q-Former instruction and its mask (None for BLIP-2), and the answer's first token per row."""

    image_embeds: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    qformer_input_ids: Tensor | None
    qformer_attention_mask: Tensor | None
    answer: Tensor

    @property
    def last(self) -> Tensor:
        """Each row's last prompt position among the language model's rows (queries first)."""
        width = self.attention_mask.shape[1]
        return width - 1 - self.attention_mask.flip(1).argmax(1)


def _answer(value: Any, rows: int) -> Tensor:
    answer = torch.as_tensor(value, dtype=torch.long)
    if answer.ndim == 2:  # the answer's tokens: the first
        answer = answer[:, 0]
    return answer.reshape(-1).expand(rows) if answer.numel() == 1 else answer.reshape(-1)


def prepare_inputs(model: Blip2, inputs: Mapping[str, Any], fallback: Inputs | None = None) -> Inputs:
    """:class:`Inputs` from a dict (see the module's text). A key left out is taken from ``fallback`` (the clean
    inputs)."""
    def pick(*keys: str) -> Any:
        return next((inputs[k] for k in keys if inputs.get(k) is not None), None)

    images = pick("image_embeds")
    if images is None and pick("pixel_values") is not None:
        with torch.no_grad():
            images = model.vision_model(pixel_values=pick("pixel_values"))[0]
    ids, mask, answer = pick("input_ids"), pick("attention_mask"), pick("answer_id", "answer_ids")
    qids, qmask = pick("qformer_input_ids"), pick("qformer_attention_mask")
    if fallback is not None:
        images = fallback.image_embeds if images is None else images
        if ids is None:
            ids, mask = fallback.input_ids, fallback.attention_mask if mask is None else mask
        answer = fallback.answer if answer is None else answer
        if qids is None and fallback.qformer_input_ids is not None:
            qids, qmask = fallback.qformer_input_ids, fallback.qformer_attention_mask if qmask is None else qmask
    if ids is None or images is None or answer is None:
        raise BlipTraceError("the inputs need 'image_embeds' (or 'pixel_values'), 'input_ids' (the language "
                             "model's prompt) and 'answer_id' (the answer's first token)")
    mask = torch.ones_like(ids) if mask is None else mask
    image_token, queries = model.config.image_token_index, _queries(model)
    if ids.shape[1] >= queries and bool((ids[:, :queries] == image_token).all()):
        ids, mask = ids[:, queries:], mask[:, mask.shape[1] - ids.shape[1] + queries:]
    if bool((ids == image_token).any()):
        raise BlipTraceError("the prompt holds image tokens other than the leading ones; give the prompt's "
                             "tokens alone (the query rows come first)")
    if _is_instruct(model):
        if qids is None:
            raise BlipTraceError("InstructBLIP needs 'qformer_input_ids' (the instruction in the Q-Former's "
                                 "vocabulary)")
        qmask = torch.ones_like(qids) if qmask is None else qmask
    elif qids is not None:
        raise BlipTraceError("BLIP-2's Q-Former reads no instruction; drop 'qformer_input_ids'")
    return Inputs(images, ids, mask, qids, qmask, _answer(answer, ids.shape[0]))


def _check_pair(clean: Inputs, corrupted: Inputs) -> None:
    for name in ("image_embeds", "input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask"):
        a, b = getattr(clean, name), getattr(corrupted, name)
        if a is not None and a.shape != b.shape:
            raise BlipTraceError(f"the clean and corrupted {name} differ in shape ({tuple(a.shape)} and "
                                 f"{tuple(b.shape)}); corrupt the image embeddings only")
        if a is not None and name != "image_embeds" and not torch.equal(a, b):
            raise BlipTraceError(f"the clean and corrupted {name} differ; a BLIP-2 circuit corrupts the image "
                                 "embeddings only, so give both runs the same prompt and instruction")


def first_answer_token(inputs: Inputs, metric: str = "logprob") -> Score:
    """The default score: log p (``"logprob"``) or p (``"prob"``) of each row's answer token at its last prompt
    position (the query rows come first), averaged over rows."""
    if metric not in ("logprob", "prob"):
        raise BlipTraceError(f"metric {metric!r} is not known; use 'logprob' or 'prob'")
    token, rows = inputs.answer, torch.arange(len(inputs.answer))

    def score(logits: Tensor) -> float:
        logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        at = logits.shape[1] - inputs.attention_mask.shape[1] + inputs.last  # the query rows come first
        logprobs = torch.log_softmax(logits[rows, at], dim=-1)
        picked = logprobs[rows, token].double()
        return float((picked if metric == "logprob" else picked.exp()).mean())

    return score


def _scorer(score: str | Score, clean: Inputs) -> Score:
    return first_answer_token(clean, score) if isinstance(score, str) else score


# ----------------------------------------------------------------------------------------------------------------
# One hooked forward


@dataclass
class Plan:
    """What one forward substitutes and what it saw: ``nodes`` (node -> output to use instead of its own),
    ``channels`` (channel -> input its projection / MLP / LM head reads instead of the normal one); filled during
    the forward: ``outputs`` (every node's output as used) and ``seen`` (every channel's input as used). A Q-Former
    MLP's tensors hold every row (queries, then InstructBLIP's instruction); OPT's MLP tensors are [rows, width], as
    OPT flattens them."""

    nodes: dict[str, Tensor] = field(default_factory=dict)
    channels: dict[str, Tensor] = field(default_factory=dict)
    outputs: dict[str, Tensor] = field(default_factory=dict)
    seen: dict[str, Tensor] = field(default_factory=dict)


def _rows(tensor: Tensor, part: slice | None) -> Tensor:
    return tensor if part is None else tensor[:, part]


def _record(store: dict[str, Tensor], name: str, value: Tensor, part: slice | None) -> None:
    """A whole value, or one of a Q-Former MLP's row groups (the queries' first, then the instruction's)."""
    if part is not None and part.start:
        store[name] = torch.cat([store[name], value], dim=1)
    else:
        store[name] = value


def _node_hook(plan: Plan, name: str, part: slice | None = None) -> Callable[..., Tensor]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        value = _rows(plan.nodes[name], part) if name in plan.nodes else output
        _record(plan.outputs, name, value, part)
        return value

    return hook


def _input_hook(plan: Plan, channel: str, part: slice | None = None) -> Callable[..., tuple[Tensor] | None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Tensor] | None:
        seen = _rows(plan.channels[channel], part) if channel in plan.channels else args[0]
        _record(plan.seen, channel, seen, part)
        return (seen, *args[1:]) if channel in plan.channels else None

    return hook


def _split(plan: Plan, names: list[str], size: int, context: Tensor) -> Tensor:
    pieces = []
    for h, name in enumerate(names):
        piece = plan.nodes.get(name, context[..., h * size:(h + 1) * size])
        plan.outputs[name] = piece
        pieces.append(piece)
    return torch.cat(pieces, dim=-1)


def _qformer_heads_hook(plan: Plan, names: list[str], size: int) -> Callable[..., tuple[Any, ...]]:
    """On a Q-Former multi-head attention: its context is the heads' outputs side by side."""
    def hook(module: nn.Module, args: tuple[Any, ...], output: tuple[Any, ...]) -> tuple[Any, ...]:
        return (_split(plan, names, size, output[0]), *output[1:])

    return hook


def _opt_heads_hook(plan: Plan, names: list[str], size: int) -> Callable[..., tuple[Any, ...]]:
    """On OPT's ``out_proj``: its input is the heads' outputs side by side."""
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (_split(plan, names, size, args[0]), *args[1:])

    return hook


def _projection_hook(plan: Plan, channels: list[str], size: int) -> Callable[..., Tensor]:
    """On a query/key/value Linear: head h's rows of the output project that head's channel input."""
    def hook(module: nn.Linear, args: tuple[Any, ...], output: Tensor) -> Tensor:
        output = output.clone()
        for h, channel in enumerate(channels):
            seen = plan.channels.get(channel, args[0])
            plan.seen[channel] = seen
            if channel in plan.channels:
                rows = slice(h * size, (h + 1) * size)
                output[..., rows] = F.linear(seen, module.weight, module.bias)[..., rows]
        return output

    return hook


def _attention_hooks(plan: Plan, name: str, kind: str, heads_hook: Any, target: nn.Module,
                     projections: Iterable[tuple[str, nn.Module]], heads: int, size: int
                     ) -> Iterator[torch.utils.hooks.RemovableHandle]:
    names = [f"{name}.{kind}{h}" for h in range(heads)]
    hook = heads_hook(plan, names, size)
    yield (target.register_forward_pre_hook(hook) if heads_hook is _opt_heads_hook
           else target.register_forward_hook(hook))
    for letter, linear in projections:
        yield linear.register_forward_hook(_projection_hook(plan, [f"{n}.{letter}" for n in names], size))


def _qformer_hooks(plan: Plan, model: Blip2) -> Iterator[torch.utils.hooks.RemovableHandle]:
    qformer, queries = model.qformer, _queries(model)
    embedding = qformer.embeddings if _is_instruct(model) else qformer.layernorm
    yield embedding.register_forward_hook(_node_hook(plan, "qf.emb"))
    for index, layer in enumerate(qformer.encoder.layer):
        name = f"qf.L{index}"
        sublayers = [("H", layer.attention.attention)]
        if getattr(layer, "has_cross_attention", False):
            sublayers.append(("X", layer.crossattention.attention))
        for kind, attention in sublayers:
            projections = (("q", attention.query), ("k", attention.key), ("v", attention.value))
            yield from _attention_hooks(plan, name, kind, _qformer_heads_hook, attention, projections,
                                        attention.num_attention_heads, attention.attention_head_size)
        query_rows, text_rows = slice(0, queries), slice(queries, None)
        yield layer.intermediate_query.register_forward_pre_hook(_input_hook(plan, f"{name}.mlp", query_rows))
        yield layer.output_query.dense.register_forward_hook(_node_hook(plan, f"{name}.mlp", query_rows))
        if getattr(layer, "intermediate", None) is not None:  # the instruction's rows (InstructBLIP)
            yield layer.intermediate.register_forward_pre_hook(_input_hook(plan, f"{name}.mlp", text_rows))
            yield layer.output.dense.register_forward_hook(_node_hook(plan, f"{name}.mlp", text_rows))


def _lm_hooks(plan: Plan, model: Blip2, projected: dict[str, Tensor]) -> Iterator[torch.utils.hooks.RemovableHandle]:
    decoder = _decoder(model)

    def first_layer(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Layer 0's input is lm.emb (the model's own sum of token and positional embeddings with the query rows
        at zero) plus the projected queries at rows 0..Q-1."""
        emb = plan.nodes.get("lm.emb", args[0])
        plan.outputs["lm.emb"] = emb
        queries = projected["queries"]
        added = torch.cat([queries, torch.zeros_like(emb[:, queries.shape[1]:])], dim=1)
        return (emb + added, *args[1:])

    yield decoder.layers[0].register_forward_pre_hook(first_layer)
    for index, layer in enumerate(decoder.layers):
        name, attention = f"lm.L{index}", layer.self_attn
        projections = (("q", attention.q_proj), ("k", attention.k_proj), ("v", attention.v_proj))
        yield from _attention_hooks(plan, name, "H", _opt_heads_hook, attention.out_proj, projections,
                                    attention.num_heads, attention.head_dim)
        yield layer.fc1.register_forward_pre_hook(_input_hook(plan, f"{name}.mlp"))
        yield layer.fc2.register_forward_hook(_node_hook(plan, f"{name}.mlp"))
    yield model.language_model.lm_head.register_forward_pre_hook(_input_hook(plan, "out"))


@contextmanager
def hooked(model: Blip2, plan: Plan, projected: dict[str, Tensor]) -> Iterator[Plan]:
    """Every hook of ``plan`` on the model's modules for the duration of the block; always removed.
    ``projected["queries"]`` must hold the projected queries before the language model runs."""
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        handles.extend(_qformer_hooks(plan, model))
        handles.extend(_lm_hooks(plan, model, projected))
        yield plan
    finally:
        for handle in handles:
            handle.remove()


def run(model: Blip2, inputs: Inputs, plan: Plan | None = None) -> tuple[Tensor, Plan]:
    """One forward (Q-Former, projection, OPT) under ``plan``; returns the language model's logits and the plan,
    whose ``outputs`` and ``seen`` now hold every node's output and every channel's input."""
    plan = Plan() if plan is None else plan
    images = plan.nodes.get("img", inputs.image_embeds)
    plan.outputs["img"] = images
    rows, queries = images.shape[0], _queries(model)
    was_training = model.training
    if was_training:
        model.eval()
    projected: dict[str, Tensor] = {}
    try:
        with torch.no_grad(), hooked(model, plan, projected):
            image_mask = torch.ones(images.shape[:-1], dtype=torch.long, device=images.device)
            query_tokens = model.query_tokens.expand(rows, -1, -1)
            if inputs.qformer_input_ids is not None:
                query_mask = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=images.device)
                mask = torch.cat([query_mask, inputs.qformer_attention_mask], dim=1)
                state = model.qformer(input_ids=inputs.qformer_input_ids, attention_mask=mask,
                                      query_embeds=query_tokens, encoder_hidden_states=images,
                                      encoder_attention_mask=image_mask, return_dict=True).last_hidden_state
            else:
                state = model.qformer(query_embeds=query_tokens, encoder_hidden_states=images,
                                      encoder_attention_mask=image_mask, return_dict=True).last_hidden_state
            words = model.language_model.get_input_embeddings()(inputs.input_ids)
            projected["queries"] = model.language_projection(state[:, :queries].to(words.dtype))
            embeds = torch.cat([torch.zeros_like(words[:, :1]).expand(-1, queries, -1), words], dim=1)
            lm_mask = torch.cat([torch.ones_like(inputs.attention_mask[:, :1]).expand(-1, queries),
                                 inputs.attention_mask], dim=1)
            logits = model.language_model(inputs_embeds=embeds, attention_mask=lm_mask, use_cache=False,
                                          return_dict=True).logits
    finally:
        if was_training:
            model.train()
    plan.outputs["out"] = logits
    return logits, plan


def frozen_inputs(model: Blip2, base: Inputs, nodes: Mapping[str, Tensor], channels: Iterable[str]
                  ) -> dict[str, Tensor]:
    """The inputs ``channels`` see in a forward on ``base`` where every node's output is fixed to ``nodes``
    (which must name every node): residual additions, LayerNorms, the Q-Former's final output and the projection
    are recomputed from those outputs."""
    missing = set(reference_nodes(model)) - {"out"} - set(nodes)
    if missing:
        raise BlipTraceError(f"a frozen forward needs every node's output; missing {sorted(missing)[:3]}")
    _, plan = run(model, base, Plan(nodes=dict(nodes)))
    return {channel: plan.seen[channel] for channel in channels}


# ----------------------------------------------------------------------------------------------------------------
# Path patching and edges


def reference_score(model: Blip2, inputs: Mapping[str, Any], score: str | Score = "logprob") -> float:
    """The score of a plain forward on ``inputs`` (nothing patched)."""
    prepared = prepare_inputs(model, inputs)
    logits, _ = run(model, prepared)
    return _scorer(score, prepared)(logits)


def _pair(model: Blip2, clean_inputs: Mapping[str, Any], corrupted_inputs: Mapping[str, Any]
          ) -> tuple[Inputs, Inputs]:
    clean = prepare_inputs(model, clean_inputs)
    corrupted = prepare_inputs(model, corrupted_inputs, fallback=clean)
    _check_pair(clean, corrupted)
    return clean, corrupted


def _check_path(model: Blip2, senders: Sequence[str], receivers: Sequence[str]) -> None:
    nodes = set(reference_nodes(model)) - {"out"}
    unknown = [s for s in senders if s not in nodes]
    if unknown:
        raise BlipTraceError(f"{unknown[0]!r} is not a sender node; use names from reference_nodes(model) "
                             "other than 'out'")
    for receiver in receivers:
        if not set(reference_senders(model, receiver)) & set(senders):
            raise BlipTraceError(f"no sender in {list(senders)} reaches the receiver {receiver!r} directly; drop "
                                 "it or add one of reference_senders(model, receiver)")


def reference_path_patch(model: Blip2, clean_inputs: Mapping[str, Any], corrupted_inputs: Mapping[str, Any],
                         senders: Sequence[str], receivers: Sequence[str], direction: str = "noise",
                         score: str | Score = "logprob") -> float:
    """The score of path patching from the nodes ``senders`` (S) to the receiver channels ``receivers`` (R):
    m(run B), not its difference from the base run (that is :func:`reference_edge_score`).

    Noising (``direction="noise"``): base = clean run, source = corrupted run; denoising (``"denoise"``): the
    other way round. Run A: a forward on the base input where every node in S outputs its source-run value and
    every other node is frozen at its base-run value (residual sums, LayerNorms, the Q-Former's final output and the
    projection recomputed); it records each receiver's input. Run B: a plain base forward where only the receivers
    read run A's inputs (a head's channel: only that head's q/k/v rows; the MLP's: its input, not the residual
    around it; ``out``: the LM head's input), everything else computed anew. The score is always of the clean
    answer's first token.
    """
    if direction not in ("noise", "denoise"):
        raise BlipTraceError(f"direction {direction!r} is not known; use 'noise' or 'denoise'")
    clean, corrupted = _pair(model, clean_inputs, corrupted_inputs)
    _check_path(model, senders, receivers)
    base, source = (clean, corrupted) if direction == "noise" else (corrupted, clean)
    _, base_run = run(model, base)
    _, source_run = run(model, source)
    nodes = {n: (source_run if n in senders else base_run).outputs[n] for n in reference_nodes(model)[:-1]}
    patched = frozen_inputs(model, base, nodes, receivers)                  # run A
    logits, _ = run(model, base, Plan(channels=patched))                    # run B
    return _scorer(score, clean)(logits)


def reference_edge_score(model: Blip2, clean_inputs: Mapping[str, Any], corrupted_inputs: Mapping[str, Any],
                         edge: str | tuple[str, str], direction: str = "noise", score: str | Score = "logprob"
                         ) -> float:
    """The exact score of one edge ``u → r``: path patching with S = {u}, R = {r}, as the effect
    m(run B) - m(base run) (base: the clean run when noising, the corrupted run when denoising). An edge whose
    receiver ``u`` does not send to directly is refused."""
    sender, receiver = check_edge(model, edge)
    patched = reference_path_patch(model, clean_inputs, corrupted_inputs, [sender], [receiver], direction, score)
    clean, corrupted = _pair(model, clean_inputs, corrupted_inputs)
    logits, _ = run(model, clean if direction == "noise" else corrupted)
    return patched - _scorer(score, clean)(logits)


# ----------------------------------------------------------------------------------------------------------------
# Circuit runs


def _mix(values: Mapping[str, Tensor], corrupted: Mapping[str, Tensor], senders: Iterable[str], receiver: str,
         kept: set[tuple[str, str]]) -> dict[str, Tensor]:
    return {u: values[u] if (u, receiver) in kept else corrupted[u] for u in senders}


def _alike(model: Blip2, channels: Iterable[str], kept: set[tuple[str, str]]) -> list[list[str]]:
    """Channels grouped by (their senders, which of those edges are kept): one frozen forward serves a group, as
    every channel in it reads the same node outputs (a saving only; one forward per channel gives the same)."""
    groups: dict[tuple[tuple[str, bool], ...], list[str]] = {}
    for channel in channels:
        key = tuple((u, (u, channel) in kept) for u in reference_senders(model, channel))
        groups.setdefault(key, []).append(channel)
    return list(groups.values())


def reference_circuit_score(model: Blip2, clean_inputs: Mapping[str, Any], corrupted_inputs: Mapping[str, Any],
                            kept_edges: Iterable[str | tuple[str, str]], score: str | Score = "logprob") -> float:
    """m(C): the score of the circuit run that keeps the edges ``kept_edges`` and corrupts every other edge.

    Node by node in topological order, on the clean input: each receiver channel r's input is a frozen forward
    (every node's output fixed; residual sums, LayerNorms, the Q-Former's final output and the projection
    recomputed) in which a sender u contributes its value in this circuit run if ``u → r`` is kept and its
    corrupted-run value otherwise (senders of nothing upstream: their clean value, which cannot reach r); each node
    then computes its output from its own channels' inputs (a head from its q/k/v, the MLP from its input); ``out``
    reads its channel. ``img``, ``qf.emb`` and ``lm.emb`` have no channels: their value in the circuit run is the
    clean one. Keeping every edge gives the clean run; keeping none gives the corrupted run.
    """
    clean, corrupted = _pair(model, clean_inputs, corrupted_inputs)
    kept = {check_edge(model, edge) for edge in kept_edges}
    _, clean_run = run(model, clean)
    _, corrupted_run = run(model, corrupted)
    values = {name: clean_run.outputs[name] for name in ("img", "qf.emb", "lm.emb")}
    frozen = {name: clean_run.outputs[name] for name in reference_nodes(model)[:-1]}
    logits = clean_run.outputs["out"]
    for channels, nodes in graph(model).sublayers:
        inputs: dict[str, Tensor] = {}
        for group in _alike(model, channels, kept):
            mix = _mix(values, corrupted_run.outputs, reference_senders(model, group[0]), group[0], kept)
            inputs.update(frozen_inputs(model, clean, {**frozen, **mix}, group))
        logits, plan = run(model, clean, Plan(channels=inputs))
        values.update({node: plan.outputs[node] for node in nodes})
    return _scorer(score, clean)(logits)


def reference_faithfulness(model: Blip2, clean_inputs: Mapping[str, Any], corrupted_inputs: Mapping[str, Any],
                           kept_edges: Iterable[str | tuple[str, str]], score: str | Score = "logprob") -> float:
    """(m(C) - m(empty)) / (m(full) - m(empty)): m(full) is the clean run's score, m(empty) the corrupted run's."""
    clean, corrupted = _pair(model, clean_inputs, corrupted_inputs)
    scorer = _scorer(score, clean)
    full, empty = scorer(run(model, clean)[0]), scorer(run(model, corrupted)[0])
    if full == empty:
        raise BlipTraceError("the clean and corrupted runs score alike, so faithfulness is undefined; use a "
                             "stronger corruption")
    return (reference_circuit_score(model, clean_inputs, corrupted_inputs, kept_edges, scorer) - empty) / (full - empty)


def blip2_inputs(model: Blip2, processor: Any, image: Any, question: str, answer: str) -> dict[str, Tensor]:
    """The clean inputs dict for one image, question and answer: ``image_embeds`` (the vision model's output),
    ``input_ids`` (the language model's start token, then ``"Question: {question} Answer:"`` for BLIP-2, the
    question itself for InstructBLIP, whose Q-Former reads it too as ``qformer_input_ids`` with its [CLS] and [SEP])
    and ``answer_id`` (the answer's first token, as said after the prompt: with a leading space)."""
    pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        images = model.vision_model(pixel_values=pixels)[0]
    tokenizer = processor.tokenizer
    text = question if _is_instruct(model) else f"Question: {question} Answer:"
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[model.config.text_config.bos_token_id, *prompt]])
    first = tokenizer(" " + answer, add_special_tokens=False)["input_ids"][0]
    inputs = {"image_embeds": images, "input_ids": ids, "answer_id": torch.tensor([first])}
    if _is_instruct(model):
        inputs["qformer_input_ids"] = torch.tensor([processor.qformer_tokenizer(question)["input_ids"]])
    return inputs
