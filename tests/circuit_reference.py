"""Reference loops for circuit discovery on BLIP VQA: path patching, edge scores and circuit runs, one forward
pass at a time through the Hugging Face model's own modules (forward hooks that are always removed), written from
the definitions alone so that a fast engine can be checked against them.

    >>> import torch
    >>> from blip_trace_widgets.data import demo_samples
    >>> from blip_trace_widgets.loading import load_model
    >>> bundle = load_model("demo")
    >>> sample = demo_samples()[0]
    >>> clean = vqa_inputs(bundle.model, bundle.processor, sample.image, sample.question, sample.answer)
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> noisy = dict(clean, image_embeds=clean["image_embeds"] + torch.randn_like(clean["image_embeds"]))
    >>> base = reference_score(bundle.model, clean)
    >>> base == reference_path_patch(bundle.model, clean, noisy, [], [])   # patching nothing: the clean score
    True
    >>> len(reference_edges(bundle.model))
    3417
    >>> effect = reference_edge_score(bundle.model, clean, noisy, "img -> qe.L0.X0.k")
    >>> isinstance(effect, float) and effect != 0.0
    True

The graph (every name is a plain string):

* nodes: ``img`` (the vision encoder's output ``image_embeds``); ``qe.emb`` and ``dec.emb`` (the question encoder's
  and the answer decoder's embedding outputs, the inputs of their layer 0); ``{qe,dec}.L{l}.H{h}`` (self-attention
  head h of layer l: its slice of the attention context, before the output dense); ``{qe,dec}.L{l}.X{h}``
  (cross-attention head h, likewise); ``{qe,dec}.L{l}.mlp`` (``output.dense(intermediate(x))`` before the residual
  add and LayerNorm); ``out`` (the LM head on the decoder's final state).
* channels (a node's inputs): ``<head>.q``, ``<head>.k``, ``<head>.v`` (the hidden state that head's own
  query/key/value rows project; for a cross-attention head's k/v the states it attends to: ``image_embeds`` in the
  question encoder, the question encoder's final output in the decoder); ``{qe,dec}.L{l}.mlp`` (the MLP's input,
  the name of the node it feeds); ``out`` (the decoder's final state).
* edges ``"u → r"`` (``"u -> r"`` is accepted): every node upstream of channel r in the computation sends to it.
  Within a text block: the embedding, every head and MLP of an earlier layer and, in the same layer, the
  self-attention heads to the cross-attention q and the MLP, the cross-attention heads to the MLP; ``img`` to the
  question encoder's cross-attention k/v; every question-encoder node (``qe.emb`` included) to the decoder's
  cross-attention k/v; every decoder node to ``out``.

BLIP's BERT is post-LayerNorm, so a channel's input is not a sum of node outputs; patching is defined by freezing
(Wang et al. 2022, Goldowsky-Dill et al. 2023): see :func:`reference_path_patch` and :func:`reference_circuit_score`.
The score is log p (or p) of the first answer token after the decoder's start token, in teacher forcing, averaged
over the batch's rows.
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
from blip_trace_widgets.errors import BlipTraceError
from torch import Tensor, nn

ARROW = "→"
BLOCKS = ("qe", "dec")
Score = Callable[[Tensor], float]
BlipVQA = Any  # a transformers BlipForQuestionAnswering (its submodules are reached by attribute)

_MLP = re.compile(r"^(qe|dec)\.L(\d+)\.mlp$")
_HEAD_CHANNEL = re.compile(r"^(qe|dec)\.L(\d+)\.([HX])(\d+)\.([qkv])$")


# ----------------------------------------------------------------------------------------------------------------
# The graph


def _layers(model: BlipVQA, block: str) -> Any:
    stack = model.text_encoder if block == "qe" else model.text_decoder.bert
    return stack.encoder.layer


@dataclass(frozen=True)
class Shape:
    """What the graph depends on: the layers of each text block and the heads per attention sublayer."""

    qe_layers: int
    dec_layers: int
    heads: int

    @classmethod
    def of(cls, model: BlipVQA) -> Shape:
        heads = int(_layers(model, "qe")[0].attention.self.num_attention_heads)
        return cls(len(_layers(model, "qe")), len(_layers(model, "dec")), heads)

    def layers(self, block: str) -> int:
        return self.qe_layers if block == "qe" else self.dec_layers

    def layer_nodes(self, block: str, layer: int) -> list[str]:
        name = f"{block}.L{layer}"
        heads = range(self.heads)
        return [f"{name}.H{h}" for h in heads] + [f"{name}.X{h}" for h in heads] + [f"{name}.mlp"]

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
                for kind in "HX":
                    nodes = [f"{name}.{kind}{h}" for h in range(self.heads)]
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
            return ["img"] if block == "qe" else self.block_nodes("qe")
        earlier = self.block_nodes(block)[: 1 + layer * (2 * self.heads + 1)]
        same = self.layer_nodes(block, layer)
        if head and head.group(3) == "H":
            return earlier
        if head:  # a cross-attention query: after this layer's self-attention
            return earlier + same[: self.heads]
        return earlier + same[:-1]  # the MLP: after this layer's self- and cross-attention


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
    nodes = ("img", *shape.block_nodes("qe"), *shape.block_nodes("dec"), "out")
    return Graph(nodes, sublayers, channels, {c: tuple(shape.senders(c)) for c in channels})


def graph(model: BlipVQA) -> Graph:
    """The model's graph (computed once per shape)."""
    return _graph_of(Shape.of(model))


