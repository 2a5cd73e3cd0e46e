"""Attention knockout: cut attention edges over a window of layers on the clean input, and see what the answer loses.

    >>> from blip_trace_widgets import load_model, demo_samples
    >>> from blip_trace_widgets.knockout import Edges, knockout
    >>> image, question, _ = demo_samples()[0]
    >>> result = knockout(load_model("demo"), image, question, edges=[Edges(), Edges(keys="cls")])
    >>> result.labels
    ['image → question', 'image [CLS] → question']
    >>> result.changes.shape == (2, result.num_layers)
    True

Causal tracing shows which states carry the answer; knockout shows when information moves. For each edge
group (see :mod:`~.edges`) and each layer l, the group's edges are cut in a window of layers centred on l
(ROME's window rule, :func:`~.engine.window_layers`): a cut edge's attention logit is set to the dtype's
minimum before the softmax, as in Zhang et al.'s ``set_block_attn_hooks_llava``. A query left with no edge
reads nothing by default (``empty="zero"``: its attention context is zero), or the mean of the values it was cut
from (``empty="mean"``: what the softmax over equal minimum logits gives, Hugging Face's masking rule). Each row
scores p(answer) (p(caption word), p(match)); the result's ``changes`` are (p_cut − p_clean) / p_clean. Nothing is
corrupted and nothing is drawn at random: a knockout of one input is deterministic.

A language model's image → text group (``Edges(block="language_model", attention="self", keys="image")``, or
``"lm_encoder"``) cuts the text's queries only, as Zhang et al.'s Image→Question does: the image's own positions
keep reading each other (name positions in ``queries`` to cut others).

Every (group, layer) is one row of a batch with its own edges, run by the engine's layer-by-layer arithmetic
(:func:`~.engine.cut_staircase`): a row follows the clean run up to its first cut layer, and the image's
cross-attention keys and values are computed once for every row. ``method="estimate"`` gives every row from
one forward and one backward pass: minus the gradient of p with respect to a multiplier on each group's edges
at each layer (the first-order term of edge attribution patching), summed over the window.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import InitVar, dataclass
from typing import Any

import numpy as np
import torch

from ..causal_trace.blocks.base import Block
from ..causal_trace.config import TraceConfig
from ..causal_trace.tracer import Tracer
from ..core.cache import LRU
from ..core.errors import BlipTraceError, renamed
from ..core.inputs import ImageLike
from ..core.names import BLOCK_LABELS, EACH_TOKEN, IMAGE_CLS, IMAGE_QUERIES, KNOCKOUT_WINDOW, LANGUAGE_MODEL, LM_ENCODER
from ..core.options import option
from ..core.scoring import Target, score_rows
from ..models.anatomy import check_block
from ..models.attention import DEFAULT_EMPTY, EMPTY_ROWS, Cut, Dial, check_empty
from ..models.chunks import chunks
from ..models.loading import BlipBundle
from ..models.runs import cut_staircase, window_layers
from .edges import SHORTHANDS, Edges, resolve_edges
from .result import KNOCKOUT_METHODS, KnockoutResult


@dataclass(frozen=True)
class KnockoutConfig:
    """What a knockout cuts and scores. Frozen, so it keys the cache of results."""

    edges: tuple[Edges, ...] = (Edges(),)
    window: int = option(default=KNOCKOUT_WINDOW, type=int, help="layers cut around each layer")
    answer: str | None = option(default=None, help=(
        "the answer or caption to score (default: the model's own); over a dataset, 'expected' scores the "
        "dataset's answers"))
    word: int | None = option(default=None, type=int, help=(
        "captioning: the caption word scored (default: its first content word; --target: its old name)"))
    method: str = option(default="exact", choices=KNOCKOUT_METHODS, help=(
        "exact: cut runs; estimate: one forward and backward pass (first order, can be far off for large effects)"))
    #: The old name of ``word`` (a DeprecationWarning names the new one; goes in the next release).
    target: InitVar[int | None] = None
    #: What a query reads when every key it could read is cut: a name of
    #: :data:`~blip_trace_widgets.models.attention.EMPTY_ROWS`.
    empty: str = option(default=DEFAULT_EMPTY, choices=tuple(EMPTY_ROWS), help=(
        "what a query with every key cut reads: " + "; ".join(f"{rule.name}: {rule.help}" for rule in EMPTY_ROWS.values())))

    def __post_init__(self, target: int | None = None) -> None:
        if target is not None:
            object.__setattr__(self, "word", renamed(self.word, target, "target", "word", stacklevel=4))
        object.__setattr__(self, "edges", _edge_tuple(self.edges))
        check_empty(self.empty)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise BlipTraceError(f"window={self.window!r}: a knockout cuts a window of at least 1 layer")
        if self.method not in KNOCKOUT_METHODS:
            raise BlipTraceError(f"unknown knockout method {self.method!r}: use one of {', '.join(KNOCKOUT_METHODS)}")


def _edge_tuple(edges: Any) -> tuple[Edges, ...]:
    """``edges`` as a tuple of Edges, or a clear error naming what to pass."""
    if isinstance(edges, Edges):
        return (edges,)
    named = isinstance(edges, str) or (isinstance(edges, (list, tuple)) and any(isinstance(e, str) for e in edges))
    if named:
        raise BlipTraceError(f"edges={edges!r}: a KnockoutConfig takes Edges(...); group names such as 'image' "
                             "are resolved on an image by knockout(), knockout_sweep() or edges.parse_edges(name, "
                             "image)")
    picked = tuple(edges) if isinstance(edges, (list, tuple)) else ()
    if not picked or not all(isinstance(e, Edges) for e in picked):
        raise BlipTraceError(f"edges={edges!r}: pass one Edges(...), a group name ({', '.join(SHORTHANDS)}) or a "
                             "list of them: at least one group to cut")
    return picked


@dataclass(frozen=True)
class Group:
    """An edge group resolved on one input: its block, attention and boolean edges [T, M] (query x key)."""

    label: str
    block: str
    attention: str
    edges: torch.Tensor
    spec: dict[str, Any]

    @property
    def count(self) -> int:
        return int(self.edges.sum())


class Knockout:
    """Knockouts of one (image, text), sharing the clean pass between them and caching results."""

    def __init__(self, tracer: Tracer, cache_size: int = 64) -> None:
        self.tracer = tracer
        self._results: LRU[KnockoutResult] = LRU(cache_size)

    @classmethod
    def of(cls, bundle: BlipBundle, image: ImageLike, text: str) -> Knockout:
        return cls(Tracer(bundle, image, text))

    # ----- resolving edges ----------------------------------------------------------------
    def target(self, config: KnockoutConfig) -> Target:
        task = self.tracer.task
        # what a trace refuses (a caption word on a model that scores no caption, an answer to a matcher), this
        # refuses too, before the head's own fields drop it
        task.check(TraceConfig(block=task.default_block, metric="prob", answer=config.answer, word=config.word))
        return self.tracer.target(TraceConfig(block=task.default_block, metric="prob",
                                              **task.knockout_fields(config.answer, config.word)))

    def block_of(self, edges: Edges) -> Block:
        return self.tracer.blocks[edges.block or self.tracer.blocks.reader.name]  # refuses a block the head lacks

    def tokens(self, block: Block, target: Target) -> list[str]:
        """The positions ``block`` reads (its attention's queries), labelled."""
        return block.labels(self.tracer.clean_pass.context, target)

    def groups(self, config: KnockoutConfig, target: Target) -> list[Group]:
        """Every edge group of ``config`` resolved to boolean edges ("each" queries split into one per token)."""
        from ..causal_trace.blocks.base import restored_positions

        out = []
        for edges in config.edges:
            block = self.block_of(edges)
            labels = self.tokens(block, target)
            keys = self._keys(edges, block, labels)
            default = self._default_queries(edges, block, labels)
            queries = default if edges.queries == EACH_TOKEN else [None]
            for single in queries:
                spec = edges if single is None else Edges(single, edges.keys, edges.attention, edges.block)
                picked = default if spec.queries is None else restored_positions(spec.queries, labels, True)
                matrix = torch.zeros(len(labels), keys[1], dtype=torch.bool, device=self.tracer.device)
                matrix[torch.tensor(picked)[:, None], torch.tensor(keys[0])[None, :]] = True
                texts = self._texts(block)
                label = spec.describe(*texts) if single is None else \
                    Edges(None, edges.keys, edges.attention, edges.block).describe(labels[single], texts[1])
                out.append(Group(label, block.name, spec.attention, matrix,
                                 {**spec.to_dict(), "block": block.name, "query_positions": picked,
                                  "key_positions": keys[0]}))
        self._check_layers(out, config.window)
        return out

    @staticmethod
    def _default_queries(edges: Edges, block: Block, labels: list[str]) -> list[int]:
        """The queries of ``queries=None`` (and "each"): every position, but a language model's image → text group
        cuts the text's positions only, as Zhang et al.'s Image→Question does. (Its image positions read only
        image keys under OPT's causal mask: cut, they would read nothing, and the edges counted would include
        ones the mask had already removed; under T5's they would lose each other and change what the decoder
        reads, which is not the text reading the image.)"""
        everything = list(range(len(labels)))
        if edges.block in (LANGUAGE_MODEL, LM_ENCODER) and edges.attention == "self" and edges.keys == IMAGE_QUERIES:
            return everything[int(getattr(block, "queries", 0)):]
        return everything

    def _texts(self, block: Block) -> tuple[str, str]:
        task = self.tracer.task
        return task.reader_text(block.name), task.text

    def _keys(self, edges: Edges, block: Block, labels: list[str]) -> tuple[list[int], int]:
        """The key positions ``edges`` cuts, and how many keys there are."""
        from ..causal_trace.blocks.base import restored_positions

        if not edges.reads_image:  # the keys are the block's own positions, or (cross) its encoder's
            decoder: Any = block  # cross-attention reading text: a decoder (it says what it reads)
            key_labels = labels if edges.attention == "self" else decoder.cross_labels(self.tracer.clean_pass.context)
            if edges.keys != IMAGE_QUERIES:
                return restored_positions(edges.keys, key_labels, True), len(key_labels)
            image = list(range(int(getattr(block, "queries", 0))))  # a language model reads the image first
            if not image:
                raise BlipTraceError(f"keys={IMAGE_QUERIES!r} are the image's positions in BLIP-2's language model; "
                                     "cut the image with attention='cross' in a BLIP text block or the Q-Former")
            return image, len(key_labels)
        count = int(self.tracer.clean.image_embeds.shape[1])
        keys = edges.keys
        if keys is None:
            return list(range(count)), count
        if keys == IMAGE_CLS:
            return [0], count
        if isinstance(keys, str):
            raise BlipTraceError(f"keys={keys!r}: the image's keys are None (all), {IMAGE_CLS!r}, a region or positions")
        if hasattr(keys, "token_mask"):
            picked = keys.token_mask(count).nonzero().flatten().tolist()
            if not picked:
                raise BlipTraceError(f"{edges.describe()}: the region holds no image patch; make it larger")
            return picked, count
        return restored_positions(keys, ["image"] * count, True), count

    def _check_layers(self, groups: Sequence[Group], window: int) -> None:
        for group in groups:
            layers = len(self.tracer.blocks[group.block].stack)
            if window > layers:
                raise BlipTraceError(f"window={window} is wider than the {layers} layers of the "
                                     f"{BLOCK_LABELS[group.block]}: "
                                     f"use at most {layers}")

    # ----- running ------------------------------------------------------------------------
    def run(self, config: KnockoutConfig | None = None, **fields: Any) -> KnockoutResult:
        """The knockout of ``config`` (or of a KnockoutConfig built from ``fields``), cached."""
        config = config if config is not None else KnockoutConfig(**fields)
        cached = self._results.get(config)
        if cached is not None:
            return cached
        target = self.target(config)
        groups = self.groups(config, target)
        clean = self.clean_score(target)
        # groups on blocks of different depths share the layer axis: a shallower block's row is NaN past its layers
        scores = np.full((len(groups), self.layers(groups)), np.nan)
        for name in dict.fromkeys(g.block for g in groups):
            index = [i for i, g in enumerate(groups) if g.block == name]
            picked = [groups[i] for i in index]
            block = self.tracer.blocks[name]
            rows = self._estimate(block, picked, config.window, target, clean, config.empty) \
                if config.method == "estimate" else self._exact(block, picked, config.window, target, config.empty)
            scores[index, : rows.shape[1]] = rows
        result = KnockoutResult.build(self.tracer, config, groups, target, clean, scores)
        self._results.put(config, result)
        return result

    def layers(self, groups: Sequence[Group]) -> int:
        """The layers of the result: those of the deepest block a group cuts."""
        return max(len(self.tracer.blocks[g.block].stack) for g in groups)

    @torch.no_grad()
    def clean_score(self, target: Target) -> float:
        last = self.tracer.blocks.last
        run = self.tracer.clean_run(last, target)  # cached per target, shared with the traces
        logits = last.logits(self.tracer.clean_pass.context, run.output[:, None], target)[:, 0]
        return float(score_rows(logits, target, "prob")[0])

    @torch.no_grad()
    def _exact(self, block: Block, groups: Sequence[Group], window: int, target: Target,
               empty: str = DEFAULT_EMPTY) -> np.ndarray:
        tracer, layers = self.tracer, len(block.stack)
        clean, cross = tracer.clean_run(block, target), block.clean_cross(tracer.clean_pass.context, target)
        rows = [(g, layer) for g in range(len(groups)) for layer in range(layers)]
        spans = [window_layers(layer, window, layers) for _, layer in rows]
        order = sorted(range(len(rows)), key=lambda r: spans[r].start)
        out = np.empty(len(rows))
        per_chunk = block.rows_per_chunk(tracer.clean_pass.context, TraceConfig(block=check_block(block.name), samples=1), target)
        for chunk in chunks(order, per_chunk):
            cuts_at = _RowCuts(groups, [rows[r][0] for r in chunk], [spans[r] for r in chunk], tracer.device, empty)
            final = cut_staircase(block.stack, clean, cross, [spans[r].start for r in chunk], cuts_at)
            logits = block.logits(tracer.clean_pass.context, final, target)
            out[chunk] = score_rows(logits.reshape(-1, *logits.shape[2:]), target, "prob").double().cpu().numpy()
            tracer.stats["knockout_chunks"] += 1
        return out.reshape(len(groups), layers)

    def _estimate(self, block: Block, groups: Sequence[Group], window: int, target: Target,
                  clean_score: float, empty: str = DEFAULT_EMPTY) -> np.ndarray:
        """p_clean − Σ over the window of ∂p/∂(multiplier of the group's edges at each layer), from one pass."""
        tracer, stack = self.tracer, block.stack
        layers = len(stack)
        clean, cross = tracer.clean_run(block, target), block.clean_cross(tracer.clean_pass.context, target)
        scales = torch.ones(len(groups), layers, dtype=torch.float32, device=tracer.device, requires_grad=True)
        kinds = {a: [i for i, g in enumerate(groups) if g.attention == a] for a in ("self", "cross")}
        stacked = {a: torch.stack([groups[i].edges for i in picked]) if picked else None for a, picked in kinds.items()}
        with torch.enable_grad():
            h = clean.inputs[0][:, None]
            mask = stack.self_mask(h.shape[2], h.dtype, h.device)
            for j in range(layers):
                cuts = tuple(None if edges is None else Dial(edges, scales[kinds[a], j].to(h.dtype), empty)
                             for a, edges in stacked.items())
                h = stack.layer(j, h, cross[j], mask, cuts=cuts)
            logits = block.logits(tracer.clean_pass.context, h, target)
            score = score_rows(logits.reshape(-1, *logits.shape[2:]), target, "prob")[0]
            (grad,) = torch.autograd.grad(score, scales)
        per_layer = grad.double().cpu().numpy()
        summed = np.stack([[per_layer[g, list(window_layers(layer, window, layers))].sum() for layer in range(layers)]
                           for g in range(len(groups))])
        return clean_score - summed


class _RowCuts:
    """Each row's cuts at a layer: its group's edges inside its window, none outside."""

    def __init__(self, groups: Sequence[Group], row_groups: list[int], spans: list[range], device: torch.device,
                 empty: str = DEFAULT_EMPTY):
        self.empty = empty
        self.attention = [groups[g].attention for g in row_groups]
        self.lo = torch.tensor([s.start for s in spans], device=device)
        self.hi = torch.tensor([s.stop for s in spans], device=device)
        self.edges: dict[str, torch.Tensor | None] = {}
        for attention in ("self", "cross"):
            shapes = [groups[g].edges.shape for g in row_groups if groups[g].attention == attention]
            if not shapes:
                self.edges[attention] = None
                continue
            blank = torch.zeros(shapes[0], dtype=torch.bool, device=device)
            self.edges[attention] = torch.stack([groups[g].edges if groups[g].attention == attention else blank
                                                 for g in row_groups])

    def __call__(self, j: int, count: int) -> tuple[Cut | None, Cut | None]:
        active = (self.lo[:count] <= j) & (j < self.hi[:count])
        cuts: list[Cut | None] = []
        for attention in ("self", "cross"):
            edges = self.edges[attention]
            if edges is None or not bool(active.any()):
                cuts.append(None)
                continue
            cuts.append(Cut(edges[:count] & active[:, None, None], self.empty))
        return cuts[0], cuts[1]


def knockout(
    bundle: BlipBundle,
    image: ImageLike,
    text: str,
    *,
    edges: Edges | str | Sequence[Edges | str] = (Edges(),),
    window: int = KNOCKOUT_WINDOW,
    answer: str | None = None,
    word: int | None = None,
    method: str = "exact",
    target: int | None = None,
    empty: str = DEFAULT_EMPTY,
) -> KnockoutResult:
    """Cut each group of ``edges`` in a window of layers around every layer, on the clean (image, text), and score.

    ``edges`` are :class:`~.edges.Edges` or the command line's group names (``"image"``, ``"object"``, ...: see
    :data:`~.edges.SHORTHANDS`). ``text`` is a VQA question, a captioner's prompt or a matcher's text; ``answer``
    the answer or caption scored (the model's own by default); ``word`` the caption word (its first content word by
    default; ``target`` is its old name); ``empty`` what a query with every key cut reads (``"zero"`` or
    ``"mean"``). See the module's notes.
    """
    knock = Knockout.of(bundle, image, text)
    config = KnockoutConfig(edges=resolve_edges(edges, knock.tracer.image, knock.tracer.task.decoder), window=window,
                            answer=answer, word=renamed(word, target, "target", "word"), method=method, empty=empty)
    return knock.run(config)
