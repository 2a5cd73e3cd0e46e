"""A knockout's result: p(answer) with each edge group cut around each layer, as strict JSON and a DataFrame.

    >>> import numpy as np
    >>> from blip_trace_widgets.attention_knockout.result import KnockoutResult
    >>> result = KnockoutResult(labels=["image → question"], scores=np.array([[0.5, 0.9, 1.0]]), clean_score=1.0,
    ...                         window=1, answer="red")
    >>> result.changes.tolist()
    [[-0.5, -0.09999999999999998, 0.0]]
    >>> KnockoutResult.from_json(result.to_json()) == result
    True
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..causal_trace.results import array_from_json, json_array, json_number
from ..core.errors import BlipTraceError
from ..core.names import HEADS, TINY_ABSOLUTE, TINY_CHANGE, VQA
from ..core.scoring import Target
from ..models.attention import DEFAULT_EMPTY, EMPTY_ROWS, check_empty

#: Version of the saved JSON layout (files without ``empty`` were all cut with ``"zero"``, the only rule then).
KNOCKOUT_FORMAT = 1
#: How a knockout's p is found: cut runs, or a first-order estimate from one forward and one backward pass.
KNOCKOUT_METHODS = ("exact", "estimate")
_TEXTS = ("answer", "head", "method", "question", "model_answer")


@dataclass(eq=False)
class KnockoutResult:
    """p(answer) [groups, layers] with group g's edges cut in a window around each layer, and the clean p.

    ``specs`` describe each group (its block, attention, queries and keys, as positions); ``config`` what else
    was asked (the model, the image's digest, the text's tokens)."""

    labels: list[str]
    scores: np.ndarray
    clean_score: float
    window: int
    answer: str
    head: str = VQA
    method: str = "exact"
    question: str = ""
    model_answer: str = ""
    specs: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    #: What a query with every key cut read: a name of :data:`~.engine.EMPTY_ROWS`.
    empty: str = DEFAULT_EMPTY

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise BlipTraceError(f"unknown head {self.head!r}: a knockout's head is one of {', '.join(HEADS)}")
        if self.method not in KNOCKOUT_METHODS:
            raise BlipTraceError(f"unknown knockout method {self.method!r}: use one of {', '.join(KNOCKOUT_METHODS)}")
        check_empty(self.empty)
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if self.scores.ndim != 2 or self.scores.shape[0] != len(self.labels):
            raise BlipTraceError(f"scores must be groups x layers with one label per group, got {self.scores.shape} "
                                 f"for {len(self.labels)} labels")
        if not np.isfinite(self.clean_score) or self.clean_score <= 0:
            raise BlipTraceError(f"the clean p is {self.clean_score!r}: a relative change needs a positive p; score "
                                 "an answer the model gives some probability")

    @classmethod
    def build(cls, tracer: Any, config: Any, groups: Any, target: Target, clean: float,
              scores: np.ndarray) -> KnockoutResult:
        """The result of a :class:`~.knockout.Knockout` run."""
        first = tracer.blocks[groups[0].block]
        tokens = target.inputs if first.runs_per_target else tracer.question_ids
        return cls(labels=[g.label for g in groups], scores=scores, clean_score=clean, window=int(config.window),
                   answer=tracer.scored_text(target), head=tracer.head, method=config.method,
                   question=tracer.question, model_answer=tracer.model_answer,
                   specs=[{**g.spec, "edges": g.count} for g in groups], empty=config.empty,
                   config={"model": tracer.bundle.name, "image_sha1": tracer.image_key,
                           "tokens": list(tracer.bundle.tokenizer.convert_ids_to_tokens(list(tokens))),
                           "answer_ids": [int(i) for i in target.tokens]})

    # ----- what it shows -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.scores.shape[1])

    @property
    def changes(self) -> np.ndarray:
        """(p_cut − p_clean) / p_clean per group and layer."""
        return self.scores / self.clean_score - 1.0

    @property
    def is_estimate(self) -> bool:
        return self.method == "estimate"

    @property
    def empty_label(self) -> str:
        """What a query with every key cut read, in words (figures and explorers say it)."""
        return EMPTY_ROWS[self.empty].label

    def tiny(self) -> np.ndarray:
        """Per group: whether no layer moves p by more than 0.01 or by more than 1% of the clean p (drawn as no
        effect, never in full colour)."""
        absolute = np.nanmax(np.abs(self.scores - self.clean_score), axis=1)  # (NaN: past a shallower block's layers)
        return (absolute < TINY_ABSOLUTE["prob"]) | (np.nanmax(np.abs(self.changes), axis=1) < TINY_CHANGE)

    def strongest(self) -> list[tuple[str, int, float]]:
        """Per group: (label, layer, change) at the layer where cutting changes p most; a group whose every change
        is NaN (no layer could be cut, or the clean p is 0) is left out, and a result with none is refused."""
        out = []
        for label, row in zip(self.labels, self.changes):
            if not np.isfinite(row).any():
                continue
            layer = int(np.nanargmax(np.abs(row)))
            out.append((label, layer, float(row[layer])))
        if not out and len(self.labels):
            raise BlipTraceError("no change of this knockout is a number (every entry is NaN): the clean score is 0 "
                                 "or no layer was cut; score an answer the model gives, or check the result's file")
        return out

    # ----- saving ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": KNOCKOUT_FORMAT, "kind": "knockout", "labels": list(self.labels),
                "scores": json_array(self.scores), "clean_score": self.clean_score, "window": self.window,
                **{name: getattr(self, name) for name in _TEXTS}, "empty": self.empty, "specs": self.specs,
                "config": self.config}

    @classmethod
    def from_dict(cls, data: Any) -> KnockoutResult:
        if not isinstance(data, dict) or data.get("kind") != "knockout":
            raise BlipTraceError("not a saved KnockoutResult: load a file written by KnockoutResult.save or "
                                 "`blip-trace knockout`")
        version = data.get("format")
        if isinstance(version, bool) or version != KNOCKOUT_FORMAT:
            raise BlipTraceError(f"this knockout was saved in format {version!r}; this version reads "
                                 f"{KNOCKOUT_FORMAT}")
        labels, window = data.get("labels"), data.get("window")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise BlipTraceError("the saved knockout's 'labels' must be a list of texts")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise BlipTraceError(f"the saved knockout's 'window' must be a whole number >= 1, got {window!r}")
        texts = {name: data.get(name, "") for name in _TEXTS}
        if not all(isinstance(v, str) for v in texts.values()):
            raise BlipTraceError(f"the saved knockout's {', '.join(_TEXTS)} must be texts")
        specs, config = data.get("specs", []), data.get("config", {})
        if not isinstance(specs, list) or not isinstance(config, dict):
            raise BlipTraceError("the saved knockout's 'specs' must be a list and its 'config' an object")
        return cls(labels=labels, scores=array_from_json(data.get("scores"), "scores"), window=window,
                   clean_score=json_number(data.get("clean_score"), "clean_score"), specs=specs, config=config,
                   empty=data.get("empty", DEFAULT_EMPTY), **texts)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> KnockoutResult:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BlipTraceError(f"not a saved knockout (not JSON: {err})") from None
        return cls.from_dict(data)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        path = Path(path)
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> KnockoutResult:
        if Path(path).is_dir():
            raise BlipTraceError(f"{path} is a folder: pass the .json file KnockoutResult.save or `blip-trace "
                                 "knockout` wrote in it")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise BlipTraceError(f"{path} is not a saved knockout (not text)") from None
        except FileNotFoundError:
            raise BlipTraceError(f"{path}: no such file; pass the path of a knockout's .json") from None
        except OSError as error:
            raise BlipTraceError(f"{path} could not be read ({error.strerror or error})") from None
        return cls.from_json(text)

    def to_dataframe(self) -> Any:
        """One row per (group, layer): group, layer, p, change, tiny (the layers its block has)."""
        import pandas as pd

        tiny = self.tiny()
        rows = [{"group": label, "layer": layer, "p": float(self.scores[g, layer]),
                 "change": float(self.changes[g, layer]), "tiny": bool(tiny[g])}
                for g, label in enumerate(self.labels) for layer in range(self.num_layers)
                if np.isfinite(self.scores[g, layer])]
        return pd.DataFrame(rows)

    def plot(self, ax: Any = None, **kw: Any) -> Any:
        """Zhang et al.'s line plot: the relative change of p per layer, one line per group (see
        :func:`~.knockout_plots.plot_knockout`)."""
        from .plots import plot_knockout

        return plot_knockout(self, ax=ax, **kw)

    def plot_tokens(self, ax: Any = None, **kw: Any) -> Any:
        """Tokens x layers heatmap of a per-token knockout (``queries="each"``)."""
        from .plots import plot_knockout_tokens

        return plot_knockout_tokens(self, ax=ax, **kw)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KnockoutResult):
            return NotImplemented
        return self.to_dict() == other.to_dict()
