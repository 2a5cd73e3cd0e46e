"""TraceConfig: everything that defines one heatmap besides the (image, question), and its cache keys.

    >>> from blip_trace_widgets.causal_trace.config import TraceConfig, cache_key
    >>> config = TraceConfig(kind="mlp", window=3)
    >>> config.corrupt, config.sever_at
    ('image', 'restored')
    >>> cache_key(config, "corrupted") == cache_key(TraceConfig(kind="hidden"), "corrupted")  # same corrupted run
    True

Each field declares, in its metadata, the earliest piece of work it changes; every cache
key is derived from those declarations by :func:`cache_key`, never written by hand.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import InitVar, dataclass, fields
from typing import Any

import numpy as np
import torch

from ..core.errors import BlipTraceError, renamed
from ..core.names import (
    BLOCKS,
    DEFAULT_SAMPLES,
    DEFAULT_VERIFY,
    DIRECTION_LABELS,
    DIRECTIONS,
    HEAD_KINDS,
    HIDDEN,
    KINDS,
    MAX_STEPS,
    METHOD_LABELS,
    METHODS,
    METRICS,
    QUESTION_ENCODER,
    SEVER_AT,
    SEVERABLE,
    STAGE_LABELS,
    STAGES,
    TEXT_BLOCKS,
    VISION_ENCODER,
    Block,
    Direction,
    Kind,
    Method,
    Metric,
    SeverAt,
    Stage,
    facts,
    is_head_kind,
    kinds_of,
)
from ..core.options import field_default, option
from ..core.roles import ROLES
from ..corruptions.kinds import ImageSwap, PairSwap, WordSwap, describe
from ..models import anatomy
from ..models.heads import BY_NAME
from . import directions, stages

#: What a TraceConfig field changes, from the earliest piece of work it touches: the corrupted
#: input (and so every run after it), the scored answer (and so the decoder's runs), or only
#: the restoring (the heatmap itself). :func:`cache_key` reads these.
INPUT, ANSWER, RESTORE = "input", "answer", "restore"
CACHE_PARTS: dict[str, tuple[str, ...]] = {
    "corrupted": (INPUT,),
    "decoder": (INPUT, ANSWER),
    "result": (INPUT, ANSWER, RESTORE),
}
MAX_SAMPLES = 1000


#: Seeds are 0 to 2**32 - 1: torch's CPU generator gives the same draws for seeds 2**32 apart.
MAX_SEED = 2**32 - 1


#: A field's rule for :meth:`TraceConfig.to_json`: written always (the default), only where it is not at its
#: default (so that files written before the field existed read the same), or where a test of the configuration
#: says so.
CHANGED = "changed"


def _affects(part: str, *, help: str = "", choices: Any = None, type: Any = str, written: Any = None,
             **kw: Any) -> Any:
    """A field, with what it changes (for cache keys), when its JSON form writes it, and, for the fields the
    command line offers, its help, its choices and the type its option parses to (the command line builds its
    options from these)."""
    return option(help=help, choices=choices, type=type, metadata={"affects": part, "written": written}, **kw)


def _json_value(value: Any) -> Any:
    """A field's value in strict JSON: a corruption as its description, tuples as lists, numpy numbers as Python's."""
    if callable(value):
        return describe(value)
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def word_option(text: str) -> int | str:
    """A caption word as the command line takes it: an index from 0, or "all"."""
    if text.strip().lower() == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise BlipTraceError(f"a caption word is an index from 0 or 'all', got {text!r}") from None


@dataclass(frozen=True)
class TraceConfig:
    """Everything that defines one heatmap besides the (image, question); hashable, so a cache key."""

    block: Block = _affects(RESTORE, default=QUESTION_ENCODER, choices=BLOCKS,
                          help="which transformer to restore states in: " + "; ".join(
                              f"{head.label}: {', '.join(head.blocks)}" for head in BY_NAME.values())
                          + " (default: the first of the model's)")
    kind: Kind = _affects(RESTORE, default=HIDDEN, choices=KINDS, help=(
        "which state to restore: the layer output (hidden), a sublayer's own output (self_attn, cross_attn, mlp), the "
        "residual after a sublayer (post_self_attn, post_cross_attn), or attention heads as rows (self_attn_head, "
        f"cross_attn_head); the vision encoder has {', '.join(kinds_of(VISION_ENCODER))}"))
    window: int = _affects(RESTORE, default=1, type=int,
                           help="consecutive layers restored together (hidden states: always 1)")
    #: None: the model's own default where the corruption acts (:meth:`~.stages.Stage.default_corruption`: the model
    #: folder's noise level on the image embeddings, ROME's 3σ elsewhere), filled in when a tracer runs it.
    corruption: Callable[..., torch.Tensor] | None = _affects(INPUT, default=None)
    samples: int = _affects(INPUT, default=DEFAULT_SAMPLES, type=int, help="noise samples averaged per cell")
    seed: int = _affects(INPUT, default=0, type=int, help="noise seed")
    answer: str | None = _affects(ANSWER, default=None, help=(
        "VQA: the answer to score (default: the model's own first answer token); captioning: the caption to score, "
        "teacher-forced (default: the model's own greedy caption)"))
    word: int | None = _affects(ANSWER, written=CHANGED, default=None, type=word_option, help=(
        "captioning: the word of the caption to score, from 0, or 'all' for every word in turn (default: its first "
        "content word)"))
    metric: Metric = _affects(RESTORE, default="prob", choices=METRICS, help="what is scored")
    contrast: str | None = _affects(RESTORE, default=None,
                                    help="with --metric logit_diff: the answer to compare against")
    sever: Kind | None = _affects(RESTORE, default=None, choices=SEVERABLE,
                                 help="hold this sublayer at its corrupted values while restoring hidden states")
    sever_at: SeverAt = _affects(RESTORE, default="restored", choices=SEVER_AT, help=(
        "where --sever holds it: at the restored positions (ROME's) or at every position"))
    corrupt: Stage | None = _affects(INPUT, default=None, choices=STAGES, help=(
        "where the noise goes: image embeddings (the paper's; default for text blocks), patch embeddings (default for "
        "the vision encoder), pixels, or the text's tokens"))
    corrupt_tokens: tuple[int, ...] | str | None = _affects(INPUT, default=None, help=(
        "with --corrupt question: 'object' (the last content word, ROME's subject) or comma-separated positions "
        "(default: every token)"))
    regions: int | None = _affects(RESTORE, default=None, type=int,
                                   help="vision_encoder: regions per side restored as units (default: every patch)")
    fresh_noise: bool = _affects(INPUT, default=False)  # the paper's: a new draw for every cell and for the low score
    method: Method = _affects(RESTORE, default="exact", choices=METHODS, help=(
        "; ".join(f"{m}: {METHOD_LABELS[m]}" for m in METHODS) + ". An estimate takes one forward and one backward "
        "pass for every cell at once; it can be far from exact under strong noise (see docs/reference.md)"))
    steps: int = _affects(RESTORE, default=1, type=int, help=(
        f"with --method estimate: points on each cell's path from corrupted to clean (1 to {MAX_STEPS}; 1 is plain "
        "attribution patching; each further step costs about three exact traces)"))
    position: int | tuple[int, ...] | str | None = _affects(RESTORE, written=CHANGED, default=None, help=(
        f"head kinds ({', '.join(HEAD_KINDS)}): restore the heads only at this position, these comma-separated "
        f"positions, or a token role ({', '.join(ROLES)}) (default: every position)"))
    verify: int = _affects(RESTORE, written=lambda config: config.method == "verified", default=DEFAULT_VERIFY, type=int,
                           help="with --method verified: how many of the estimate's top cells are made exact")
    order: int = _affects(RESTORE, written=CHANGED, default=1, type=int, choices=(1, 2), help=(
        "estimates: 2 adds each cell's second-order term and flags the cells where it is large"))
    direction: Direction = _affects(RESTORE, written=CHANGED, default="denoise", choices=DIRECTIONS,
                                    help="; ".join(f"{d}: {DIRECTION_LABELS[d]}" for d in DIRECTIONS))
    qk_fix: bool = _affects(RESTORE, written=CHANGED, default=False, type=bool, help=(
        "estimates of hidden states of text blocks: recompute the next layer's attention softmax exactly (AtP*'s QK "
        "fix), instead of linearising through it"))
    grad_drop: bool = _affects(RESTORE, written=CHANGED, default=False, type=bool, help=(
        "estimates: flag the cells whose paths may cancel (AtP*'s GradDrop: the estimate taken again with each "
        "layer dropped from the backward pass; one more pass per layer); --method verified makes them exact"))

    #: The old name of ``word`` (a DeprecationWarning names the new one; goes in the next release).
    target: InitVar[int | None] = None

    def __post_init__(self, target: int | None = None) -> None:
        if target is not None:
            object.__setattr__(self, "word", renamed(self.word, target, "target", "word", stacklevel=4))
        anatomy.check_block(self.block)
        anatomy.check_kind(self.kind, self.block)
        self._check_corruption_stage()
        check_int("window", self.window, 1)
        check_int("samples", self.samples, 1, MAX_SAMPLES)
        check_int("seed", self.seed, 0, MAX_SEED)  # the CPU generator repeats past 2**32
        if self.corruption is not None and not callable(self.corruption):
            raise BlipTraceError(
                "corruption must be GaussianNoise, MultiplicativeNoise, UniformNoise, Scale, ImageSwap, Blur, Grey "
                "or a callable (clean, samples, generator) -> corrupted")
        if self.metric not in METRICS:
            raise BlipTraceError(f"unknown metric {self.metric!r}: use one of {', '.join(METRICS)}")
        paired = isinstance(self.corruption, (ImageSwap, PairSwap, WordSwap))
        if self.metric == "logit_diff" and not self.contrast and not paired:
            raise BlipTraceError("metric='logit_diff' needs contrast='...', the answer to compare against (a "
                                 "counterfactual, ImageSwap or WordSwap, supplies its own on a VQA model)")
        for name in ("answer", "contrast"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise BlipTraceError(f"{name} must be a string or None, got {type(value).__name__} {value!r}")
        if self.word is not None:
            check_int("word", self.word, 0)
        self._check_sever()
        if self.regions is not None:
            if not facts(self.block).image_side:
                raise BlipTraceError("regions group image patches: use them with block='vision_encoder'")
            check_int("regions", self.regions, 1)
        if not isinstance(self.fresh_noise, bool):
            raise BlipTraceError(f"fresh_noise must be True or False, got {self.fresh_noise!r}")
        self._check_method()
        object.__setattr__(self, "position", _check_position(self.position, self.kind))
        self._check_direction()
        if self.regions is not None and is_head_kind(self.kind):
            raise BlipTraceError("a head map's rows are heads, not image regions: drop regions, and pass "
                                 "position=... to restore the heads at some patches only")

    def _check_direction(self) -> None:
        if directions.of(self.direction).restores:
            return
        if self.fresh_noise and self.method != "exact":
            raise BlipTraceError("a noising trace with fresh noise per cell is exact: use method='exact'")

    def _check_method(self) -> None:
        if self.method not in METHODS:
            raise BlipTraceError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        check_int("steps", self.steps, 1, MAX_STEPS)
        check_int("verify", self.verify, 1)
        if self.verify != DEFAULT_VERIFY and self.method != "verified":
            raise BlipTraceError("verify sets how many top cells a verified estimate computes exactly: use it with "
                                 "method='verified'")
        if self.order not in (1, 2) or isinstance(self.order, bool):
            raise BlipTraceError(f"order must be 1 (attribution patching) or 2 (with the second-order term), got "
                                 f"{self.order!r}")
        _check_atp_star(self)
        if self.order == 2 and (self.method == "exact" or self.steps != 1):
            raise BlipTraceError("order=2 is a second-order estimate: use it with method='estimate' or 'verified' "
                                 "and steps=1")
        if self.method == "exact":
            if self.steps != 1:
                raise BlipTraceError("steps sets an estimate's integration points: use it with method='estimate'")
            return
        if self.sever is not None:
            raise BlipTraceError("severing is not offered for estimates: use method='exact' with sever, "
                                 "or drop sever")
        if self.fresh_noise:
            raise BlipTraceError("an estimate uses one draw of noise for every cell: use method='exact' with "
                                 "fresh_noise=True (the paper's procedure)")

    def _check_sever(self) -> None:
        if self.sever_at not in SEVER_AT:
            raise BlipTraceError(f"unknown sever_at {self.sever_at!r}: use one of {', '.join(SEVER_AT)}")
        if self.sever is None:
            return
        if self.sever not in SEVERABLE:
            raise BlipTraceError(f"unknown sever {self.sever!r}: use one of {', '.join(SEVERABLE)}")
        if self.kind != HIDDEN:
            raise BlipTraceError("sever holds a sublayer while hidden states are restored: use it with kind='hidden'")
        anatomy.check_kind(self.sever, self.block)

    def _check_corruption_stage(self) -> None:
        own = getattr(self.corruption, "stage", None)
        block = facts(self.block)
        stage = stages.of(self.corrupt or own or block.default_stage)
        if own is not None and own != stage.name:
            raise BlipTraceError(f"{type(self.corruption).__name__} works on {own}: use corrupt={own!r}")
        stage.check_corruption(self.corruption)
        if stage.name not in block.stages:
            raise BlipTraceError(
                f"restoring {block.label} states undoes nothing when the corruption is on the {stage.name}: corrupt "
                + " or ".join(f"the {STAGE_LABELS[s]} (corrupt={s!r})" for s in block.stages) + f" before the {block.label}")
        stage.check(self.corruption, self.corrupt_tokens)
        object.__setattr__(self, "corrupt_tokens", _check_tokens(self.corrupt_tokens))
        object.__setattr__(self, "corrupt", stage.name)

    @property
    def flags_cells(self) -> bool:
        """Whether an estimate with this configuration flags unreliable cells (``order=2`` or ``grad_drop``)."""
        return self.method != "exact" and (self.order == 2 or self.grad_drop)

    def to_json(self) -> dict[str, Any]:
        """Every field, in strict JSON, by each field's ``written`` rule (:data:`CHANGED` fields only where they
        are not at their default)."""
        out = {}
        for spec in fields(self):
            value, rule = getattr(self, spec.name), spec.metadata["written"]
            if rule == CHANGED and value == field_default(type(self), spec.name):
                continue
            if callable(rule) and not rule(self):
                continue
            out[spec.name] = _json_value(value)
        return out


def _check_atp_star(config: TraceConfig) -> None:
    """AtP*'s two options apply to one-step estimates: the QK fix to hidden states of text blocks, GradDrop's flag
    to cells of one layer."""
    if not isinstance(config.qk_fix, bool):
        raise BlipTraceError(f"qk_fix must be True or False, got {config.qk_fix!r}")
    if config.qk_fix and (config.method == "exact" or config.kind != HIDDEN or config.block not in TEXT_BLOCKS
                          or config.steps != 1 or config.order != 1):
        raise BlipTraceError("qk_fix corrects a one-step estimate of hidden states of a post-LN text block (they feed "
                             "the next layer's attention): use it with method='estimate' or 'verified', "
                             "kind='hidden', steps=1 and order=1, outside the vision encoder and BLIP-2's language "
                             "model")
    if not isinstance(config.grad_drop, bool):
        raise BlipTraceError(f"grad_drop must be True or False, got {config.grad_drop!r}")
    if config.grad_drop and (config.method == "exact" or config.window != 1 or config.steps != 1 or config.order != 1):
        raise BlipTraceError("grad_drop flags cells of a one-step estimate of one layer each: use it with "
                             "method='estimate' or 'verified', window=1, steps=1 and order=1")


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """A clear error unless ``value`` is a whole number from ``low`` to ``high`` (the same check everywhere)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise BlipTraceError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise BlipTraceError(f"{name} must be {bound}, got {value}")


