"""Token roles: which positions of a question are its first token, its words, its object noun, its last token.

    >>> from blip_trace_widgets.core.roles import token_roles
    >>> token_roles(["[CLS]", "what", "color", "is", "the", "sh", "##ape", "?", "[SEP]"])  # doctest: +NORMALIZE_WHITESPACE
    ['first', 'question words', 'question words', 'question words', 'question words',
     'object', 'object', 'question words', 'last']

Questions differ in length, so averages over many questions group positions into roles.
The object noun is the last content word by default (or a rule of your own); corrupting
``corrupt_tokens="object"`` uses the same rule.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from .errors import BlipTraceError
from .names import CAPTION_DECODER, ITM_ENCODER, facts, is_head_kind

ROLES: tuple[str, ...] = ("first", "question words", "object", "last")
STOPWORDS = frozenset(
    "a an the of in on at to is are was were be been do does did what which who whom whose where when why how many much "
    "color colour kind type there this that these those it its and or with by for from as any some image picture photo "
    "shown show".split()
)
ObjectRule = Callable[[Sequence[str]], Sequence[int]]


def words_of(tokens: Sequence[str]) -> list[list[int]]:
    """Positions of each word: a word piece starting with ``##`` joins the word before it."""
    words: list[list[int]] = []
    for position, token in enumerate(tokens):
        if token.startswith("##") and words:
            words[-1].append(position)
        else:
            words.append([position])
    return words


def last_content_word(tokens: Sequence[str]) -> list[int]:
    """Positions of the last alphabetic word that is not a stop word (the default object noun)."""
    for word in reversed(words_of(tokens)[1:-1]):
        text = "".join(tokens[p].removeprefix("##") for p in word).lower()
        if text.isalpha() and text not in STOPWORDS:
            return word
    return []


def token_roles(tokens: Sequence[str], object_rule: ObjectRule | None = None) -> list[str]:
    """The role of each position: first, last, the object noun's pieces, and question words for the rest."""
    count = len(tokens)
    if count == 0:
        return []
    roles = ["question words"] * count
    for position in (object_rule or last_content_word)(tokens):
        if not 0 <= position < count:
            raise BlipTraceError(f"the object rule gave position {position} for {count} tokens")
        roles[position] = "object"
    roles[-1] = "last"
    roles[0] = "first"
    return roles


#: How roles are named in figures where the positions are not a question's: a caption decoder's positions are the
#: caption before the scored word, an ITM encoder's the text matched.
ROLE_LABELS: dict[str, dict[str, str]] = {
    CAPTION_DECODER: {"first": "[DEC]", "question words": "earlier words", "object": "last content word",
                      "last": "last (predicting)"},
    ITM_ENCODER: {"question words": "text words", "object": "last content word"},
}


def role_label(role: str, block: str) -> str:
    """The name of ``role`` in figures of ``block``'s positions."""
    return ROLE_LABELS.get(block, {}).get(role, role)


def position_roles(block: str, tokens: Sequence[str], object_rule: ObjectRule | None = None,
                   kind: str | None = None) -> list[str]:
    """Roles of a trace's rows: token roles for the text blocks; for image-side traces the region
    labels themselves ([CLS], r0c0, ...), which line up across images of one grid; for head maps the
    heads themselves (h0, h1, ...), which line up across every question."""
    if facts(block).image_side or (kind is not None and is_head_kind(kind)):
        return list(tokens)
    return token_roles(tokens, object_rule)


def first_content_word(words: Sequence[str]) -> int:
    """The caption word a trace scores by default: the first that is not a stop word ("red" in "a red circle";
    0 when every word is one)."""
    return next((i for i, word in enumerate(words) if word.lower() not in STOPWORDS and word.isalpha()), 0)
