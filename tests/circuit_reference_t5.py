"""Reference loops for circuit discovery on BLIP-2 and InstructBLIP with a Flan-T5 language model: path patching,
edge scores and circuit runs, one forward pass at a time through the Hugging Face model's own modules (forward hooks
and pre-hooks that are always removed), written from the definitions alone so that a fast engine can be checked
against them.

    >>> import torch
    >>> from tiny_blip import BLIP2_VOCAB, tiny_blip2_t5
    >>> model = tiny_blip2_t5(seed=0).double()  # 3 Q-Former layers (cross-attention on 0, 2); T5: 2 + 2 layers
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> images = model.vision_model(pixel_values=torch.randn(1, 3, 32, 32).double())[0].detach()
    >>> prompt = torch.tensor([[BLIP2_VOCAB[w] for w in ("[CLS]", "what", "color", "?", "[SEP]")]])
    >>> clean = {"image_embeds": images, "input_ids": prompt, "answer_id": BLIP2_VOCAB["red"]}
    >>> noisy = dict(clean, image_embeds=images + torch.randn_like(images))
    >>> reference_path_patch(model, clean, noisy, [], []) == reference_score(model, clean)  # patching nothing
    True
    >>> len(reference_nodes(model)), len(reference_channels(model)), len(reference_edges(model))
    (56, 140, 2007)
    >>> effect = reference_edge_score(model, clean, noisy, "enc.L0.H1 → dec.L1.X2.v")
    >>> isinstance(effect, float) and effect != 0.0
    True

The graph (every name is a plain string). The Q-Former's part is that of BLIP-2 with OPT (tests/
circuit_reference_blip2.py, whose hooks this module uses): ``img``, ``qf.emb``, ``qf.L{l}.H{h}``, ``qf.L{l}.X{h}``,
``qf.L{l}.mlp`` and their channels and edges. The language model is T5, an encoder and a decoder:

* nodes: ``enc.emb`` (the T5 encoder's input except the projected queries: the prompt's token embeddings from
  ``shared`` at the text rows, zero at the query rows; T5 adds no absolute positions); ``enc.L{l}.H{h}`` (encoder
  self-attention head h of layer l: its slice of the input of the output projection ``o``); ``enc.L{l}.mlp`` (the
  feed-forward's output ``DenseReluDense(x)``, plain or gated, before its residual add); ``dec.emb`` (the decoder's
  input: the start token's ``shared`` embedding); ``dec.L{l}.H{h}`` and ``dec.L{l}.X{h}`` (decoder self- and
  cross-attention heads, likewise); ``dec.L{l}.mlp``; ``out``.
* channels: ``<head>.q``, ``.k``, ``.v`` (the hidden state that head's own rows of the projection read:
  ``layer_norm(residual)`` of its sublayer, except a decoder cross-attention key or value, which reads the encoder's
  output after ``encoder.final_layer_norm``); ``{enc,dec}.L{l}.mlp`` (the feed-forward's input,
  ``layer_norm(residual)``); ``out`` (the input of ``lm_head``: the decoder's final layer norm, scaled by
  d_model ** -0.5 first where transformers scales it).
* edges ``"u → r"`` (``"u -> r"`` is accepted): within the Q-Former as for BLIP-2, ``img`` to every Q-Former
  cross-attention k/v only; every Q-Former node (``qf.emb`` included) and ``enc.emb`` to every encoder channel and
  every decoder cross-attention k/v; within the encoder every head and MLP of an earlier layer and, in the same
  layer, the heads to the MLP; every encoder node to every decoder cross-attention k/v; within the decoder
  ``dec.emb``, every head and MLP of an earlier layer and, in the same layer, the self-attention heads to the
  cross-attention q and the MLP, the cross-attention heads to the MLP; ``dec.emb`` and every decoder node to
  ``out``. Encoder and Q-Former nodes reach ``out`` only through the cross-attention keys and values.

The relative position bias (from positions only) is a constant of the computation, never patched. Patching is by
freezing (Wang et al. 2022, Goldowsky-Dill et al. 2023): see :func:`reference_path_patch` and
:func:`reference_circuit_score`. The score is log p (or p) of the answer's first token at the decoder's position 0
(the decoder reads ``decoder_start_token_id`` alone; teacher forcing is not needed for the first token), averaged
over the batch's rows.

Inputs are dicts of tensors as for BLIP-2: ``image_embeds`` (or ``pixel_values``), ``input_ids`` (the T5 encoder's
prompt, its end token included; leading image tokens, as a processor writes them, are dropped: the query rows come
first), optional ``attention_mask``, for InstructBLIP ``qformer_input_ids`` and optional ``qformer_attention_mask``,
and ``answer_id`` (the answer's first token). The corruption changes ``image_embeds`` only. Run the model in float64
where values are compared closely: T5 amplifies float32 rounding.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from circuit_reference_blip2 import (
    ARROW,
    Inputs,
    Plan,
    Score,
    _attention_hooks,
    _check_pair,
    _input_hook,
    _is_instruct,
    _mix,
    _node_hook,
    _opt_heads_hook,
    _qformer_hooks,
    _queries,
    edge_name,
    parse_edge,
    prepare_inputs,
)
from torch import Tensor, nn

from blip_trace_widgets.core.errors import BlipTraceError

__all__ = ["ARROW", "Plan", "check_edge", "edge_name", "frozen_inputs", "graph", "parse_edge", "prepare_inputs",
           "reference_channels", "reference_circuit_score", "reference_edge_score", "reference_edges",
           "reference_faithfulness", "reference_nodes", "reference_path_patch", "reference_score",
           "reference_senders", "run", "t5_inputs"]

BLOCKS = ("qf", "enc", "dec")
Blip2T5 = Any  # a transformers Blip2ForConditionalGeneration or InstructBlipForConditionalGeneration with T5

_MLP = re.compile(r"^(qf|enc|dec)\.L(\d+)\.mlp$")
_HEAD_CHANNEL = re.compile(r"^(qf|enc|dec)\.L(\d+)\.([HX])(\d+)\.([qkv])$")
#: Nodes that read no channel: their value in a circuit run is the clean run's.
_SOURCES = ("img", "qf.emb", "enc.emb", "dec.emb")


# ----------------------------------------------------------------------------------------------------------------
# The model's parts


def _t5(model: Blip2T5) -> Any:
    """The T5 language model (refused for any other model)."""
    if type(model).__name__ not in ("Blip2ForConditionalGeneration", "InstructBlipForConditionalGeneration"):
        raise BlipTraceError(f"{type(model).__name__} is not a Blip2ForConditionalGeneration or "
                             "InstructBlipForConditionalGeneration; load one of those")
    kind = model.config.text_config.model_type
    if kind != "t5":
        raise BlipTraceError(f"the language model is {kind!r}; this reference covers T5 (Flan-T5) only: use "
                             "circuit_reference_blip2 for OPT")
    return model.language_model


# ----------------------------------------------------------------------------------------------------------------
# The graph


@dataclass(frozen=True)
class Shape:
    """What the graph depends on: the Q-Former's layers and which of them cross-attend, T5's encoder and decoder
    layers, and each part's heads."""

    qf_layers: int
    qf_heads: int
    cross: tuple[int, ...]
    enc_layers: int
    enc_heads: int
    dec_layers: int
    dec_heads: int

    @classmethod
    def of(cls, model: Blip2T5) -> Shape:
        t5 = _t5(model)
        layers = model.qformer.encoder.layer
        cross = tuple(i for i, layer in enumerate(layers) if getattr(layer, "has_cross_attention", False))
        encoder, decoder = t5.encoder.block, t5.decoder.block
        return cls(len(layers), int(layers[0].attention.attention.num_attention_heads), cross,
                   len(encoder), int(encoder[0].layer[0].SelfAttention.n_heads),
                   len(decoder), int(decoder[0].layer[0].SelfAttention.n_heads))

    def heads(self, block: str) -> int:
        return {"qf": self.qf_heads, "enc": self.enc_heads, "dec": self.dec_heads}[block]

    def layers(self, block: str) -> int:
        return {"qf": self.qf_layers, "enc": self.enc_layers, "dec": self.dec_layers}[block]

    def kinds(self, block: str, layer: int) -> str:
        """The attention sublayers of a layer: "HX" where it cross-attends (some Q-Former layers, every decoder
        layer), else "H"."""
        return "HX" if block == "dec" or (block == "qf" and layer in self.cross) else "H"

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
        if channel == "out":
            return self.block_nodes("dec")
        head, mlp = _HEAD_CHANNEL.match(channel), _MLP.match(channel)
        match = head or mlp
        assert match is not None, channel
        block, layer = match.group(1), int(match.group(2))
        if head and head.group(3) == "X" and head.group(5) in "kv":
            # the Q-Former's cross-attention reads the image; the decoder's reads the encoder's output
            return ["img"] if block == "qf" else self.block_nodes("qf") + self.block_nodes("enc")
        nodes = self.block_nodes(block)
        earlier = nodes[: nodes.index(f"{block}.L{layer}.mlp") + 1 - len(self.layer_nodes(block, layer))]
        if block == "enc":  # the projected queries are the encoder's input rows 0..Q-1
            earlier = self.block_nodes("qf") + earlier
        same = self.layer_nodes(block, layer)[:-1]
        if head and head.group(3) == "H":
            return earlier
        if head:  # a cross-attention query: after this layer's self-attention
            return earlier + same[: self.heads(block)]
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
    nodes = ("img", *shape.block_nodes("qf"), *shape.block_nodes("enc"), *shape.block_nodes("dec"), "out")
    return Graph(nodes, sublayers, channels, {c: tuple(shape.senders(c)) for c in channels})


