"""Where a circuit's node sits in a causal map: the traced block, kind, layer and head of a node's name.

    >>> from blip_trace_widgets import load_model
    >>> bundle = load_model("demo")
    >>> node_cell(bundle, "qe.L3.X0")
    NodeCell(block='question_encoder', kind='cross_attn_head', layer=3, head=0)
    >>> node_cell(bundle, "dec.L1.mlp").kind, node_cell(bundle, "qe.emb").kind
    ('mlp', 'hidden')

A circuit block's nodes belong to the model's text blocks in the order its head lists them: BLIP VQA's ``qe`` and
``dec`` are the question encoder and the answer decoder; BLIP-2's ``qf`` and ``lm`` the Q-Former and the language
model; with Flan-T5, ``qf``, ``enc`` and ``dec`` the Q-Former, the T5 encoder and the T5 decoder. A head node's map
is the block's map of that head kind (its row is the head), an MLP's the block's MLP map, an embedding's the block's
hidden states (it is the input of layer 0). The image input (``img``) has no map of its own here: the vision
encoder's map is ``VisionTraceExplorer``'s.
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple

from ..core.errors import BlipTraceError
from ..models.heads import head_of_model
from .graph import circuit_graph
from .names import CROSS, IMAGE, OUT, SELF

_NODE = re.compile(r"^(?P<prefix>[a-z]+)\.(?:emb|L(?P<layer>\d+)\.(?:(?P<kind>[HX])(?P<head>\d+)|mlp))$")
#: The causal-trace kind of a head node, by its letter.
HEAD_KINDS = {SELF: "self_attn_head", CROSS: "cross_attn_head"}


class NodeCell(NamedTuple):
    """A node's place in a causal map: its block and kind, and its layer and head (None where it has none)."""

    block: str
    kind: str
    layer: int
    head: int | None


def node_blocks(bundle: Any) -> dict[str, str]:
    """The traced block of each circuit block prefix of ``bundle``'s graph, in the order the graph's nodes run."""
    prefixes = list(dict.fromkeys(node.split(".")[0] for node in circuit_graph(bundle).nodes
                                  if node not in (IMAGE, OUT)))
    text_blocks = head_of_model(bundle.model).blocks[: len(prefixes)]
    return dict(zip(prefixes, text_blocks))


def node_cell(bundle: Any, node: str) -> NodeCell:
    """Where ``node`` sits in a causal map of ``bundle`` (see the module); the image input and unknown names are
    refused, naming what to do instead."""
    if node == IMAGE:
        raise BlipTraceError("the image input has no map here: trace the vision encoder (VisionTraceExplorer, or "
                             "trace(..., block='vision_encoder')) to see which patches carry the answer")
    found = _NODE.match(node)
    blocks = node_blocks(bundle)
    if found is None or found["prefix"] not in blocks:
        raise BlipTraceError(f"{node!r} is not a node of this model's circuit graph: pick one of "
                             "circuit_graph(bundle).nodes (such as 'qe.L0.H0' or 'dec.L1.mlp')")
    block, layer = blocks[found["prefix"]], int(found["layer"] or 0)
    if found["kind"] is not None:
        return NodeCell(block, HEAD_KINDS[found["kind"]], layer, int(found["head"]))
    return NodeCell(block, "mlp" if node.endswith(".mlp") else "hidden", layer, None)
