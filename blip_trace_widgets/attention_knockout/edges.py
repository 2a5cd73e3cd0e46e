"""Attention edges to knock out: which tokens stop reading what, in which attention of which block.

    >>> from blip_trace_widgets.attention_knockout.edges import Edges
    >>> from blip_trace_widgets.core.regions import Box, Outside
    >>> Edges().describe()                       # every question token stops reading the image
    'image → question'
    >>> Edges(keys=Box(0.25, 0.25, 0.75, 0.75)).describe()
    'box (0.25, 0.25, 0.75, 0.75) → question'
    >>> Edges(keys=Outside(Box(0.25, 0.25, 0.75, 0.75)), queries="object").describe()
    'outside box (0.25, 0.25, 0.75, 0.75) → object'
    >>> Edges(attention="self", keys=0).describe()
    'token 0 → question (self-attention)'

An edge is (query token, key) in one attention of one text block. Labels follow Zhang et al.'s
convention (``"Image->Question"`` in their scripts): information flows from the keys to the queries, so
"image → question" cuts every question token's cross-attention to the image. ``queries`` names the reading
tokens: ``None`` (every token), a position, positions, a token role (``"object"``, ``"question word"``, ...)
or ``"each"`` (one group per token). ``keys`` names what they read:

* cross-attention of an image reader (question encoder, caption decoder, ITM encoder): ``None`` (every image
  token), ``"cls"`` (the ViT's [CLS]), a region (:class:`~.regions.Box`, :class:`~.regions.Outside`,
  :class:`~.regions.Mask`) or image token positions;
* self-attention, and the answer decoder's cross-attention (to the question's positions): ``None``, a
  position, positions or a role of the tokens read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.errors import BlipTraceError
from ..core.names import (
    ANSWER_DECODER,
    ATTENTION_LABELS,
    ATTENTIONS,
    BLOCK_LABELS,
    EACH_TOKEN,
    IMAGE_CLS,
    IMAGE_QUERIES,
    KNOCKOUT_BLOCKS,
    LANGUAGE_MODEL,
    LM_DECODER,
    LM_ENCODER,
    TEXT_CROSS_BLOCKS,
)
from ..core.regions import describe_region

Tokens = Any  # None, an int, a tuple of ints, or a role


def _tokens(value: Any, name: str) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise BlipTraceError(f"{name}={value!r}: pass None, a position, positions or a role")
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise BlipTraceError(f"{name} is an empty group of tokens: name at least one position, or None for all")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise BlipTraceError(f"{name}={value!r}: positions are integers")
        return tuple(int(v) for v in value)
    if hasattr(value, "token_mask"):
        return value
    raise BlipTraceError(f"{name}={value!r}: pass None, a position, positions, a role or (keys) an image region")


#: Blocks whose attention reads text, never the image's embeddings: a decoder's cross-attention reads its encoder's
#: output; a language model reads the image as its first positions (the projected queries, keys="image").
READS_TEXT: tuple[str, ...] = (*TEXT_CROSS_BLOCKS, LANGUAGE_MODEL, LM_ENCODER)


@dataclass(frozen=True)
class Edges:
    """One group of attention edges, cut together (see the module's notes)."""

    queries: Tokens = None
    keys: Any = None
    attention: str = "cross"
    block: str | None = None  # None: the head's image reader
    label: str | None = None

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise BlipTraceError(f"unknown attention {self.attention!r}: use one of {', '.join(ATTENTIONS)}")
        if self.block is not None and self.block not in KNOCKOUT_BLOCKS:
            raise BlipTraceError(f"knockout cuts the attention of a text block, not {self.block!r}: use one of "
                                 f"{', '.join(KNOCKOUT_BLOCKS)}")
        if self.block in (LANGUAGE_MODEL, LM_ENCODER) and self.attention == "cross":
            raise BlipTraceError(f"the {BLOCK_LABELS[self.block]} has no cross-attention: it reads the image as its "
                                 f"first positions. Cut its self-attention to them: Edges(block={self.block!r}, "
                                 "attention='self', keys='image')")
        object.__setattr__(self, "queries", _tokens(self.queries, "queries"))
        object.__setattr__(self, "keys", _tokens(self.keys, "keys"))
        if hasattr(self.queries, "token_mask"):
            raise BlipTraceError("queries are text tokens; an image region can only be keys")
        if self.keys == EACH_TOKEN:
            raise BlipTraceError(f"keys={EACH_TOKEN!r} is not a group: 'each' splits the queries, one group per token")
        if not self.reads_image and (self.keys == IMAGE_CLS or hasattr(self.keys, "token_mask")):
            self._refuse_image_keys()

    def _refuse_image_keys(self) -> None:
        """Refuse the image's [CLS] or a region as the keys of an attention that reads text, saying what it reads."""
        what = "the image's [CLS]" if self.keys == IMAGE_CLS else "an image region"
        where = (f"self-attention{'' if self.block is None else ' in the ' + BLOCK_LABELS[self.block]} reads the "
                 "block's own positions" if self.attention == "self" else
                 f"the {BLOCK_LABELS[str(self.block)]}'s cross-attention reads its encoder's positions")
        raise BlipTraceError(f"keys={self.keys!r} is {what}, but {where}, not the image: name those by position or "
                             "role (keys=0 is the first), or cut the image by cross-attention in the image's reader: "
                             f"Edges(keys={self.keys!r})")

    @property
    def reads_image(self) -> bool:
        """Whether the keys are image tokens (cross-attention of an image reader)."""
        return self.attention == "cross" and self.block not in READS_TEXT

    def describe(self, reader: str | None = None, keys_text: str = "question") -> str:
        """The label: keys → queries (the flow of information), the attention when it is self-attention.
        ``reader`` names every query token (default: "question", or "answer" in the answer decoder)."""
        if self.label is not None:
            return self.label
        names: dict[str, str] = {ANSWER_DECODER: "answer", LANGUAGE_MODEL: "language model", LM_DECODER: "answer",
                                 LM_ENCODER: "language model"}
        reader = reader or names.get(str(self.block), "question")
        keys = "image" if self.reads_image else reader if self.attention == "self" else keys_text
        flow = f"{self._name(self.keys, keys)} → {self._name(self.queries, reader)}"
        if self.attention == "self":
            flow += f" ({ATTENTION_LABELS['self']})"
        if self.block in READS_TEXT and not (self.block in (LANGUAGE_MODEL, LM_ENCODER) and self.queries is None):
            flow += f" in the {BLOCK_LABELS[self.block]}"
        return flow

    @staticmethod
    def _name(tokens: Any, everything: str) -> str:
        if tokens is None:
            return everything
        if tokens == IMAGE_CLS:
            return "image [CLS]"
        if isinstance(tokens, int):
            return f"token {tokens}"
        if isinstance(tokens, tuple):
            return "tokens " + ",".join(map(str, tokens))
        if isinstance(tokens, str):
            return tokens
        return _region_name(tokens)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description."""
        def plain(value: Any) -> Any:
            if value is None or isinstance(value, (str, int)):
                return value
            return list(value) if isinstance(value, tuple) else describe_region(value)

        return {"queries": plain(self.queries), "keys": plain(self.keys), "attention": self.attention,
                "block": self.block, "label": self.label}


def _region_name(region: Any) -> str:
    described = describe_region(region)
    if "box" in described:
        return "box (" + ", ".join(f"{v:g}" for v in described["box"]) + ")"
    if "outside" in described:
        return "outside " + _region_name(region.region)
    return "masked region"


#: Edge groups by name, for the command line and the explorer: what each cuts.
SHORTHANDS: dict[str, str] = {
    "image": "every token ↛ every image token (cross-attention)",
    "cls": "every token ↛ the image's [CLS]",
    "box:L,T,R,B": "every token ↛ the patches of a box, in fractions of the image",
    "outside:L,T,R,B": "every token ↛ the patches outside a box",
    "object": "every token ↛ the shape's box (found as on easy-VQA's one-shape images)",
    "background": "every token ↛ the patches outside the shape's box",
    "self:KEYS": "every token ↛ KEYS of the text by self-attention (positions such as 0 or 1,2, or a role)",
    "decoder[:KEYS]": "the answer decoder ↛ the question (all, or KEYS); BLIP-2's language model (or T5 decoder) ↛ "
                      "the image's positions",
}


def _keys_of(text: str) -> Any:
    if not text:
        return None
    try:
        picked = tuple(int(p) for p in text.split(","))
    except ValueError:
        return text  # a role
    return picked[0] if len(picked) == 1 else picked


def _box(text: str) -> Any:
    from ..core.regions import Box

    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise BlipTraceError(f"a box is four fractions L,T,R,B such as 0.25,0.25,0.75,0.75; got {text!r}")
    return Box(*values)


def decoder_edges(decoder: str = ANSWER_DECODER, keys: Any = None) -> Edges:
    """The head's decoder reading what its reader made: VQA's answer decoder's cross-attention to the question (or
    ``keys`` of it); BLIP-2's language model's self-attention to the image's positions (the projected queries); a T5
    decoder's cross-attention to the image's positions of its encoder's output."""
    if decoder == LANGUAGE_MODEL:
        return Edges(keys=IMAGE_QUERIES if keys is None else keys, attention="self", block=LANGUAGE_MODEL)
    if decoder == LM_DECODER:
        return Edges(keys=IMAGE_QUERIES if keys is None else keys, block=LM_DECODER)
    return Edges(keys=keys, block=ANSWER_DECODER)