def reference_nodes(model: BlipVQA) -> list[str]:
    """Every node, in topological order: ``img``, the question encoder's, the decoder's, then ``out``."""
    return list(graph(model).nodes)


def reference_channels(model: BlipVQA) -> list[str]:
    """Every receiver channel, in topological order (``out`` last)."""
    return list(graph(model).channels)


def reference_senders(model: BlipVQA, channel: str) -> list[str]:
    """The nodes that send to ``channel``: every node upstream of it in the computation (see the module's text)."""
    senders = graph(model).senders.get(channel)
    if senders is None:
        raise BlipTraceError(f"{channel!r} is not a receiver channel of this model; use one of "
                             f"reference_channels(model), e.g. 'qe.L0.H0.q', 'dec.L1.X2.k', 'qe.L0.mlp' or 'out'")
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
                             "e.g. 'qe.L1.H0 → dec.L2.X3.k'")
    return parts[0], parts[1]


def reference_edges(model: BlipVQA) -> list[str]:
    """Every edge ``"u → r"`` of the graph, receivers in topological order, senders in topological order."""
    return [edge_name(u, r) for r in reference_channels(model) for u in reference_senders(model, r)]


def check_edge(model: BlipVQA, edge: str | tuple[str, str]) -> tuple[str, str]:
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
    """One forward's tensors: the question, its mask, the image embeddings and the teacher-forced answer."""

    input_ids: Tensor
    attention_mask: Tensor
    image_embeds: Tensor
    answer_ids: Tensor
    answer_mask: Tensor


def prepare_inputs(model: BlipVQA, inputs: Mapping[str, Any], fallback: Inputs | None = None) -> Inputs:
    """:class:`Inputs` from a dict: ``input_ids``, optional ``attention_mask``, ``image_embeds`` or
    ``pixel_values``, ``answer_ids`` (or ``decoder_input_ids``: the decoder's start token then the answer) and
    optional ``decoder_attention_mask``. A key left out is taken from ``fallback`` (the clean inputs)."""
    def pick(*keys: str) -> Tensor | None:
        return next((inputs[k] for k in keys if inputs.get(k) is not None), None)

    images = pick("image_embeds")
    if images is None and pick("pixel_values") is not None:
        with torch.no_grad():
            images = model.vision_model(pixel_values=pick("pixel_values"))[0]
    ids, answer = pick("input_ids"), pick("answer_ids", "decoder_input_ids")
    if fallback is not None:
        ids = fallback.input_ids if ids is None else ids
        images = fallback.image_embeds if images is None else images
        answer = fallback.answer_ids if answer is None else answer
    if ids is None or images is None or answer is None:
        raise BlipTraceError("the inputs need 'input_ids', 'image_embeds' (or 'pixel_values') and 'answer_ids' "
                             "(the decoder's start token then the answer's tokens)")
    mask = pick("attention_mask")
    answer_mask = pick("decoder_attention_mask")
    return Inputs(ids, torch.ones_like(ids) if mask is None else mask, images, answer,
                  torch.ones_like(answer) if answer_mask is None else answer_mask)


