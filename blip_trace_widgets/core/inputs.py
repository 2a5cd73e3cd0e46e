"""Checked inputs: images, questions and answers turned into what the model takes.

    >>> import numpy as np
    >>> from blip_trace_widgets.core.inputs import to_rgb_image
    >>> to_rgb_image(np.zeros((4, 6, 3), dtype=np.uint8)).size
    (6, 4)

Every check raises a BlipTraceError (a ValueError) that names the fix, so widgets and the CLI can show it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BlipTraceError

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike]


#: PIL modes whose values are not 8-bit: BLIP's processor converts them as PIL does, clipping at 0 and 255.
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class ImageRangeWarning(UserWarning):
    """A 16-bit, 32-bit or floating-point image whose values BLIP's processor clips or truncates."""


def processor_rgb(image: Image.Image) -> Image.Image:
    """RGB as BLIP's image processor makes it (transformers' ``convert_to_rgb``, whichever version is installed):
    transparency composited onto white in transformers 5 (onto black, by PIL's plain conversion, in 4.x), and
    other modes converted by PIL."""
    from transformers.image_transforms import convert_to_rgb

    try:
        converted: Any = convert_to_rgb(image, return_numpy=True)
    except TypeError:  # transformers 4.x: no return_numpy, returns a PIL image
        converted = convert_to_rgb(image)
    return converted if isinstance(converted, Image.Image) else Image.fromarray(np.asarray(converted, dtype=np.uint8))


def _check_range(image: Image.Image, what: str) -> None:
    """Refuse non-finite pixels; warn when the processor's 8-bit conversion clips or truncates the values."""
    import warnings

    values = np.asarray(image, dtype=np.float64)
    if not np.isfinite(values).all():
        raise BlipTraceError(f"{what} has NaN or infinite pixel values: replace them (np.nan_to_num) before tracing")
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 255 and not (image.mode == "F" and 0 < high <= 1):
        return
    seen = ("values 0 to 1 truncated to 0 or 1 of 255, so it looks black" if high <= 1
            else "values below 0 or above 255 clipped, so much of it may look black or white")
    warnings.warn(
        f"{what} (mode {image.mode}) has values from {low:g} to {high:g}; BLIP's image processor converts it "
        f"to 8 bits as PIL does ({seen}). Traces see what the model sees. To use its full range, scale it first: "
        "Image.fromarray(np.uint8(255 * (a - a.min()) / max(np.ptp(a), 1)))", ImageRangeWarning, stacklevel=4)


def _to_rgb(image: Image.Image, what: str) -> Image.Image:
    """RGB exactly as BLIP's image processor makes it from ``image`` (see :func:`processor_rgb`), so that a trace's
    clean answer is the one ``generate()`` gives for the same image."""
    if image.width == 0 or image.height == 0:
        raise BlipTraceError(f"{what} is empty ({image.width}x{image.height} pixels); pass an image with pixels")
    if image.mode in WIDE_MODES:
        _check_range(image, what)
    return processor_rgb(image)


def to_rgb_image(image: Any) -> Image.Image:
    """A PIL RGB image from a PIL image of any mode, an HxWx3 uint8 array, or a file path.

    The conversion is BLIP's image processor's own (transparency onto white in transformers 5; 16-bit
    and floating-point values clipped to 0..255, with an :class:`ImageRangeWarning`), so a trace sees
    the image the model's ``generate()`` sees. Files are turned upright by their EXIF orientation, as
    image viewers do.
    """
    if isinstance(image, Image.Image):
        return _to_rgb(image, "the image")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise BlipTraceError(
                f"an image array must be HxWx3 uint8, got shape {image.shape} and dtype {image.dtype}; "
                "convert with np.asarray(pil_image.convert('RGB'))"
            )
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise BlipTraceError(f"the image array is empty (shape {image.shape}); pass an image with pixels")
        return Image.fromarray(image, "RGB")
    if isinstance(image, (str, os.PathLike)):
        return _open_file(Path(image))
    raise BlipTraceError(
        f"unsupported image type {type(image).__name__}: pass a PIL image, an HxWx3 uint8 numpy array or a file path"
    )


def _open_file(path: Path) -> Image.Image:
    if not path.is_file():
        raise BlipTraceError(f"image file not found: {str(path)!r}; pass an existing path, a PIL image or an array")
    try:
        with Image.open(path) as opened:
            return _to_rgb(ImageOps.exif_transpose(opened), repr(str(path)))
    except Image.DecompressionBombError as error:
        raise BlipTraceError(f"{str(path)!r} is too large to open safely ({error}); resize it first") from None
    except (UnidentifiedImageError, OSError) as error:
        raise BlipTraceError(f"cannot read {str(path)!r} as an image ({error}); pass a PNG or JPEG file") from None