def _check_tokens(tokens: Any) -> tuple[int, ...] | str | None:
    if tokens is None:
        return None
    if isinstance(tokens, str):
        if tokens != "object":
            raise BlipTraceError(f"corrupt_tokens must be positions or 'object', got {tokens!r}")
        return tokens
    if isinstance(tokens, (int, np.integer)) or not isinstance(tokens, (tuple, list, range)):
        raise BlipTraceError(f"corrupt_tokens must be a list of positions or 'object', got {tokens!r}")
    for t in tokens:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise BlipTraceError(f"corrupt_tokens positions must be integers, got {t!r}")
    if not tokens:
        raise BlipTraceError("corrupt_tokens is empty: pass positions, 'object', or None for every token")
    return tuple(int(t) for t in tokens)


def parse_position(text: str | None) -> int | tuple[int, ...] | str | None:
    """A head map's positions from text, as the command line and the explorer take them: "" or None for every
    position, "3", "1,2", or a token role such as "object"."""
    text = (text or "").strip()
    if not text or text == "all":
        return None
    if text in ROLES:
        return text
    try:
        picked = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise BlipTraceError(f"positions must be numbers such as 3 or 1,2, or a role ({', '.join(ROLES)}); "
                             f"got {text!r}") from None
    return picked[0] if len(picked) == 1 else picked


