"""Corruptions: noise on the image embeddings (the paper's), on patch embeddings, pixels or question tokens.

    >>> import torch
    >>> from blip_trace_widgets import GaussianNoise
    >>> clean = torch.randn(1, 5, 8)
    >>> noisy = GaussianNoise(scale=3.0)(clean, 4, torch.Generator().manual_seed(0))
    >>> tuple(noisy.shape)
    (4, 5, 8)

A corruption is any callable ``(clean [1, ...], samples, generator) -> [samples, ...]``.
What ``clean`` is depends on ``TraceConfig.corrupt``: the vision encoder's output
(``"image"``, the paper's choice), the patch embeddings before the vision encoder
(``"patches"``), the pixels (``"pixels"``) or the question's token embeddings
(``"question"``). The noise corruptions take a ``region`` (a :class:`~.regions.Box`,
:class:`~.regions.Mask` or :class:`~.regions.Outside`) to corrupt only the patches, or
pixels, it covers; :class:`Blur` and :class:`Grey` work on pixels.

The noise is drawn on the CPU in float32 from the given generator, so one seed gives
the same corruption on every device; it is then cast to the embeddings' device and dtype.
The built-in corruptions are frozen dataclasses, so they can serve as cache keys.
"""
from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from ..core.errors import BlipTraceError


