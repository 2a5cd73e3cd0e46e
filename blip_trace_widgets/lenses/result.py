"""``LensResult``: what every state of a block already says, per position and layer.

    >>> import numpy as np
    >>> from blip_trace_widgets.lenses.result import LensResult
    >>> r = LensResult(model="demo", block="answer_decoder", kind="logit", text="what color?", answer="red",
    ...                labels=["[DEC]"], top_tokens=[[["blue", "red"], ["red", "blue"]]],
    ...                top_probs=np.array([[[0.6, 0.3], [0.9, 0.1]]]), answer_prob=np.array([[0.3, 0.9]]),
    ...                answer_rank=np.array([[2, 1]]), kl=np.array([[0.4, 0.0]]))
    >>> r
    LensResult(logit lens of the answer decoder (demo): 1 position x 2 layers; 'red' is the top token at '[DEC]' from layer 1 on)
    >>> LensResult.from_json(r.to_json()) == r
    True
    >>> r.to_dataframe()[["label", "layer", "top_token", "p_answer"]].to_dict("records")[0]
    {'label': '[DEC]', 'layer': 0, 'top_token': 'blue', 'p_answer': 0.3}
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd

from ..core.errors import BlipTraceError
from ..core.names import BLOCK_LABELS
from .names import LENS_LABELS

FORMAT = 1


@dataclass(frozen=True, eq=False)
class LensResult:
    """A lens of one (image, text): for every position x layer of ``block``, the top tokens and their
    probabilities, p(answer), the answer's rank (1 = the top token) and KL(final layer || this layer) in nats."""

    model: str
    block: str
    kind: str
    text: str
    answer: str
    labels: list[str]
    top_tokens: list[list[list[str]]]  # [position][layer][k]
    top_probs: np.ndarray  # [positions, layers, k]
    answer_prob: np.ndarray  # [positions, layers]
    answer_rank: np.ndarray  # [positions, layers], 1-based
    kl: np.ndarray  # [positions, layers], nats
    queries: int = 0  # image-query positions at the start (BLIP-2's language model)
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = (len(self.labels), len(self.top_tokens[0]) if self.top_tokens else 0)
        for name in ("answer_prob", "answer_rank", "kl"):
            value = np.asarray(getattr(self, name))
            if value.shape != shape:
                raise BlipTraceError(f"LensResult.{name} has shape {value.shape}; positions x layers is {shape}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "top_probs", np.asarray(self.top_probs, dtype=float))

    @property
    def shape(self) -> tuple[int, int]:
        """(positions, layers)."""
        return self.answer_prob.shape  # type: ignore[return-value]

    @property
    def layers(self) -> int:
        return self.shape[1]

    def top_token(self) -> list[list[str]]:
        """Each cell's top token, [position][layer]."""
        return [[cell[0] for cell in row] for row in self.top_tokens]

    def first_layer(self, position: int = -1) -> int | None:
        """The first layer from which the answer stays the top token at ``position``; None if it never does."""
        ranks = self.answer_rank[position]
        for layer in range(len(ranks)):
            if (ranks[layer:] == 1).all():
                return layer
        return None

    def __repr__(self) -> str:
        positions, layers = self.shape
        first = self.first_layer()
        where = f"from layer {first} on" if first is not None else "at no layer for good"
        return (f"LensResult({LENS_LABELS.get(self.kind, self.kind)} of the {BLOCK_LABELS.get(self.block, self.block)} "
                f"({self.model}): {positions} position{'s' if positions != 1 else ''} x "
                f"{layers} layers; {self.answer!r} is the top token at {self.labels[-1]!r} {where})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LensResult):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    # ----- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.tolist() if isinstance(value, np.ndarray) else value
        return out

    def to_json(self) -> str:
        """Strict JSON (no NaN or infinity), which :meth:`from_json` reads back exactly."""
        return json.dumps(self.to_dict(), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> LensResult:
        data = json.loads(text)
        if data.pop("format", None) != FORMAT:
            raise BlipTraceError(f"not a lens result of format {FORMAT}: save it again with this release")
        for name in ("top_probs", "answer_prob", "kl"):
            data[name] = np.asarray(data[name], dtype=float)
        data["answer_rank"] = np.asarray(data["answer_rank"], dtype=int)
        return cls(**data)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per position x layer: the position's label, the top token and its probability, the top tokens
        (joined by " | "), p(answer), its rank and the KL divergence to the final layer."""
        rows = []
        for p, label in enumerate(self.labels):
            for layer in range(self.layers):
                rows.append({"position": p, "label": label, "layer": layer,
                             "top_token": self.top_tokens[p][layer][0], "top_prob": float(self.top_probs[p, layer, 0]),
                             "top_tokens": " | ".join(self.top_tokens[p][layer]),
                             "p_answer": float(self.answer_prob[p, layer]),
                             "answer_rank": int(self.answer_rank[p, layer]), "kl": float(self.kl[p, layer])})
        return pd.DataFrame(rows)