def _check_pair(clean: Inputs, corrupted: Inputs) -> None:
    for name in ("input_ids", "attention_mask", "image_embeds", "answer_ids", "answer_mask"):
        a, b = getattr(clean, name), getattr(corrupted, name)
        if a.shape != b.shape:
            raise BlipTraceError(f"the clean and corrupted {name} differ in shape ({tuple(a.shape)} and "
                                 f"{tuple(b.shape)}); pad them to the same length")
    if not (torch.equal(clean.attention_mask, corrupted.attention_mask)
            and torch.equal(clean.answer_mask, corrupted.answer_mask)):
        raise BlipTraceError("the clean and corrupted attention masks differ; pad both inputs alike")


def first_answer_token(answer_ids: Tensor, metric: str = "logprob") -> Score:
    """The default score: log p (``"logprob"``) or p (``"prob"``) of ``answer_ids[:, 1]`` (the first answer token
    after the decoder's start token) at decoder position 0, averaged over rows."""
    if metric not in ("logprob", "prob"):
        raise BlipTraceError(f"metric {metric!r} is not known; use 'logprob' or 'prob'")
    if answer_ids.shape[1] < 2:
        raise BlipTraceError("answer_ids needs the decoder's start token and at least one answer token")
    token = answer_ids[:, 1]

    def score(logits: Tensor) -> float:
        logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        logprobs = torch.log_softmax(logits[:, 0], dim=-1)
        picked = logprobs[torch.arange(len(token)), token].double()
        return float((picked if metric == "logprob" else picked.exp()).mean())

    return score


def _scorer(score: str | Score, clean: Inputs) -> Score:
    return first_answer_token(clean.answer_ids, score) if isinstance(score, str) else score


# ----------------------------------------------------------------------------------------------------------------
# One hooked forward


@dataclass
class Plan:
    """What one forward substitutes and what it saw: ``nodes`` (node -> output to use instead of its own),
    ``channels`` (channel -> input its projection / MLP / LM head reads instead of the normal one); filled during
    the forward: ``outputs`` (every node's output as used) and ``seen`` (every channel's input as used)."""

    nodes: dict[str, Tensor] = field(default_factory=dict)
    channels: dict[str, Tensor] = field(default_factory=dict)
    outputs: dict[str, Tensor] = field(default_factory=dict)
    seen: dict[str, Tensor] = field(default_factory=dict)


def _node_hook(plan: Plan, name: str) -> Callable[..., Tensor]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        value = plan.nodes.get(name, output)
        plan.outputs[name] = value
        return value

    return hook


def _heads_hook(plan: Plan, names: list[str], size: int) -> Callable[..., tuple[Any, ...]]:
    """On a ``BlipTextSelfAttention``: its context is the heads' outputs side by side; substitute / record each."""
    def hook(module: nn.Module, args: tuple[Any, ...], output: tuple[Any, ...]) -> tuple[Any, ...]:
        context = output[0]
        pieces = []
        for h, name in enumerate(names):
            piece = plan.nodes.get(name, context[..., h * size:(h + 1) * size])
            plan.outputs[name] = piece
            pieces.append(piece)
        return (torch.cat(pieces, dim=-1), *output[1:])

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


def _input_hook(plan: Plan, channel: str) -> Callable[..., tuple[Tensor] | None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Tensor] | None:
        seen = plan.channels.get(channel, args[0])
        plan.seen[channel] = seen
        return (seen,) if channel in plan.channels else None

    return hook


def _layer_hooks(plan: Plan, layer: Any, name: str) -> Iterator[torch.utils.hooks.RemovableHandle]:
    for kind, attention in (("H", layer.attention.self), ("X", layer.crossattention.self)):
        size = attention.attention_head_size
        heads = [f"{name}.{kind}{h}" for h in range(attention.num_attention_heads)]
        yield attention.register_forward_hook(_heads_hook(plan, heads, size))
        for letter, linear in (("q", attention.query), ("k", attention.key), ("v", attention.value)):
            yield linear.register_forward_hook(_projection_hook(plan, [f"{h}.{letter}" for h in heads], size))
    yield layer.intermediate.register_forward_pre_hook(_input_hook(plan, f"{name}.mlp"))
    yield layer.output.dense.register_forward_hook(_node_hook(plan, f"{name}.mlp"))


