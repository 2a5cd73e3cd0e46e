"""The two directions of a trace, one class each: which run is the base, which run's states are patched into it,
and the sign of an effect.

    >>> import numpy as np
    >>> from blip_trace_widgets.causal_trace import directions
    >>> restoring, noising = directions.of("denoise"), directions.of("noise")
    >>> restoring.base, restoring.source, noising.base, noising.source
    ('corrupted', 'clean', 'clean', 'corrupted')
    >>> scores = np.array([0.2, 0.7])
    >>> restoring.effect(scores, low=0.1, high=0.9), noising.effect(scores, low=0.1, high=0.9)
    (array([0.1, 0.6]), array([0.7, 0.2]))

*Restoring* (``"denoise"``, ROME's causal tracing) runs the corrupted input and patches clean states in: an
effect is how far a cell brings the score back up from the corrupted score. *Noising* runs the clean input and
patches corrupted states in: an effect is how much a cell takes away from the clean score. Either way a positive
effect points from the corrupted score toward the clean one.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch

from ..core.errors import BlipTraceError
from ..core.names import DIRECTION_LABELS, DIRECTIONS
from ..core.names import Direction as DirectionName
from ..models.runs import Run


class Direction(ABC):
    """What a trace's direction decides. The base run is what every row runs; the source is where the patched
    states come from."""

    name: ClassVar[DirectionName]
    #: Whether clean states are restored into the corrupted run (what suffices, ROME's); else corrupted states
    #: are patched into the clean run (what is necessary).
    restores: ClassVar[bool]
    base: ClassVar[str]  # "clean" or "corrupted"
    source: ClassVar[str]
    #: Where white and full colour sit on a map of scores: the score with nothing patched, and the furthest a
    #: cell can take it.
    ends: ClassVar[tuple[str, str]]
    #: What an average over questions adds to its answer line.
    average_note: ClassVar[str]

    @property
    def label(self) -> str:
        return DIRECTION_LABELS[self.name]

    def __repr__(self) -> str:
        return f"directions.of({self.name!r})"

    @abstractmethod
    def effect(self, scores: Any, *, low: Any, high: Any) -> Any:
        """Each cell's effect from its score: positive from the corrupted score toward the clean one."""

    def paired(self, draws: np.ndarray, *, low: np.ndarray, high: Any) -> np.ndarray | None:
        """Per draw [S, cells], each cell's effect against the same draw's base score (None where the cells do
        not share the base's draws)."""
        if low.shape[0] != draws.shape[0]:
            return None
        return self.effect(draws, low=low[:, None], high=high)

    @abstractmethod
    def what(self, block: str, kind: str) -> str:
        """The title's first words: what is patched where."""

    @abstractmethod
    def beyond(self, raised: bool) -> str:
        """Where a cell that goes against the trace's effect lands (``raised``: the corruption raises the score)."""

    @abstractmethod
    def patched(self, clean: Run, corrupted: Run, kind: str, sever: str | None) -> tuple[Run, list[torch.Tensor],
                                                                                         Any, bool]:
        """The base run, the states patched in per layer, the severed sublayer's values (or None), and whether the
        base reads the clean run's cross-attention."""

    @abstractmethod
    def estimate_paths(self, clean: Run, corrupted: Run, kind: str,
                       deltas: list[torch.Tensor]) -> tuple[Run, list[torch.Tensor], list[torch.Tensor], bool]:
        """An estimate's base run, its states of ``kind``, the change each cell's path makes, and whether the
        base reads the clean run's cross-attention."""


def _expanded(xs: list[torch.Tensor], samples: int) -> list[torch.Tensor]:
    return [x.expand(samples, *x.shape[1:]) for x in xs]


class Denoise(Direction):
    name, base, source, restores = "denoise", "corrupted", "clean", True
    ends = ("corrupted", "clean")
    average_note = ""

    def effect(self, scores: Any, *, low: Any, high: Any) -> Any:
        return scores - low

    def what(self, block: str, kind: str) -> str:
        return f"Restoring {block} {kind}"

    def beyond(self, raised: bool) -> str:
        return "beyond the corrupted score" if raised else "below the corrupted score"

    def patched(self, clean: Run, corrupted: Run, kind: str, sever: str | None) -> tuple[Run, list[torch.Tensor],
                                                                                         Any, bool]:
        severed = corrupted.kinds[sever] if sever else None
        return corrupted, [x[0] for x in clean.kinds[kind]], severed, False

    def estimate_paths(self, clean: Run, corrupted: Run, kind: str,
                       deltas: list[torch.Tensor]) -> tuple[Run, list[torch.Tensor], list[torch.Tensor], bool]:
        return corrupted, corrupted.kinds[kind], deltas, False


class Noise(Direction):
    name, base, source, restores = "noise", "clean", "corrupted", False
    ends = ("clean", "corrupted")
    average_note = ", noising: what each cell takes away"

    def effect(self, scores: Any, *, low: Any, high: Any) -> Any:
        return high - scores

    def paired(self, draws: np.ndarray, *, low: np.ndarray, high: Any) -> np.ndarray | None:
        return self.effect(draws, low=low, high=high)

    def what(self, block: str, kind: str) -> str:
        return f"Noising: corrupted {block} {kind} patched into the clean run"

    def beyond(self, raised: bool) -> str:
        return "past the clean score" if raised else "above the clean score"

    def patched(self, clean: Run, corrupted: Run, kind: str, sever: str | None) -> tuple[Run, list[torch.Tensor],
                                                                                         Any, bool]:
        samples = int(corrupted.inputs[0].shape[0])
        severed = _expanded(clean.kinds[sever], samples) if sever else None  # held at the base run's values
        return Run(_expanded(clean.inputs, samples)), list(corrupted.kinds[kind]), severed, True

    def estimate_paths(self, clean: Run, corrupted: Run, kind: str,
                       deltas: list[torch.Tensor]) -> tuple[Run, list[torch.Tensor], list[torch.Tensor], bool]:
        samples = int(corrupted.inputs[0].shape[0])
        base = Run(_expanded(clean.inputs, samples))
        return base, _expanded(clean.kinds[kind], samples), [-d for d in deltas], True


BY_NAME: dict[str, Direction] = {direction.name: direction for direction in (Denoise(), Noise())}
assert tuple(BY_NAME) == DIRECTIONS, "a direction's class and its name in names.py go together"

#: The default: ROME's restoring.
RESTORING = BY_NAME["denoise"]


def of(name: str) -> Direction:
    """The direction named ``name`` ("denoise" or "noise")."""
    if name not in BY_NAME:
        raise BlipTraceError(f"unknown direction {name!r}: use one of {', '.join(BY_NAME)}")
    return BY_NAME[name]