def resolve_edges(edges: Any, image: Any = None, decoder: str | None = None) -> tuple[Edges, ...]:
    """``edges`` (one :class:`Edges`, a name of :data:`SHORTHANDS`, or a list of them) as Edges; names are
    resolved on ``image`` (``object``, ``background``) and ``decoder`` (``decoder``), as the command line does.

        >>> [e.describe() for e in resolve_edges(["image", Edges(keys="cls")])]
        ['image → question', 'image [CLS] → question']
    """
    names = ", ".join(SHORTHANDS)
    if edges is None:
        raise BlipTraceError(f"edges=None names no group to cut: pass Edges(...), a group name ({names}) or a list "
                             "of them")
    items = [edges] if isinstance(edges, (Edges, str)) else edges
    if not isinstance(items, (list, tuple)) or not items:
        raise BlipTraceError(f"edges={edges!r}: pass Edges(...), a group name ({names}) or a non-empty list of them")
    out = []
    for item in items:
        if isinstance(item, Edges):
            out.append(item)
        elif isinstance(item, str):
            out.append(parse_edges(item, image, decoder=decoder or ANSWER_DECODER))
        else:
            raise BlipTraceError(f"edges: {item!r} is not a group: pass Edges(...) or a group name ({names})")
    return tuple(out)