class Corruption(Protocol):
    def __call__(self, clean: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor: ...


def _draw(clean: torch.Tensor, samples: int, draw: Callable[[tuple[int, ...]], torch.Tensor]) -> torch.Tensor:
    """``samples`` noise tensors drawn one sample at a time from one generator: the first k of n samples are the
    k samples a draw of k gives, so a map grown in rounds (``samples="auto"``) is the map of one batch."""
    one = (1, *clean.shape[1:])
    noise = torch.cat([draw(one) for _ in range(samples)]) if samples else draw((0, *clean.shape[1:]))
    return noise.to(device=clean.device, dtype=clean.dtype)


def _std(clean: torch.Tensor, sigma: float | None) -> torch.Tensor:
    """σ of the noise: a fixed (dataset) σ when given, else the std of this input."""
    if sigma is not None:
        return torch.tensor(float(sigma), dtype=clean.dtype, device=clean.device)
    return clean.float().std().to(clean.dtype)


def _finite(name: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise BlipTraceError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise BlipTraceError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")
    return value


def _check_region(region: Any) -> None:
    if region is not None and not (hasattr(region, "token_mask") and hasattr(region, "pixel_mask")):
        raise BlipTraceError(f"region must be a Box, Mask or Outside (or None for everywhere), got {region!r}")


def region_mask(region: Any, clean: torch.Tensor) -> torch.Tensor | None:
    """Where ``region`` covers ``clean``: tokens of [1, N, D] embeddings or pixels of [1, C, H, W] images."""
    if region is None:
        return None
    if clean.ndim == 3:
        mask = region.token_mask(clean.shape[1])[None, :, None]
    elif clean.ndim == 4:
        mask = region.pixel_mask(clean.shape[2], clean.shape[3])[None, None]
    else:
        raise BlipTraceError(f"a region applies to [1, N, D] embeddings or [1, C, H, W] pixels, got shape {tuple(clean.shape)}")
    return mask.to(clean.device)


def _add_in_region(clean: torch.Tensor, change: torch.Tensor, region: Any) -> torch.Tensor:
    mask = region_mask(region, clean)
    return clean + (change if mask is None else change * mask.to(change.dtype))


def _region_json(region: Any) -> dict[str, Any]:
    from ..core.regions import describe_region

    return {"region": describe_region(region)} if region is not None else {}


@dataclass(frozen=True)
class Named:
    """A corruption's own words: its name (in the CLI and JSON), its label and tooltip (in the widgets),
    and the field that holds its level, with that level's default (None for corruptions without one)."""

    name: str
    label: str = ""
    tip: str = ""
    level_name: str | None = None
    default_level: float | None = None
    random: bool = True  # False for a corruption that draws nothing: one sample is all there is


#: Built-in corruptions by name (filled by :func:`_named`): the CLI's and the widgets' choices.
BY_NAME: dict[str, Any] = {}


def _named(cls: Any) -> Any:
    BY_NAME[cls.info.name] = cls
    return cls


class _Leveled:
    """What every corruption with one level shares: its checked level, its name and its JSON form.

    A subclass is a frozen dataclass whose field ``level_name`` holds the level; it declares
    ``name`` (the CLI's and the JSON's), ``label`` and ``tip`` (the widgets'), ``default_level``.
    """

    info: ClassVar[Named]
    positive: ClassVar[bool] = False  # whether the level must be > 0

    @property
    def level_name(self) -> str:
        return str(self.info.level_name)

    def __post_init__(self) -> None:
        label = f"{type(self).__name__} {self.level_name}"
        object.__setattr__(self, self.level_name, _finite(label, getattr(self, self.level_name), positive=self.positive))
        _check_region(getattr(self, "region", None))

    @property
    def level(self) -> float:
        return float(getattr(self, self.level_name))

    def _extra_json(self) -> dict[str, Any]:
        return {}

    def to_json(self) -> dict[str, Any]:
        return {"type": self.info.name, self.level_name: self.level, **self._extra_json(),
                **_region_json(getattr(self, "region", None))}


@dataclass(frozen=True)
class _AdditiveNoise(_Leveled, abc.ABC):
    """Noise of ``scale``·σ added to the clean input (inside ``region`` when given); σ as documented below."""

    scale: float = 3.0
    region: Any = None
    sigma: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sigma is not None:
            object.__setattr__(self, "sigma", _finite(f"{type(self).__name__} sigma", self.sigma, positive=True))

    @abc.abstractmethod
    def unit_noise(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Noise of unit scale, of ``shape``, from ``generator``: each noise declares its distribution."""

    def __call__(self, clean: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
        noise = _draw(clean, samples, lambda s: self.unit_noise(s, generator))
        return _add_in_region(clean, noise * (self.scale * _std(clean, self.sigma)), self.region)

    def _extra_json(self) -> dict[str, Any]:
        return {"sigma": self.sigma} if self.sigma is not None else {}


@_named
@dataclass(frozen=True)
class GaussianNoise(_AdditiveNoise):
    """Add N(0, (scale·σ)²): σ is the std of the clean input (per image), or ``sigma`` when given.

    ROME adds 3σ with σ the std of token embeddings over a dataset (one number per
    model); pass ``sigma=estimate_sigma(...)`` for that, or leave it None for this
    image's own σ.
    """

    info: ClassVar[Named] = Named("gaussian", "Gaussian (ROME)",
                                  "add N(0, (s·σ)²), σ = std of the clean input (or a dataset σ); ROME uses s = 3", "scale", 3.0)

    def unit_noise(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=generator)


@_named
@dataclass(frozen=True)
class MultiplicativeNoise(_Leveled):
    """Multiply each value by N(1, std²): the paper's corruption (``torch.normal(1, 5)`` on the image embeddings)."""

    std: float = 5.0
    region: Any = None
    info: ClassVar[Named] = Named("multiplicative", "multiplicative (paper)",
                                  "multiply each value by N(1, s²); the paper uses s = 5", "std", 5.0)

    def __call__(self, clean: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
        noise = _draw(clean, samples, lambda s: torch.randn(s, generator=generator))
        return _add_in_region(clean, clean * (self.std * noise), self.region)


@_named
@dataclass(frozen=True)
class UniformNoise(_AdditiveNoise):
    """Add U(−scale·σ, scale·σ), σ as for :class:`GaussianNoise`."""

    info: ClassVar[Named] = Named("uniform", "uniform",
                                  "add U(−s·σ, s·σ), σ = std of the clean input (or a dataset σ)", "scale", 3.0)

    def unit_noise(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        return torch.rand(shape, generator=generator) * 2 - 1


@_named
@dataclass(frozen=True)
class Scale(_Leveled):
    """Multiply every value by ``factor``, with nothing random: the paper's attention notebook uses 0.7691."""

    #: Nothing random: every sample is the same corrupted input, so one draw is the whole map.
    deterministic: ClassVar[bool] = True

    factor: float = 0.7691
    region: Any = None
    info: ClassVar[Named] = Named("scale", "scale (paper's attention notebook)",
                                  "multiply every value by s, with no noise; the paper's attention notebook uses s = 0.7691",
                                  "factor", 0.7691, random=False)

    def __call__(self, clean: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
        scaled = _add_in_region(clean, clean * (self.factor - 1.0), self.region)
        return scaled.expand(samples, *clean.shape[1:]).clone()


@dataclass(frozen=True)
class ImageSwap:
    """Replace the image with a counterfactual image (the same in every sample), at the stage the trace corrupts:
    its image embeddings (``corrupt="image"``), its patch embeddings (``"patches"``, before the vision encoder) or
    its pixels (``"pixels"``).

    The tracer computes ``other_image``'s input at that stage with the model's own processor and vision encoder
    through :meth:`bind`; equal images give equal keys, so swaps cache like the other corruptions.
    """

    #: Nothing random: every sample is the same corrupted input, so one draw is the whole map.
    deterministic: ClassVar[bool] = True

    other_image: Any = field(compare=False, hash=False, repr=False)
    key: str = field(default="", init=False)
    embeddings: Any = field(default=None, compare=False, hash=False, repr=False)
    info: ClassVar[Named] = Named(name="image_swap")

    def __post_init__(self) -> None:
        from ..core.inputs import image_digest, to_rgb_image

        image = to_rgb_image(self.other_image)
        object.__setattr__(self, "other_image", image)
        object.__setattr__(self, "key", image_digest(image)[:16])

    def bind(self, embed_image: Callable[[Any], torch.Tensor]) -> ImageSwap:
        """A copy that carries the other image's embeddings, computed by ``embed_image``."""
        bound = ImageSwap(self.other_image)
        object.__setattr__(bound, "embeddings", embed_image(self.other_image))
        return bound

    def __call__(self, clean: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
        if self.embeddings is None:
            raise BlipTraceError("ImageSwap needs the model to embed its image: pass it to trace(), which binds it")
        other = self.embeddings.to(device=clean.device, dtype=clean.dtype)
        if other.shape[1:] != clean.shape[1:]:
            raise BlipTraceError(
                f"ImageSwap image gives embeddings of shape {tuple(other.shape[1:])}, "
                f"but the traced image gives {tuple(clean.shape[1:])}"
            )
        return other.expand(samples, *clean.shape[1:]).clone()

    def to_json(self) -> dict[str, Any]:
        return {"type": self.info.name, "image_sha1": self.key}


@dataclass(frozen=True)
class PairSwap:
    """Each semantic pair's own partner image, in a sweep over pairs (:func:`~.data.easy_vqa_pairs`): the sweep
    traces every pair with ``ImageSwap(pair.counterfactual_image)`` and, for ``metric="logit_diff"``, the pair's
    counterfactual answer as the contrast. To trace one pair, pass that ``ImageSwap`` yourself."""

    #: Nothing random: every sample is the same corrupted input, so one draw is the whole map.
    deterministic: ClassVar[bool] = True

    info: ClassVar[Named] = Named(name="image_pair")

    def __call__(self, clean: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
        raise BlipTraceError("PairSwap stands for each pair's partner image in a sweep over pairs: trace one pair "
                             "with corruption=ImageSwap(pair.counterfactual_image)")

    def to_json(self) -> dict[str, Any]:
        return {"type": self.info.name}


@dataclass(frozen=True)
class WordSwap:
    """Symmetric token replacement: the question's token embeddings replaced by those of a counterfactual
    question of the same length in tokens, the same in every sample (Zhang & Nanda's recommended corruption).

    ``WordSwap({"circle": "triangle"})`` swaps whole words of the traced question (case-insensitive);
    ``WordSwap(question="what color is the triangle?")`` names the counterfactual question itself. The tracer
    binds it to the model's tokenizer and embeddings; a swap that changes the number of tokens, or a word the
    question lacks, is refused, naming the tokens.
    """

    #: Nothing random: every sample is the same corrupted input, so one draw is the whole map.
    deterministic: ClassVar[bool] = True

    swap: Any = None  # {word: replacement}, stored as sorted pairs
    question: str | None = None
    embeddings: Any = field(default=None, compare=False, hash=False, repr=False)
    #: Once bound: the counterfactual's token ids, as the model reads them.
    ids: tuple[int, ...] | None = field(default=None, compare=False, hash=False, repr=False)
    stage: ClassVar[str] = "question"
    info: ClassVar[Named] = Named(name="word_swap")

    def __post_init__(self) -> None:
        if (self.swap is None) == (self.question is None):
            raise BlipTraceError("WordSwap takes a swap such as {'circle': 'triangle'} or question='...', one of them")
        if self.swap is not None:
            pairs = self.swap.items() if isinstance(self.swap, dict) else self.swap
            try:
                swap = tuple(sorted((str(a).strip().lower(), str(b).strip().lower()) for a, b in pairs))
            except (TypeError, ValueError):
                raise BlipTraceError(f"WordSwap's swap must map words to words, got {self.swap!r}") from None
            if not swap or any(not a or not b or a == b for a, b in swap):
                raise BlipTraceError(f"WordSwap's swap must map words to other words, got {self.swap!r}")
            object.__setattr__(self, "swap", swap)
        elif not isinstance(self.question, str) or not self.question.strip():
            raise BlipTraceError("WordSwap's question must be the counterfactual question, as text")

    def counterfactual(self, question: str, what: str = "question") -> str:
        """The counterfactual of ``question`` (the model's text: ``what`` names it in messages, a question, a
        captioner's prompt or a matcher's text)."""
        if self.question is not None:
            return self.question.strip()
        words = question.split()
        out = list(words)  # every swap reads the question as given: {"a": "b", "b": "a"} exchanges the two words
        for old, new in self.swap:
            hits = [i for i, word in enumerate(words) if word.rstrip("?.,!").lower() == old]
            if not hits:
                raise BlipTraceError(f"the swap word {old!r} is not in the {what} {question!r}: swap a word it has")
            for i in hits:  # the word replaced, its trailing punctuation kept
                out[i] = new + words[i][len(words[i].rstrip("?.,!")):]
        return " ".join(out)

    def bind(self, tokenizer: Any, question: str, question_ids: Any, embed: Callable[[list[int]], torch.Tensor],
             encode: Callable[[str], list[int]] | None = None, what: str = "question") -> WordSwap:
        """A copy that carries the counterfactual question's embeddings, checked to tokenize to as many tokens,
        none of them unknown to the vocabulary where the question's were not. ``encode`` turns a text into the ids
        the model reads (a captioner's prompt starts with its decoder's start token and has no [SEP]); by default
        the tokenizer's ids with special tokens. ``what`` names the text in messages ("prompt" for a captioner)."""
        other = self.counterfactual(question, what)
        ids = list(encode(other)) if encode is not None else list(tokenizer(other, add_special_tokens=True)["input_ids"])
        if len(ids) != len(question_ids):
            mine = tokenizer.convert_ids_to_tokens(list(question_ids))
            theirs = tokenizer.convert_ids_to_tokens(ids)
            raise BlipTraceError(f"the counterfactual {what} {other!r} is {len(ids)} tokens ({' '.join(theirs)}) "
                                 f"and the {what} {len(mine)} ({' '.join(mine)}): a swap must keep the length "
                                 "(swap in a word of as many word pieces)")
        _refuse_unknown(tokenizer, question, other, ids, list(question_ids), what)
        if ids == list(question_ids):
            raise BlipTraceError(f"the counterfactual {what} {other!r} tokenizes as the {what} itself: swap a word")
        bound = WordSwap(swap=self.swap, question=self.question)
        object.__setattr__(bound, "embeddings", embed(ids))
        object.__setattr__(bound, "ids", tuple(ids))
        return bound

    def __call__(self, clean: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
        if self.embeddings is None:
            raise BlipTraceError("WordSwap needs the model to embed its question: pass it to trace(), which binds it")
        return self.embeddings.to(device=clean.device, dtype=clean.dtype).expand(samples, *clean.shape[1:]).clone()

    def to_json(self) -> dict[str, Any]:
        if self.question is not None:
            return {"type": self.info.name, "question": self.question}
        return {"type": self.info.name, "swap": dict(self.swap)}


def _refuse_unknown(tokenizer: Any, question: str, other: str, ids: list[int], question_ids: list[int],
                    what: str) -> None:
    """Refuse a counterfactual that puts the vocabulary's unknown token ([UNK]) where the text had a known one:
    the model would read "some unknown word", not the word swapped in."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not any(b == unk != a for a, b in zip(question_ids, ids)):
        return
    from ..core.inputs import unknown_words

    theirs = set(unknown_words(tokenizer, question))
    named = ", ".join(repr(word) for word in unknown_words(tokenizer, other) if word not in theirs) or "a word"
    raise BlipTraceError(f"the counterfactual {what} {other!r} swaps in {named}, which the model's vocabulary lacks: "
                         f"it would read the unknown token {tokenizer.unk_token or '[UNK]'} there, not the word. "
                         "Swap in a word the vocabulary has")


def _check_pixels(name: str, clean: torch.Tensor) -> None:
    if clean.ndim != 4:
        raise BlipTraceError(f"{name} works on pixels: use it with corrupt='pixels' (got a tensor of shape {tuple(clean.shape)})")


@_named
@dataclass(frozen=True)
class Blur(_Leveled):
    """Gaussian blur of the pixels in ``region`` (the whole image when None), ``sigma`` in pixels of the model's input."""

    #: Nothing random: every sample is the same corrupted input, so one draw is the whole map.
    deterministic: ClassVar[bool] = True

    sigma: float = 4.0
    region: Any = None
    stage: ClassVar[str] = "pixels"
    info: ClassVar[Named] = Named("blur", "blur pixels",
                                  "Gaussian blur of the pixels, s = its sigma in pixels of the model's input", "sigma", 4.0,
                                  random=False)
    positive: ClassVar[bool] = True
    max_sigma: ClassVar[float] = 256.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sigma > self.max_sigma:
            raise BlipTraceError(f"Blur sigma {self.sigma:g} is over {self.max_sigma:g} pixels, wider than any model "
                                 "input; use Grey() to erase the area instead")

    def __call__(self, clean: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
        _check_pixels("Blur", clean)
        radius = max(1, int(math.ceil(3 * self.sigma)))
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (offsets / self.sigma) ** 2)
        kernel = (kernel / kernel.sum()).to(device=clean.device, dtype=clean.dtype)
        channels = clean.shape[1]
        x = torch.nn.functional.pad(clean, (radius, radius, 0, 0), mode="replicate")
        x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        x = torch.nn.functional.pad(x, (0, 0, radius, radius), mode="replicate")
        blurred = torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
        mask = region_mask(self.region, clean)
        out = blurred if mask is None else torch.where(mask, blurred, clean)
        return out.expand(samples, *clean.shape[1:]).clone()


@_named
@dataclass(frozen=True)
class Grey:
    """Pixels in ``region`` set to the processor's mean colour (0 after its normalisation): the area is erased."""

    #: Nothing random: every sample is the same corrupted input, so one draw is the whole map.
    deterministic: ClassVar[bool] = True

    region: Any = None
    stage: ClassVar[str] = "pixels"
    info: ClassVar[Named] = Named(name="grey", label="grey pixels", tip="pixels set to the processor's mean colour; no level",
                                  random=False)

    def __post_init__(self) -> None:
        _check_region(self.region)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.info.name, **_region_json(self.region)}

    def __call__(self, clean: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
        _check_pixels("Grey", clean)
        mask = region_mask(self.region, clean)
        out = torch.zeros_like(clean) if mask is None else clean.masked_fill(mask, 0.0)
        return out.expand(samples, *clean.shape[1:]).clone()


def describe(corruption: Callable[..., torch.Tensor]) -> dict[str, Any]:
    """A JSON-safe description of a corruption, for results and cache keys (its own ``to_json``)."""
    to_json = getattr(corruption, "to_json", None)
    if callable(to_json):
        return dict(to_json())
    return {"type": "custom", "repr": repr(corruption)}


#: The noises the explorer and the command line offer with a level slider or ``--scale``.
NOISE_NAMES: tuple[str, ...] = ("gaussian", "multiplicative", "uniform", "scale")


def from_name(name: str, level: float | None = None, region: Any = None) -> Callable[..., torch.Tensor]:
    """``from_name("gaussian", 3.0)`` is ``GaussianNoise(3.0)``; likewise the others in :data:`BY_NAME`, with
    ``region`` (a :class:`~.regions.Box`, ``Outside`` or ``Mask``) for those that take one."""
    if name not in BY_NAME:
        raise BlipTraceError(f"unknown corruption {name!r}: use one of {', '.join(BY_NAME)}")
    cls = BY_NAME[name]
    where = {} if region is None else {"region": region}
    if cls.info.default_level is None:
        return cls(**where)
    return cls(cls.info.default_level if level is None else level, **where)
