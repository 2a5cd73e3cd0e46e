"""Image areas: boxes and masks to corrupt, and grids of patch regions to restore.

    >>> from blip_trace_widgets.core.regions import Box, region_grid
    >>> Box(0.0, 0.0, 0.5, 0.5).token_mask(1 + 4 * 4).nonzero().flatten().tolist()   # CLS + 4x4 patches
    [1, 2, 5, 6]
    >>> [r.label for r in region_grid(4, 2)]
    ['[CLS]', 'r0c0', 'r0c1', 'r1c0', 'r1c1']

A ViT sees an image as a CLS token and a square grid of patches, row-major. Boxes are in
fractions of the image (left, top, right, bottom), so one box means the same area at
any resolution. A region covers a patch when they overlap at all: corrupting "the
shape's box" then corrupts every patch that shows part of the shape, and
:class:`Outside` of it only patches that show none.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from .errors import BlipTraceError


def patch_grid_size(tokens: int) -> int:
    """Patches per side of a CLS + g×g token sequence."""
    side = math.isqrt(max(tokens - 1, 0))
    if side * side != tokens - 1 or side == 0:
        raise BlipTraceError(f"{tokens} tokens are not a CLS token plus a square grid of patches")
    return side


class Region(Protocol):
    def pixel_mask(self, height: int, width: int) -> torch.Tensor: ...
    def token_mask(self, tokens: int) -> torch.Tensor: ...


def _patch_overlap(pixel_mask: np.ndarray, side: int) -> np.ndarray:
    """Which of side×side patches overlap a boolean pixel mask, as a flat array."""
    h, w = pixel_mask.shape
    rows = np.array_split(np.arange(h), side)
    cols = np.array_split(np.arange(w), side)
    return np.array([[pixel_mask[np.ix_(r, c)].any() for c in cols] for r in rows]).reshape(-1)


def _with_cls(patches: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([[False], patches]))


@dataclass(frozen=True)
class Box:
    """A rectangle in fractions of the image: (left, top, right, bottom), each in [0, 1]."""

    left: float
    top: float
    right: float
    bottom: float

    def __post_init__(self) -> None:
        values = (self.left, self.top, self.right, self.bottom)
        if not all(0.0 <= v <= 1.0 for v in values) or self.left >= self.right or self.top >= self.bottom:
            raise BlipTraceError(
                f"a Box is (left, top, right, bottom) in fractions of the image with left < right and top < bottom, "
                f"got {values}"
            )

    @classmethod
    def from_pixels(cls, left: int, top: int, right: int, bottom: int, size: tuple[int, int]) -> Box:
        """A box from pixel coordinates (right and bottom exclusive) in an image of ``size`` (width, height)."""
        width, height = size
        return cls(left / width, top / height, right / width, bottom / height)

    def pixel_mask(self, height: int, width: int) -> torch.Tensor:
        ys = (torch.arange(height) + 0.5) / height
        xs = (torch.arange(width) + 0.5) / width
        inside_y = (ys >= self.top) & (ys < self.bottom)
        inside_x = (xs >= self.left) & (xs < self.right)
        return inside_y[:, None] & inside_x[None, :]

    def token_mask(self, tokens: int) -> torch.Tensor:
        side = patch_grid_size(tokens)
        edges = np.arange(side + 1) / side
        rows = (edges[1:] > self.top) & (edges[:-1] < self.bottom)
        cols = (edges[1:] > self.left) & (edges[:-1] < self.right)
        return _with_cls((rows[:, None] & cols[None, :]).reshape(-1))

    def area(self) -> float:
        return (self.right - self.left) * (self.bottom - self.top)


@dataclass(frozen=True)
class Mask:
    """Any pixel area: a boolean H×W array (resized to the model's input with nearest neighbours)."""

    array: Any = field(compare=False, hash=False, repr=False)
    key: str = field(default="", init=False)

    def __post_init__(self) -> None:
        array = np.asarray(self.array)
        if array.ndim != 2 or not array.size:
            raise BlipTraceError(f"a Mask is a 2-D boolean array (height x width), got shape {array.shape}")
        array = array.astype(bool)
        if not array.any():
            raise BlipTraceError("the Mask covers no pixel; mark the area to corrupt with True")
        object.__setattr__(self, "array", array)
        digest = hashlib.sha1(np.packbits(array).tobytes() + repr(array.shape).encode()).hexdigest()[:16]
        object.__setattr__(self, "key", digest)

    def pixel_mask(self, height: int, width: int) -> torch.Tensor:
        h, w = self.array.shape
        rows = (np.arange(height) * h // height).clip(0, h - 1)
        cols = (np.arange(width) * w // width).clip(0, w - 1)
        return torch.from_numpy(self.array[np.ix_(rows, cols)].copy())

    def token_mask(self, tokens: int) -> torch.Tensor:
        return _with_cls(_patch_overlap(self.array, patch_grid_size(tokens)))


@dataclass(frozen=True)
class Outside:
    """Everything a region does not cover: pixels outside it, and patches that do not overlap it."""

    region: Any

    def pixel_mask(self, height: int, width: int) -> torch.Tensor:
        return ~self.region.pixel_mask(height, width)

    def token_mask(self, tokens: int) -> torch.Tensor:
        inside = self.region.token_mask(tokens)
        outside = ~inside
        outside[0] = False  # CLS is not a place in the image
        return outside


def describe_region(region: Any) -> Any:
    """JSON-safe description of a region (for results and cache keys)."""
    if region is None:
        return None
    if isinstance(region, Box):
        return {"box": [region.left, region.top, region.right, region.bottom]}
    if isinstance(region, Mask):
        return {"mask_sha1": region.key, "shape": list(region.array.shape)}
    if isinstance(region, Outside):
        return {"outside": describe_region(region.region)}
    return {"custom": repr(region)}


@dataclass(frozen=True)
class GridRegion:
    """One position of an image-side trace: CLS, or a block of patches restored together."""

    label: str
    tokens: tuple[int, ...]
    box: tuple[float, float, float, float] | None  # (left, top, right, bottom) fractions; None for CLS
    row: int | None = None
    col: int | None = None


def region_grid(side: int, regions: int | None = None) -> list[GridRegion]:
    """CLS, then ``regions``×``regions`` blocks of a ``side``×``side`` patch grid (every patch when None)."""
    regions = side if regions is None else int(regions)
    if not 1 <= regions <= side:
        raise BlipTraceError(f"regions must be between 1 and {side} (the patches per side), got {regions}")
    bounds = [round(i * side / regions) for i in range(regions + 1)]
    out = [GridRegion("[CLS]", (0,), None)]
    for r in range(regions):
        for c in range(regions):
            rows = range(bounds[r], bounds[r + 1])
            cols = range(bounds[c], bounds[c + 1])
            tokens = tuple(1 + pr * side + pc for pr in rows for pc in cols)
            box = (bounds[c] / side, bounds[r] / side, bounds[c + 1] / side, bounds[r + 1] / side)
            out.append(GridRegion(f"r{r}c{c}", tokens, box, r, c))
    return out


def same_size_elsewhere(box: Box, tokens: int, steps: int = 9) -> Box | None:
    """A box of ``box``'s size, as far from it as possible, that shares no patch with it (a control region)."""
    width, height = box.right - box.left, box.bottom - box.top
    taken = box.token_mask(tokens)
    best: tuple[float, Box] | None = None
    for left in np.linspace(0.0, 1.0 - width, steps):
        for top in np.linspace(0.0, 1.0 - height, steps):
            candidate = Box(float(left), float(top), float(left + width), float(top + height))
            if (candidate.token_mask(tokens) & taken).any():
                continue
            distance = abs(left - box.left) + abs(top - box.top)
            if best is None or distance > best[0]:
                best = (distance, candidate)
    return None if best is None else best[1]
