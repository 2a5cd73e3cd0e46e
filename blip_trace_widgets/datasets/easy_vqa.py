"""Question sets: the easy-VQA data shipped by the ``easy-vqa`` package, and demo samples from it.

    >>> from blip_trace_widgets import demo_samples
    >>> image, question, answer = demo_samples()[0]
    >>> image.size, isinstance(question, str)
    ((64, 64), True)
    >>> easy_vqa_captions("test")[0][1]
    'a red triangle'

Captions ("a red circle") are built from what the dataset's own questions say about an image
(:func:`image_facts`); an image whose questions do not settle both its colour and its shape,
or contradict each other, gets none.

Images are read from the installed package, never from copies in this repository.
"""
from __future__ import annotations

import numbers
import re
from typing import Any, NamedTuple

from PIL import Image

from ..core.errors import BlipTraceError, UnavailableError

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")


class VQASample(NamedTuple):
    """One question: its image (a PIL image, or a reference that :func:`~.subsets.open_image` opens),
    the question, and the expected answer when the dataset has one."""

    image: Any
    question: str
    answer: str | None


def text_of(head: str, item: VQASample) -> str:
    """The text a model reads for a sample: the question (VQA), the prompt (captioning), or for image-text
    matching the reference caption (the text matched against the image)."""
    from ..models.heads import of

    return of(head).item_text(item)


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError:
        raise UnavailableError("the easy-vqa package is missing: pip install easy-vqa") from None
    return easy_vqa


def check_limit(limit: Any, name: str = "limit") -> int | None:
    """``limit`` checked: None (no limit) or a whole number of items, 1 or more.

        >>> check_limit(3), check_limit(None)
        (3, None)
    """
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral):
        raise BlipTraceError(f"{name} must be a whole number of items (or None for all), got "
                             f"{type(limit).__name__} {limit!r}")
    if limit < 1:
        raise BlipTraceError(f"{name} must be 1 or more (or None for all), got {limit}")
    return int(limit)


def easy_vqa_questions(split: str = "test") -> list[tuple[str, str, str]]:
    """(image path, question, answer) for every question of the easy-VQA ``split`` ('train' or 'test')."""
    easy_vqa = _easy_vqa()
    if split == "train":
        texts, answers, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        texts, answers, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise BlipTraceError(f"unknown easy-VQA split {split!r}: use 'train' or 'test'")
    return [(paths[i], t, a) for t, a, i in zip(texts, answers, ids)]


_COLOR_WORD = re.compile(r"\b(" + "|".join(COLORS) + r")\b")
_SHAPE_WORD = re.compile(r"\b(" + "|".join(SHAPES) + r")\b")
_NEGATION = re.compile(r"\b(not|no)\b")


class ImageFacts(NamedTuple):
    """What an image's questions establish: colours and shapes present, and those said to be absent."""

    colors: frozenset[str]
    shapes: frozenset[str]
    absent: frozenset[str]

    @property
    def caption(self) -> str | None:
        """'a <colour> <shape>' when exactly one of each is established and nothing contradicts it."""
        if len(self.colors) != 1 or len(self.shapes) != 1 or (self.colors | self.shapes) & self.absent:
            return None
        return f"a {next(iter(self.colors))} {next(iter(self.shapes))}"


def image_facts(questions: list[tuple[str, str]]) -> ImageFacts:
    """Facts from one image's (question, answer) pairs.

    A colour or shape answer is a fact, and so is a colour or shape the question takes for granted
    ("what color is the circle?" says there is a circle). A yes/no question states presence or absence:
    "is there a red shape?" → yes means red is present, and "is there not a circle?" → no means a circle is.
    """
    colors: set[str] = set()
    shapes: set[str] = set()
    absent: set[str] = set()
    for question, answer in questions:
        named = set(_COLOR_WORD.findall(question)) | set(_SHAPE_WORD.findall(question))
        if answer in ("yes", "no"):
            present = (answer == "yes") != bool(_NEGATION.search(question))
            if not present:
                absent |= named
                continue
        elif answer in COLORS:
            colors.add(answer)
        elif answer in SHAPES:
            shapes.add(answer)
        colors |= named & set(COLORS)
        shapes |= named & set(SHAPES)
    return ImageFacts(frozenset(colors), frozenset(shapes), frozenset(absent))


def easy_vqa_captions(split: str = "test") -> list[tuple[str, str]]:
    """(image path, caption) for every easy-VQA image of ``split`` whose questions settle its caption,
    in the order of the image ids."""
    by_image: dict[str, list[tuple[str, str]]] = {}
    for path, question, answer in easy_vqa_questions(split):
        by_image.setdefault(path, []).append((question, answer))
    pairs = [(path, image_facts(questions).caption) for path, questions in by_image.items()]
    return sorted(((path, caption) for path, caption in pairs if caption is not None), key=lambda pair: _image_number(pair[0]))