def graph(model: Blip2T5) -> Graph:
    """The model's graph (computed once per shape)."""
    return _graph_of(Shape.of(model))


def reference_nodes(model: Blip2T5) -> list[str]:
    """Every node in topological order: ``img``, the Q-Former's, the encoder's, the decoder's, then ``out``."""
    return list(graph(model).nodes)


def reference_channels(model: Blip2T5) -> list[str]:
    """Every receiver channel, in topological order (``out`` last)."""
    return list(graph(model).channels)


def reference_senders(model: Blip2T5, channel: str) -> list[str]:
    """The nodes that send to ``channel``: every node upstream of it in the computation (see the module's text)."""
    senders = graph(model).senders.get(channel)
    if senders is None:
        raise BlipTraceError(f"{channel!r} is not a receiver channel of this model; use one of "
                             "reference_channels(model), e.g. 'qf.L0.X2.k', 'enc.L1.H0.q', 'dec.L0.X1.v', "
                             "'dec.L1.mlp' or 'out'")
    return list(senders)


def reference_edges(model: Blip2T5) -> list[str]:
    """Every edge ``"u → r"`` of the graph, receivers in topological order, senders in topological order."""
    return [edge_name(u, r) for r in reference_channels(model) for u in reference_senders(model, r)]


def check_edge(model: Blip2T5, edge: str | tuple[str, str]) -> tuple[str, str]:
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
# The score