@contextmanager
def hooked(model: BlipVQA, plan: Plan) -> Iterator[Plan]:
    """Every hook of ``plan`` on the model's modules for the duration of the block; always removed."""
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for block, stack in (("qe", model.text_encoder), ("dec", model.text_decoder.bert)):
            handles.append(stack.embeddings.register_forward_hook(_node_hook(plan, f"{block}.emb")))
            for index, layer in enumerate(stack.encoder.layer):
                handles.extend(_layer_hooks(plan, layer, f"{block}.L{index}"))
        handles.append(model.text_decoder.cls.register_forward_pre_hook(_input_hook(plan, "out")))
        yield plan
    finally:
        for handle in handles:
            handle.remove()


def run(model: BlipVQA, inputs: Inputs, plan: Plan | None = None) -> tuple[Tensor, Plan]:
    """One forward (question encoder, then answer decoder) under ``plan``; returns the decoder's logits and the
    plan, whose ``outputs`` and ``seen`` now hold every node's output and every channel's input."""
    plan = Plan() if plan is None else plan
    images = plan.nodes.get("img", inputs.image_embeds)
    plan.outputs["img"] = images
    was_training = model.training
    if was_training:
        model.eval()
    try:
        with torch.no_grad(), hooked(model, plan):
            image_mask = torch.ones(images.shape[:-1], dtype=torch.long, device=images.device)
            question = model.text_encoder(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                                          encoder_hidden_states=images, encoder_attention_mask=image_mask,
                                          return_dict=True).last_hidden_state
            logits = model.text_decoder(input_ids=inputs.answer_ids, attention_mask=inputs.answer_mask,
                                        encoder_hidden_states=question, encoder_attention_mask=inputs.attention_mask,
                                        use_cache=False, return_dict=True).logits
    finally:
        if was_training:
            model.train()
    plan.outputs["out"] = logits
    return logits, plan


def frozen_inputs(model: BlipVQA, base: Inputs, nodes: Mapping[str, Tensor], channels: Iterable[str]
                  ) -> dict[str, Tensor]:
    """The inputs ``channels`` see in a forward on ``base`` where every node's output is fixed to ``nodes``
    (which must name every node): residual additions and LayerNorms are recomputed from those outputs."""
    missing = set(reference_nodes(model)) - {"out"} - set(nodes)
    if missing:
        raise BlipTraceError(f"a frozen forward needs every node's output; missing {sorted(missing)[:3]}")
    _, plan = run(model, base, Plan(nodes=dict(nodes)))
    return {channel: plan.seen[channel] for channel in channels}


# ----------------------------------------------------------------------------------------------------------------
# Path patching and edges


def reference_score(model: BlipVQA, inputs: Mapping[str, Any], score: str | Score = "logprob") -> float:
    """The score of a plain forward on ``inputs`` (nothing patched)."""
    prepared = prepare_inputs(model, inputs)
    logits, _ = run(model, prepared)
    return _scorer(score, prepared)(logits)


def _pair(model: BlipVQA, clean_inputs: Mapping[str, Any], corrupted_inputs: Mapping[str, Any]
          ) -> tuple[Inputs, Inputs]:
    clean = prepare_inputs(model, clean_inputs)
    corrupted = prepare_inputs(model, corrupted_inputs, fallback=clean)
    _check_pair(clean, corrupted)
    return clean, corrupted


def _check_path(model: BlipVQA, senders: Sequence[str], receivers: Sequence[str]) -> None:
    nodes = set(reference_nodes(model)) - {"out"}
    unknown = [s for s in senders if s not in nodes]
    if unknown:
        raise BlipTraceError(f"{unknown[0]!r} is not a sender node; use names from reference_nodes(model) "
                             "other than 'out'")
    for receiver in receivers:
        if not set(reference_senders(model, receiver)) & set(senders):
            raise BlipTraceError(f"no sender in {list(senders)} reaches the receiver {receiver!r} directly; drop "
                                 "it or add one of reference_senders(model, receiver)")