def parse_edges(text: str, image: Any = None, queries: Tokens = None, decoder: str = ANSWER_DECODER) -> Edges:
    """The edge group a name stands for (see :data:`SHORTHANDS`); ``object`` and ``background`` need the image.

        >>> parse_edges("box:0,0,0.5,0.5").describe()
        'box (0, 0, 0.5, 0.5) → question'
        >>> parse_edges("decoder:1").describe()
        'token 1 → answer in the answer decoder'
    """
    from ..core.regions import Outside

    name, _, rest = text.strip().partition(":")
    if name == "image" and not rest:
        return Edges(queries=queries)
    if name == "cls" and not rest:
        return Edges(queries=queries, keys=IMAGE_CLS)
    if name in ("box", "outside"):
        box = _box(rest)
        return Edges(queries=queries, keys=box if name == "box" else Outside(box))
    if name in ("object", "background") and not rest:
        if image is None:
            raise BlipTraceError(f"edges {name!r} find the shape in the image: give an image")
        from ..core.inputs import to_rgb_image
        from ..datasets.easy_vqa import shape_box

        try:
            box = shape_box(to_rgb_image(image))
        except ValueError as error:
            raise BlipTraceError(f"edges {name!r}: {error}; name a box instead (box:L,T,R,B)") from None
        label = f"{'object' if name == 'object' else 'background'} → question"
        return Edges(queries=queries, keys=box if name == "object" else Outside(box), label=label)
    if name == "self" and rest:
        return Edges(queries=queries, keys=_keys_of(rest), attention="self")
    if name == "decoder":
        return decoder_edges(decoder, _keys_of(rest))
    raise BlipTraceError(f"unknown edges {text!r}: use one of {', '.join(SHORTHANDS)}")
