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

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch


class Corruption(Protocol):
    def __call__(self, clean: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor: ...


def _draw(clean: torch.Tensor, samples: int, draw: Callable[[tuple[int, ...]], torch.Tensor]) -> torch.Tensor:
    shape = (samples, *clean.shape[1:])
    return draw(shape).to(device=clean.device, dtype=clean.dtype)


def _std(clean: torch.Tensor) -> torch.Tensor:
    return clean.float().std().to(clean.dtype)


def region_mask(region: Any, clean: torch.Tensor) -> torch.Tensor | None:
    """Where ``region`` covers ``clean``: tokens of [1, N, D] embeddings or pixels of [1, C, H, W] images."""
    if region is None:
        return None
    if clean.ndim == 3:
        mask = region.token_mask(clean.shape[1])[None, :, None]
    elif clean.ndim == 4:
        mask = region.pixel_mask(clean.shape[2], clean.shape[3])[None, None]
    else:
        raise ValueError(f"a region applies to [1, N, D] embeddings or [1, C, H, W] pixels, got shape {tuple(clean.shape)}")
    return mask.to(clean.device)


def _add_in_region(clean: torch.Tensor, change: torch.Tensor, region: Any) -> torch.Tensor:
    mask = region_mask(region, clean)
    return clean + (change if mask is None else change * mask.to(change.dtype))


@dataclass(frozen=True)
class GaussianNoise:
    """Add N(0, (scale·σ)²), σ being the std of the clean image embeddings (ROME's 3σ)."""

    scale: float = 3.0
    region: Any = None

    def __post_init__(self) -> None:
        if not self.scale >= 0:
            raise ValueError(f"GaussianNoise scale must be >= 0, got {self.scale}")

    def __call__(self, clean: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
        noise = _draw(clean, samples, lambda s: torch.randn(s, generator=generator))
        return _add_in_region(clean, noise * (self.scale * _std(clean)), self.region)


@dataclass(frozen=True)
class MultiplicativeNoise:
    """Multiply each value by N(1, std²): the paper's corruption."""

    std: float = 5.0
    region: Any = None

    def __post_init__(self) -> None:
        if not self.std >= 0:
            raise ValueError(f"MultiplicativeNoise std must be >= 0, got {self.std}")

    def __call__(self, clean: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
        noise = _draw(clean, samples, lambda s: torch.randn(s, generator=generator))
        return _add_in_region(clean, clean * (self.std * noise), self.region)


@dataclass(frozen=True)
class UniformNoise:
    """Add U(−scale·σ, scale·σ), σ as for :class:`GaussianNoise` (ROME's uniform option)."""

    scale: float = 3.0
    region: Any = None

    def __post_init__(self) -> None:
        if not self.scale >= 0:
            raise ValueError(f"UniformNoise scale must be >= 0, got {self.scale}")

    def __call__(self, clean: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
        noise = _draw(clean, samples, lambda s: torch.rand(s, generator=generator) * 2 - 1)
        return _add_in_region(clean, noise * (self.scale * _std(clean)), self.region)


@dataclass(frozen=True)
class ImageSwap:
    """Replace the embeddings with those of a counterfactual image (the same in every sample).

    The tracer embeds ``other_image`` with the model's own vision encoder through
    :meth:`bind`; equal images give equal keys, so swaps cache like the other corruptions.
    """

    other_image: Any = field(compare=False, hash=False, repr=False)
    key: str = field(default="", init=False)
    embeddings: Any = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        from .inputs import to_rgb_image

        image = to_rgb_image(self.other_image)
        object.__setattr__(self, "other_image", image)
        digest = hashlib.sha1(np.asarray(image).tobytes() + repr(image.size).encode()).hexdigest()[:16]
        object.__setattr__(self, "key", digest)

    def bind(self, embed_image: Callable[[Any], torch.Tensor]) -> "ImageSwap":
        """A copy that carries the other image's embeddings, computed by ``embed_image``."""
        bound = ImageSwap(self.other_image)
        object.__setattr__(bound, "embeddings", embed_image(self.other_image))
        return bound

    def __call__(self, clean: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
        if self.embeddings is None:
            raise ValueError("ImageSwap needs the model to embed its image: pass it to trace(), which binds it")
        other = self.embeddings.to(device=clean.device, dtype=clean.dtype)
        if other.shape[1:] != clean.shape[1:]:
            raise ValueError(
                f"ImageSwap image gives embeddings of shape {tuple(other.shape[1:])}, "
                f"but the traced image gives {tuple(clean.shape[1:])}"
            )
        return other.expand(samples, *clean.shape[1:]).clone()


def _check_pixels(name: str, clean: torch.Tensor) -> None:
    if clean.ndim != 4:
        raise ValueError(f"{name} works on pixels: use it with corrupt='pixels' (got a tensor of shape {tuple(clean.shape)})")


@dataclass(frozen=True)
class Blur:
    """Gaussian blur of the pixels in ``region`` (the whole image when None), ``sigma`` in pixels of the model's input."""

    sigma: float = 4.0
    region: Any = None
    stage: ClassVar[str] = "pixels"

    def __post_init__(self) -> None:
        if not self.sigma > 0:
            raise ValueError(f"Blur sigma must be > 0 pixels, got {self.sigma}")

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


@dataclass(frozen=True)
class Grey:
    """Pixels in ``region`` set to the processor's mean colour (0 after its normalisation): the area is erased."""

    region: Any = None
    stage: ClassVar[str] = "pixels"

    def __call__(self, clean: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
        _check_pixels("Grey", clean)
        mask = region_mask(self.region, clean)
        out = torch.zeros_like(clean) if mask is None else clean.masked_fill(mask, 0.0)
        return out.expand(samples, *clean.shape[1:]).clone()


def describe(corruption: Callable[..., torch.Tensor]) -> dict[str, Any]:
    """A JSON-safe description of a corruption, for results and cache keys."""
    from .regions import describe_region

    region = getattr(corruption, "region", None)
    extra = {"region": describe_region(region)} if region is not None else {}
    if isinstance(corruption, GaussianNoise):
        return {"type": "gaussian", "scale": corruption.scale, **extra}
    if isinstance(corruption, MultiplicativeNoise):
        return {"type": "multiplicative", "std": corruption.std, **extra}
    if isinstance(corruption, UniformNoise):
        return {"type": "uniform", "scale": corruption.scale, **extra}
    if isinstance(corruption, Blur):
        return {"type": "blur", "sigma": corruption.sigma, **extra}
    if isinstance(corruption, Grey):
        return {"type": "grey", **extra}
    if isinstance(corruption, ImageSwap):
        return {"type": "image_swap", "image_sha1": corruption.key}
    return {"type": "custom", "repr": repr(corruption)}


#: Names used by the CLI and the widgets.
BY_NAME: dict[str, Callable[[float], Callable[..., torch.Tensor]]] = {
    "gaussian": lambda level: GaussianNoise(scale=level),
    "multiplicative": lambda level: MultiplicativeNoise(std=level),
    "uniform": lambda level: UniformNoise(scale=level),
}


def from_name(name: str, level: float) -> Callable[..., torch.Tensor]:
    """``from_name("gaussian", 3.0)`` is ``GaussianNoise(3.0)``; likewise multiplicative and uniform."""
    if name not in BY_NAME:
        raise ValueError(f"unknown corruption {name!r}: use one of {', '.join(BY_NAME)}")
    return BY_NAME[name](level)