def _check_position(position: Any, kind: str) -> int | tuple[int, ...] | str | None:
    """``position`` of a head kind: None (every position), a position, positions, or a token role."""
    if position is None:
        return None
    if not is_head_kind(kind):
        raise BlipTraceError(f"position restricts a head map to some positions: use it with a head kind "
                             f"({', '.join(HEAD_KINDS)}); kind {kind!r} restores every position in turn")
    if isinstance(position, str):
        if position not in ROLES:
            raise BlipTraceError(f"position must be a position, positions, or a role ({', '.join(ROLES)}); "
                                 f"got {position!r}")
        return position
    if isinstance(position, (int, np.integer)) and not isinstance(position, bool):
        check_int("position", position, 0)
        return int(position)
    if not isinstance(position, (tuple, list, range)) or not position:
        raise BlipTraceError(f"position must be a position, a non-empty list of positions, or a role; got {position!r}")
    for p in position:
        check_int("position", p, 0)
    return tuple(sorted({int(p) for p in position}))


def cache_key(config: TraceConfig, part: str) -> tuple[Any, ...]:
    """The key of ``config`` in the cache of ``part`` ("corrupted", "decoder" or "result"): every field
    whose declared effect reaches that part, by name. No cache key is written by hand."""
    wanted = CACHE_PARTS[part]
    return tuple((f.name, getattr(config, f.name)) for f in fields(config) if f.metadata["affects"] in wanted)