def first_answer_token(inputs: Inputs, metric: str = "logprob") -> Score:
    """The default score: log p (``"logprob"``) or p (``"prob"``) of each row's answer token at the decoder's
    position 0, averaged over rows."""
    if metric not in ("logprob", "prob"):
        raise BlipTraceError(f"metric {metric!r} is not known; use 'logprob' or 'prob'")
    token, rows = inputs.answer, torch.arange(len(inputs.answer))

    def score(logits: Tensor) -> float:
        logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        picked = torch.log_softmax(logits[:, 0], dim=-1)[rows, token].double()
        return float((picked if metric == "logprob" else picked.exp()).mean())

    return score


def _scorer(score: str | Score, clean: Inputs) -> Score:
    return first_answer_token(clean, score) if isinstance(score, str) else score


# ----------------------------------------------------------------------------------------------------------------
# One hooked forward


def _t5_hooks(plan: Plan, model: Blip2T5, projected: dict[str, Tensor]
              ) -> Iterator[torch.utils.hooks.RemovableHandle]:
    t5 = _t5(model)

    def first_encoder_layer(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """The encoder's layer-0 input is enc.emb (the token embeddings with the query rows at zero) plus the
        projected queries at rows 0..Q-1."""
        emb = plan.nodes.get("enc.emb", args[0])
        plan.outputs["enc.emb"] = emb
        queries = projected["queries"]
        added = torch.cat([queries, torch.zeros_like(emb[:, queries.shape[1]:])], dim=1)
        return (emb + added, *args[1:])

    def first_decoder_layer(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        emb = plan.nodes.get("dec.emb", args[0])
        plan.outputs["dec.emb"] = emb
        return (emb, *args[1:])

    yield t5.encoder.block[0].register_forward_pre_hook(first_encoder_layer)
    yield t5.decoder.block[0].register_forward_pre_hook(first_decoder_layer)
    for block, stack in (("enc", t5.encoder), ("dec", t5.decoder)):
        for index, layer in enumerate(stack.block):
            name = f"{block}.L{index}"
            attentions = [("H", layer.layer[0].SelfAttention)]
            if block == "dec":
                attentions.append(("X", layer.layer[1].EncDecAttention))
            for kind, attention in attentions:
                projections = (("q", attention.q), ("k", attention.k), ("v", attention.v))
                # T5's output projection reads the heads' outputs side by side, as OPT's out_proj does
                yield from _attention_hooks(plan, name, kind, _opt_heads_hook, attention.o, projections,
                                            attention.n_heads, attention.key_value_proj_dim)
            feed_forward = layer.layer[-1].DenseReluDense
            yield feed_forward.register_forward_pre_hook(_input_hook(plan, f"{name}.mlp"))
            yield feed_forward.register_forward_hook(_node_hook(plan, f"{name}.mlp"))
    yield t5.lm_head.register_forward_pre_hook(_input_hook(plan, "out"))


@contextmanager
def hooked(model: Blip2T5, plan: Plan, projected: dict[str, Tensor]) -> Iterator[Plan]:
    """Every hook of ``plan`` on the model's modules for the duration of the block; always removed.
    ``projected["queries"]`` must hold the projected queries before the T5 encoder runs."""
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        handles.extend(_qformer_hooks(plan, model))
        handles.extend(_t5_hooks(plan, model, projected))
        yield plan
    finally:
        for handle in handles:
            handle.remove()


def run(model: Blip2T5, inputs: Inputs, plan: Plan | None = None) -> tuple[Tensor, Plan]:
    """One forward (Q-Former, projection, T5 encoder and decoder from its start token) under ``plan``; returns the
    logits [rows, 1, vocabulary] and the plan, whose ``outputs`` and ``seen`` now hold every node's output and every
    channel's input."""
    t5 = _t5(model)
    plan = Plan() if plan is None else plan
    images = plan.nodes.get("img", inputs.image_embeds)
    plan.outputs["img"] = images
    rows, queries = images.shape[0], _queries(model)
    start = model.config.text_config.decoder_start_token_id
    if start is None:
        raise BlipTraceError("the T5 configuration names no decoder_start_token_id; set it (Flan-T5's is 0)")
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
            words = t5.get_input_embeddings()(inputs.input_ids)
            projected["queries"] = model.language_projection(state[:, :queries].to(words.dtype))
            embeds = torch.cat([torch.zeros_like(words[:, :1]).expand(-1, queries, -1), words], dim=1)
            encoder_mask = torch.cat([torch.ones_like(inputs.attention_mask[:, :1]).expand(-1, queries),
                                      inputs.attention_mask], dim=1)
            decoder_ids = torch.full((rows, 1), int(start), dtype=torch.long, device=images.device)
            logits = t5(inputs_embeds=embeds, attention_mask=encoder_mask, decoder_input_ids=decoder_ids,
                        use_cache=False, return_dict=True).logits
    finally:
        if was_training:
            model.train()
    plan.outputs["out"] = logits
    return logits, plan


def frozen_inputs(model: Blip2T5, base: Inputs, nodes: Mapping[str, Tensor], channels: Iterable[str]
                  ) -> dict[str, Tensor]:
    """The inputs ``channels`` see in a forward on ``base`` where every node's output is fixed to ``nodes``
    (which must name every node): residual additions, layer norms, the Q-Former's final output, the projection and
    the encoder's final layer norm are recomputed from those outputs."""
    missing = set(reference_nodes(model)) - {"out"} - set(nodes)
    if missing:
        raise BlipTraceError(f"a frozen forward needs every node's output; missing {sorted(missing)[:3]}")
    _, plan = run(model, base, Plan(nodes=dict(nodes)))
    return {channel: plan.seen[channel] for channel in channels}


# ----------------------------------------------------------------------------------------------------------------
# Path patching and edges


def reference_score(model: Blip2T5, inputs: Mapping[str, Any], score: str | Score = "logprob") -> float:
    """The score of a plain forward on ``inputs`` (nothing patched)."""
    _t5(model)
    prepared = prepare_inputs(model, inputs)
    logits, _ = run(model, prepared)
    return _scorer(score, prepared)(logits)


def _pair(model: Blip2T5, clean_inputs: Mapping[str, Any], corrupted_inputs: Mapping[str, Any]
          ) -> tuple[Inputs, Inputs]:
    _t5(model)
    clean = prepare_inputs(model, clean_inputs)
    corrupted = prepare_inputs(model, corrupted_inputs, fallback=clean)
    _check_pair(clean, corrupted)
    return clean, corrupted


def _check_path(model: Blip2T5, senders: Sequence[str], receivers: Sequence[str]) -> None:
    nodes = set(reference_nodes(model)) - {"out"}
    unknown = [s for s in senders if s not in nodes]
    if unknown:
        raise BlipTraceError(f"{unknown[0]!r} is not a sender node; use names from reference_nodes(model) "
                             "other than 'out'")
    for receiver in receivers:
        if not set(reference_senders(model, receiver)) & set(senders):
            raise BlipTraceError(f"no sender in {list(senders)} reaches the receiver {receiver!r} directly; drop "
                                 "it or add one of reference_senders(model, receiver)")


def reference_path_patch(model: Blip2T5, clean_inputs: Mapping[str, Any], corrupted_inputs: Mapping[str, Any],
                         senders: Sequence[str], receivers: Sequence[str], direction: str = "noise",
                         score: str | Score = "logprob") -> float:
    """The score of path patching from the nodes ``senders`` (S) to the receiver channels ``receivers`` (R):
    m(run B), not its difference from the base run (that is :func:`reference_edge_score`).

    Noising (``direction="noise"``): base = clean run, source = corrupted run; denoising (``"denoise"``): the
    other way round. Run A: a forward on the base input where every node in S outputs its source-run value and
    every other node is frozen at its base-run value (residual sums, layer norms, the Q-Former's final output, the
    projection and the encoder's output recomputed); it records each receiver's input. Run B: a plain base forward
    where only the receivers read run A's inputs (a head's channel: only that head's q/k/v rows, a decoder
    cross-attention key or value reading run A's encoder output; the MLP's: its input, not the residual around it;
    ``out``: the LM head's input), everything else computed anew. The score is always of the clean answer's first
    token.
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


def reference_edge_score(model: Blip2T5, clean_inputs: Mapping[str, Any], corrupted_inputs: Mapping[str, Any],
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


def _alike(model: Blip2T5, channels: Iterable[str], kept: set[tuple[str, str]]) -> list[list[str]]:
    """Channels grouped by (their senders, which of those edges are kept): one frozen forward serves a group, as
    every channel in it reads the same node outputs (a saving only; one forward per channel gives the same)."""
    groups: dict[tuple[tuple[str, bool], ...], list[str]] = {}
    for channel in channels:
        key = tuple((u, (u, channel) in kept) for u in reference_senders(model, channel))
        groups.setdefault(key, []).append(channel)
    return list(groups.values())


def reference_circuit_score(model: Blip2T5, clean_inputs: Mapping[str, Any], corrupted_inputs: Mapping[str, Any],
                            kept_edges: Iterable[str | tuple[str, str]], score: str | Score = "logprob") -> float:
    """m(C): the score of the circuit run that keeps the edges ``kept_edges`` and corrupts every other edge.

    Sublayer by sublayer in topological order, on the clean input: each receiver channel r's input is a frozen
    forward (every node's output fixed; residual sums, layer norms, the Q-Former's final output, the projection and
    the encoder's output recomputed) in which a sender u contributes its value in this circuit run if ``u → r`` is
    kept and its corrupted-run value otherwise (nodes upstream of nothing r reads: their clean value, which cannot
    reach r); each node then computes its output from its own channels' inputs (a head from its q/k/v, the MLP from
    its input); ``out`` reads its channel. ``img``, ``qf.emb``, ``enc.emb`` and ``dec.emb`` have no channels: their
    value in the circuit run is the clean one. Keeping every edge gives the clean run; keeping none the corrupted
    run.
    """
    clean, corrupted = _pair(model, clean_inputs, corrupted_inputs)
    kept = {check_edge(model, edge) for edge in kept_edges}
    _, clean_run = run(model, clean)
    _, corrupted_run = run(model, corrupted)
    values = {name: clean_run.outputs[name] for name in _SOURCES}
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


def reference_faithfulness(model: Blip2T5, clean_inputs: Mapping[str, Any], corrupted_inputs: Mapping[str, Any],
                           kept_edges: Iterable[str | tuple[str, str]], score: str | Score = "logprob") -> float:
    """(m(C) - m(empty)) / (m(full) - m(empty)): m(full) is the clean run's score, m(empty) the corrupted run's."""
    clean, corrupted = _pair(model, clean_inputs, corrupted_inputs)
    scorer = _scorer(score, clean)
    full, empty = scorer(run(model, clean)[0]), scorer(run(model, corrupted)[0])
    if full == empty:
        raise BlipTraceError("the clean and corrupted runs score alike, so faithfulness is undefined; use a "
                             "stronger corruption")
    return (reference_circuit_score(model, clean_inputs, corrupted_inputs, kept_edges, scorer) - empty) / (full - empty)


def t5_inputs(model: Blip2T5, processor: Any, image: Any, question: str, answer: str) -> dict[str, Tensor]:
    """The clean inputs dict for one image, question and answer: ``image_embeds`` (the vision model's output, in
    the model's dtype), ``input_ids`` (the T5 encoder's prompt as its tokenizer gives it, special tokens included:
    ``"Question: {question} Answer:"`` for BLIP-2, the question itself for InstructBLIP, whose Q-Former reads it too
    as ``qformer_input_ids``) and ``answer_id`` (the answer's first token: T5's tokenizer marks a word's start
    itself, so no leading space)."""
    _t5(model)
    pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    dtype = next(model.vision_model.parameters()).dtype
    with torch.no_grad():
        images = model.vision_model(pixel_values=pixels.to(dtype))[0]
    tokenizer = processor.tokenizer
    text = question if _is_instruct(model) else f"Question: {question} Answer:"
    prompt = tokenizer(text, add_special_tokens=True)["input_ids"]
    first = tokenizer(answer.strip(), add_special_tokens=False)["input_ids"][0]
    inputs = {"image_embeds": images, "input_ids": torch.tensor([prompt]), "answer_id": torch.tensor([first])}
    if _is_instruct(model):
        inputs["qformer_input_ids"] = torch.tensor([processor.qformer_tokenizer(question)["input_ids"]])
    return inputs
