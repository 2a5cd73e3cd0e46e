"""Every name of the circuits subpackage: node and channel names, the edge arrow, methods, directions and defaults.

    >>> head_name("qe", 1, "H", 0), channel_name("dec", 2, "X", 3, "k"), edge_name("qe.L1.H0", "dec.L2.X3.k")
    ('qe.L1.H0', 'dec.L2.X3.k', 'qe.L1.H0 → dec.L2.X3.k')
    >>> split_edge("qe.emb -> qe.L0.mlp")
    ('qe.emb', 'qe.L0.mlp')
"""
from __future__ import annotations

from typing import Literal

from ..causal_trace import directions
from ..core.errors import BlipTraceError

ARROW = "→"
ASCII_ARROW = "->"
IMAGE = "img"
OUT = "out"
QE, DEC = "qe", "dec"
BLOCK_PREFIXES: tuple[str, ...] = (QE, DEC)
#: BLIP-2's and InstructBLIP's blocks: the Q-Former and the (OPT) language model.
QF, LM = "qf", "lm"
QUERY_PREFIXES: tuple[str, ...] = (QF, LM)
#: What sends to a language-model channel: every Q-Former node and the language model's earlier nodes.
QF_LM = "qf+lm"
#: A Flan-T5 language model's blocks (BLIP-2 / InstructBLIP with T5): its encoder, then its decoder (``dec``).
ENC = "enc"
#: What sends to a T5 encoder channel (and to the decoder's cross-attention keys and values): every Q-Former node
#: and the encoder's earlier nodes.
QF_ENC = "qf+enc"
#: Every block a node name may start with.
BLOCK_NAMES: tuple[str, ...] = (IMAGE, QE, DEC, QF, LM, ENC)
#: The graph's blocks, as its figure draws them left to right: the image, the question encoder, the answer decoder.
BANDS: dict[str, str] = {IMAGE: "vision", QE: "question encoder", DEC: "answer decoder"}
#: BLIP-2's and InstructBLIP's bands: the ViT's output, the Q-Former, the language model.
QUERY_BANDS: dict[str, str] = {IMAGE: "ViT image input", QF: "Q-Former", LM: "language model"}
#: BLIP-2's and InstructBLIP's bands with a T5 language model.
T5_BANDS: dict[str, str] = {IMAGE: "ViT image input", QF: "Q-Former", ENC: "T5 encoder", DEC: "T5 decoder"}
SELF, CROSS = "H", "X"  # a self-attention head, a cross-attention head
CHANNELS = ("q", "k", "v")

Method = Literal["eap", "eap-ig", "exact"]
Direction = Literal["noise", "denoise"]
METHODS: tuple[str, ...] = ("eap", "eap-ig", "exact")
METHOD_LABELS: dict[str, str] = {"eap": "EAP", "eap-ig": "EAP-IG", "exact": "exact path patching"}
#: The trace's two directions (:mod:`~blip_trace_widgets.causal_trace.directions`), noising first: a circuit's default.
DIRECTIONS: tuple[str, ...] = ("noise", "denoise")
#: Per direction: whether it noises (corrupted senders into the clean run) rather than restores.
NOISING: dict[str, bool] = {name: not directions.of(name).restores for name in DIRECTIONS}
#: Older names, still read: "restore" was the circuits' word for denoising before they shared the trace's.
DIRECTION_ALIASES = {"restore": "denoise"}
METRICS: tuple[str, ...] = ("logprob", "prob")
DEFAULT_STEPS = 5
DEFAULT_SAMPLES = 5
DEFAULT_SEED = 0
DEFAULT_TOP = 50
#: Circuit sizes of a faithfulness curve, as fractions of the graph's edges.
CURVE_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.5, 1.0)
#: A run of exact edge scores longer than this many seconds is warned about before it starts.
WARN_SECONDS = 30.0
FORMAT = 1


def emb_name(block: str) -> str:
    return f"{block}.emb"


def head_name(block: str, layer: int, kind: str, head: int) -> str:
    return f"{block}.L{layer}.{kind}{head}"


def mlp_name(block: str, layer: int) -> str:
    return f"{block}.L{layer}.mlp"


def channel_name(block: str, layer: int, kind: str, head: int, part: str) -> str:
    return f"{head_name(block, layer, kind, head)}.{part}"


def edge_name(sender: str, receiver: str) -> str:
    return f"{sender} {ARROW} {receiver}"


def split_edge(name: str) -> tuple[str, str]:
    """(sender, receiver) of an edge written with "→" or "->"."""
    for arrow in (ARROW, ASCII_ARROW):
        if arrow in name:
            sender, receiver = (part.strip() for part in name.split(arrow, 1))
            return sender, receiver
    raise BlipTraceError(f"{name!r} is not an edge: write it as 'sender {ARROW} receiver' (or with '->')")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise BlipTraceError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    return method


def check_direction(direction: str) -> str:
    """The direction, "noise" or "denoise" ("restore", the older name, is read as "denoise")."""
    direction = DIRECTION_ALIASES.get(direction, direction)
    if direction not in NOISING:
        raise BlipTraceError(f"unknown direction {direction!r}: use 'noise' (corrupted senders in the clean run) or "
                             "'denoise' (clean senders in the corrupted run)")
    return direction