class PairSample(NamedTuple):
    """A semantic image pair: two images that differ in one attribute, one question, and each image's own answer
    to it, both from the dataset's questions."""

    image: Any
    counterfactual_image: Any
    question: str
    answer: str
    counterfactual_answer: str
    sources: tuple[str, str] = ("", "")  # where the two images came from (the dataset's files), when known


PAIR_KINDS = {"color": COLORS, "shape": SHAPES}


def easy_vqa_pairs(kind: str = "color", split: str = "test", limit: int | None = None) -> list[PairSample]:
    """easy-VQA image pairs that differ in exactly ``kind`` ("color" or "shape"): the same shape in another colour,
    or the same colour on another shape (each image's colour and shape settled by its own questions), asked the
    same question, which the dataset answers for both images, differently. Each image is used once, in the order
    of the image ids; nothing is guessed: a pair exists only where the dataset asks both images that question.

        >>> pair = easy_vqa_pairs("color", limit=1)[0]
        >>> pair.answer != pair.counterfactual_answer
        True
    """
    if not isinstance(kind, str) or kind not in PAIR_KINDS:
        raise BlipTraceError(f"unknown pair kind {kind!r}: use one of {', '.join(PAIR_KINDS)}")
    limit = check_limit(limit)
    by_image: dict[str, list[tuple[str, str]]] = {}
    for path, question, answer in easy_vqa_questions(split):
        by_image.setdefault(path, []).append((question, answer))
    facts = {path: image_facts(qs) for path, qs in by_image.items()}
    settled = sorted((p for p, f in facts.items() if f.caption is not None), key=_image_number)
    keep = "shapes" if kind == "color" else "colors"
    used: set[str] = set()
    pairs: list[PairSample] = []
    for path in settled:
        if path in used:
            continue
        asked = {q: a for q, a in by_image[path] if a in PAIR_KINDS[kind]}
        for other in settled:
            if other in used or other == path or getattr(facts[other], keep) != getattr(facts[path], keep):
                continue
            theirs = {q: a for q, a in by_image[other] if a in PAIR_KINDS[kind]}
            shared = [q for q in asked if q in theirs and theirs[q] != asked[q]]
            if shared:
                question = shared[0]
                pairs.append(PairSample(Image.open(path).convert("RGB"), Image.open(other).convert("RGB"), question,
                                        asked[question], theirs[question], (path, other)))
                used |= {path, other}
                break
        if limit is not None and len(pairs) >= limit:
            break
    return pairs


def _image_number(path: str) -> int:
    digits = re.findall(r"\d+", path.rsplit("/", 1)[-1])
    return int(digits[-1]) if digits else 0


def question_type(answer: str) -> str:
    """'color', 'shape' or 'yes/no', from the answer."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "color"


def demo_samples(per_type: int = 2, split: str = "test") -> list[VQASample]:
    """A few easy-VQA test questions, spread across colour, shape and yes/no questions (fixed choice)."""
    if per_type < 1:
        raise BlipTraceError(f"per_type must be >= 1, got {per_type}")
    picked: dict[str, list[tuple[str, str, str]]] = {"color": [], "shape": [], "yes/no": []}
    for path, question, answer in easy_vqa_questions(split):
        bucket = picked[question_type(answer)]
        if len(bucket) < per_type and all(p != path for p, _, _ in bucket):
            bucket.append((path, question, answer))
        if all(len(b) == per_type for b in picked.values()):
            break
    ordered = [b[i] for i in range(per_type) for b in picked.values()]
    return [VQASample(Image.open(path).convert("RGB"), question, answer) for path, question, answer in ordered]


def shape_box(image: Image.Image, *, tolerance: int = 40):
    """The bounding box of an easy-VQA image's shape: the pixels that differ from the plain background.

    easy-VQA draws one shape on a background of one colour; the background is the most
    common colour. Returns a :class:`~blip_trace_widgets.core.regions.Box` in fractions of the image.
    """
    import numpy as np

    from ..core.regions import Box

    pixels = np.asarray(image.convert("RGB")).astype(np.int16)
    colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    background = colours[counts.argmax()]
    shape = np.abs(pixels - background).max(axis=2) > tolerance
    if not shape.any():
        raise BlipTraceError("no shape found: every pixel is within the tolerance of the background colour")
    rows, cols = np.nonzero(shape)
    return Box.from_pixels(int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1,
                           (image.width, image.height))