def image_digest(image: Image.Image) -> str:
    """The sha1 of an RGB image's pixels and size: equal images, equal digests (for cache keys and ids)."""
    return hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()


EXAMPLES = {"question": "a question about the image, such as 'what color is the shape?'",
            "text": "the text to match with the image, such as 'a red circle'"}


def check_question(question: Any, what: str = "question") -> str:
    """The question (or, for image-text matching, the text), stripped; a clear error when it is not text."""
    if not isinstance(question, str):
        raise BlipTraceError(f"the {what} must be a string, got {type(question).__name__}")
    text = question.strip()
    if not text:
        raise BlipTraceError(f"the {what} is empty: type {EXAMPLES.get(what, 'some text')}")
    return text


def encode_prompt(tokenizer: Any, prompt: Any, max_length: int, start_token: int) -> tuple[str, list[int]]:
    """A captioner's prompt and its decoder start: as BLIP's ``generate()`` does it, the tokenizer's ids
    with the first ([CLS]) replaced by the decoder's start token and the last ([SEP]) dropped."""
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise BlipTraceError(f"the prompt must be a string (\"\" for none), got {type(prompt).__name__}")
    text = prompt.strip()
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    start = [start_token, *ids[1:-1]]
    if len(start) >= max_length:
        raise BlipTraceError(f"the prompt is {len(start)} tokens long with the decoder's start token; the decoder reads "
                             f"{max_length} positions and needs one for the caption: use at most {max_length - 1}")
    return text, start


def encode_lm_prompt(tokenizer: Any, prompt: str, max_length: int, start_token: int) -> list[int]:
    """A language model's prompt as OPT's tokenizer gives it: its start token, then the text's tokens (no end
    token, which would tell the model the text is over)."""
    ids = [start_token, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    if len(ids) > max_length:
        raise BlipTraceError(f"the prompt is {len(ids)} tokens long; the language model reads {max_length} beside the "
                             "image's queries and the answer: shorten the question")
    return ids


def encode_question(tokenizer: Any, question: str, max_length: int, what: str = "question") -> list[int]:
    """Token ids of the question (or a matcher's text) as the model sees it, special tokens included."""
    text = check_question(question, what)
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if len(ids) > max_length:
        raise BlipTraceError(
            f"the {what} is {len(ids)} tokens long, more than the model's maximum of {max_length}; shorten it"
        )
    return ids


def unknown_words(tokenizer: Any, text: str, lead: str = "") -> list[str]:
    """The words of ``text`` that ``tokenizer`` reads as its unknown token ([UNK]), each once, in order (none for
    a tokenizer without one); ``lead`` goes before each word as it does before an answer."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    if hasattr(tokenizer, "basic_tokenizer"):
        words = tokenizer.basic_tokenizer.tokenize(text)
    else:  # a word without the punctuation around it ("triangle?" is "triangle")
        words = [w.strip(".,;:!?\"'()") or w for w in text.split()]
    unknown = [w for w in words if unk in tokenizer(lead + w, add_special_tokens=False)["input_ids"]]
    return list(dict.fromkeys(unknown))


def encode_answer(tokenizer: Any, answer: str, what: str = "answer", lead: str = "") -> list[int]:
    """Token ids of an answer (or a caption, or a contrast) to score, without special tokens; it must not need
    [UNK]. ``what`` names it in messages. ``lead`` goes before it: " " for a language model whose byte-level tokens
    carry the space before a word (OPT's " red" is not its "red")."""
    article = "an" if what[0] in "aeiou" else "a"
    if not isinstance(answer, str) or not answer.strip():
        raise BlipTraceError(f"the {what} to score is empty: pass answer=None to score the model's own {what}"
                             if what != "contrast" else "the contrast is empty: pass the word to compare with")
    ids = list(tokenizer(lead + answer.strip(), add_special_tokens=False)["input_ids"])
    if not ids:
        raise BlipTraceError(f"the {what} {answer!r} has no tokens: pick {article} {what} made of words")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        unknown = unknown_words(tokenizer, answer.strip(), lead)
        several = len(unknown) > 1
        lacks = ("this word" if unknown in ([], [answer.strip()]) else
                 f"the word{'s' if several else ''} {', '.join(map(repr, unknown))}")
        raise BlipTraceError(
            f"the tokenizer cannot encode the {what} {answer!r}: the model's vocabulary lacks {lacks}, which "
            f"become{'' if several else 's'} {tokenizer.unk_token or '[UNK]'}; pick {article} {what} made of words in "
            "the model's vocabulary"
        )
    return ids