def reference_path_patch(model: BlipVQA, clean_inputs: Mapping[str, Any], corrupted_inputs: Mapping[str, Any],
                         senders: Sequence[str], receivers: Sequence[str], direction: str = "noise",
                         score: str | Score = "logprob") -> float:
    """The score of path patching from the nodes ``senders`` (S) to the receiver channels ``receivers`` (R):
    m(run B), not its difference from the base run (that is :func:`reference_edge_score`).

    Noising (``direction="noise"``): base = clean run, source = corrupted run; denoising (``"denoise"``): the
    other way round. Run A: a forward on the base input where every node in S outputs its source-run value and
    every other node is frozen at its base-run value (residual sums and LayerNorms recomputed); it records each
    receiver's input. Run B: a plain base forward where only the receivers read run A's inputs (a head's channel:
    only that head's q/k/v rows; the MLP's: its input, not the residual around it; ``out``: the LM head's input),
    everything else computed anew. The score is always of the clean answer's first token.
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


def reference_edge_score(model: BlipVQA, clean_inputs: Mapping[str, Any], corrupted_inputs: Mapping[str, Any],
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


def _alike(model: BlipVQA, channels: Iterable[str], kept: set[tuple[str, str]]) -> list[list[str]]:
    """Channels grouped by (their senders, which of those edges are kept): one frozen forward serves a group, as
    every channel in it reads the same node outputs (a saving only; one forward per channel gives the same)."""
    groups: dict[tuple[tuple[str, bool], ...], list[str]] = {}
    for channel in channels:
        key = tuple((u, (u, channel) in kept) for u in reference_senders(model, channel))
        groups.setdefault(key, []).append(channel)
    return list(groups.values())


def reference_circuit_score(model: BlipVQA, clean_inputs: Mapping[str, Any], corrupted_inputs: Mapping[str, Any],
                            kept_edges: Iterable[str | tuple[str, str]], score: str | Score = "logprob") -> float:
    """m(C): the score of the circuit run that keeps the edges ``kept_edges`` and corrupts every other edge.

    Node by node in topological order, on the clean input: each receiver channel r's input is a frozen forward
    (every node's output fixed, residual sums and LayerNorms recomputed) in which a sender u contributes its value
    in this circuit run if ``u → r`` is kept and its corrupted-run value otherwise (senders of nothing upstream:
    their clean value, which cannot reach r); each node then computes its output from its own channels' inputs
    (a head from its q/k/v, the MLP from its input); ``out`` reads its channel. ``img``, ``qe.emb`` and
    ``dec.emb`` have no channels: their value in the circuit run is the clean one. Keeping every edge gives the
    clean run; keeping none gives the corrupted run.
    """
    clean, corrupted = _pair(model, clean_inputs, corrupted_inputs)
    kept = {check_edge(model, edge) for edge in kept_edges}
    _, clean_run = run(model, clean)
    _, corrupted_run = run(model, corrupted)
    values = {name: clean_run.outputs[name] for name in ("img", "qe.emb", "dec.emb")}
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


def reference_faithfulness(model: BlipVQA, clean_inputs: Mapping[str, Any], corrupted_inputs: Mapping[str, Any],
                           kept_edges: Iterable[str | tuple[str, str]], score: str | Score = "logprob") -> float:
    """(m(C) - m(empty)) / (m(full) - m(empty)): m(full) is the clean run's score, m(empty) the corrupted run's."""
    clean, corrupted = _pair(model, clean_inputs, corrupted_inputs)
    scorer = _scorer(score, clean)
    full, empty = scorer(run(model, clean)[0]), scorer(run(model, corrupted)[0])
    if full == empty:
        raise BlipTraceError("the clean and corrupted runs score alike, so faithfulness is undefined; use a "
                             "stronger corruption")
    return (reference_circuit_score(model, clean_inputs, corrupted_inputs, kept_edges, scorer) - empty) / (full - empty)


def vqa_inputs(model: BlipVQA, processor: Any, image: Any, question: str, answer: str) -> dict[str, Tensor]:
    """The clean inputs dict for one image, question and answer: ``input_ids``, ``attention_mask``,
    ``image_embeds`` (the vision encoder's output) and ``answer_ids`` (the decoder's start token, then the
    answer's tokens and [SEP])."""
    encoded = processor(images=image, text=question, return_tensors="pt")
    with torch.no_grad():
        images = model.vision_model(pixel_values=encoded["pixel_values"])[0]
    answer_ids = processor.tokenizer(answer, return_tensors="pt")["input_ids"].clone()
    answer_ids[:, 0] = model.config.text_config.bos_token_id
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
            "image_embeds": images, "answer_ids": answer_ids}
