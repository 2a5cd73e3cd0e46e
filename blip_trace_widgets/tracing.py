"""Causal tracing of BLIP: corrupt the input, restore one state at a time, score the answer, caption word or match.

    >>> from blip_trace_widgets import load_model, trace, demo_samples
    >>> bundle = load_model("demo")
    >>> image, question, _ = demo_samples()[0]
    >>> result = trace(bundle, image, question, kind="mlp", window=3, samples=4)
    >>> result.scores.shape == (len(result.tokens), result.num_layers)
    True

:func:`trace` is a one-shot call. :class:`Tracer` keeps the work that does not change
between traces of one (image, question): the clean pass, the corrupted runs and finished
results, each in a bounded cache whose key :func:`cache_key` derives from the
:class:`TraceConfig` fields that matter to it. The blocks themselves live in
:mod:`~.blocks`; the layer-by-layer arithmetic in :mod:`~.engine`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from .blocks import Block, Corrupted
from .cache import LRU
from .config import CACHE_PARTS, TraceConfig, cache_key  # noqa: F401  (public here too)
from .corrupted import CorruptedRuns, tensor_bytes
from .engine import DEFAULT_MEMORY_BUDGET, Cell, ChunkEdits, Progress, Run, chunks, staircase, start_layer
from .errors import BlipTraceError
from .estimates import Estimator
from .inputs import ImageLike
from .loading import BlipBundle
from .names import RELIABILITY_TOLERANCE, TINY_ABSOLUTE, VISION_ENCODER, is_head_kind
from .results import TraceResult
from .scoring import Target, score_rows


class Tracer(CorruptedRuns):
    """Causal traces of one (image, text), sharing the clean pass and corrupted runs between them.

    The text is a VQA model's question, a captioner's prompt ("" for none) or an image-text matcher's text."""

    def __init__(
        self,
        bundle: BlipBundle,
        image: ImageLike,
        question: str,
        *,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        max_batch_rows: int | None = None,
        result_cache_size: int = 256,
        corrupted_cache_size: int = 2,
    ) -> None:
        super().__init__(bundle, image, question, memory_budget=memory_budget, max_batch_rows=max_batch_rows,
                         corrupted_cache_size=corrupted_cache_size)
        self._results: LRU[TraceResult] = LRU(result_cache_size)
        self.estimator = Estimator(self)

    def held_bytes(self) -> int:
        """Bytes of the tensors this object keeps: its clean pass, cached runs and estimates' gradients."""
        return super().held_bytes() + tensor_bytes(*self.estimator.held())

    # ----- scoring -----------------------------------------------------------------------
    @torch.no_grad()
    def baselines(self, config: TraceConfig) -> tuple[float, float]:
        """(low, high): the corrupted run with nothing restored (the seed's first draw), and the clean run.

        For an estimate the low score comes from the estimate's own pass over the same corrupted draw
        (the same arithmetic), so that no separate corrupted pass is made."""
        target = self.target(config)
        last = self.blocks.vision if target.readout == "itc" else self.blocks.last

        def score(run: Any) -> torch.Tensor:
            return score_rows(last.logits(self, run.output[:, None], target)[:, 0], target, config.metric)

        high = score(self.clean_run(last, target))
        if config.method == "estimate" and config.direction == "denoise":
            low = self.estimator.gradients(self.blocks[config.block], config, target).scores
        else:
            low = score(self.runs(last, config, target)[1])
        return float(low.mean()), float(high[0])

    def _check_cells(self, block: Block, cells: Sequence[Cell], positions: int) -> None:
        layers = len(block.stack)
        for cell in cells:
            for layer, pos in cell:
                if not (0 <= layer < layers and 0 <= pos < positions):
                    raise BlipTraceError(
                        f"cell entry (layer={layer}, position={pos}) is outside {layers} layers x {positions} positions")

    @torch.no_grad()
    def _score(self, block: Block, cells: Sequence[Cell], config: TraceConfig, target: Target,
               corrupted: Corrupted | None, progress: Callable[[int], None] | None = None,
               ) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard error over noise samples of each cell's score, against one corrupted draw."""
        clean_run, corrupted_run, cross = self.runs(block, config, target, corrupted)
        self._check_cells(block, cells, int(clean_run.kinds[config.kind][0].shape[1]))  # positions, or head units
        clean_states = [x[0] for x in clean_run.kinds[config.kind]]
        severed = corrupted_run.kinds[config.sever] if config.sever else None
        if config.direction == "noise":  # the clean run is the base; each sample's corrupted states are patched in
            samples = int(corrupted_run.inputs[0].shape[0])
            clean_states = list(corrupted_run.kinds[config.kind])
            if config.sever:  # the severed sublayer is held at the base run's values: the clean ones
                severed = [x.expand(samples, *x.shape[1:]) for x in clean_run.kinds[config.sever]]
            corrupted_run = Run([x.expand(samples, *x.shape[1:]) for x in clean_run.inputs])
            cross = block.clean_cross(self, target)
        n_layers, samples = len(block.stack), int(config.samples)
        order = sorted(range(len(cells)), key=lambda i: start_layer(cells[i], config.kind, n_layers))
        mean, stderr = np.empty(len(cells)), np.empty(len(cells))
        rows = block.rows_per_chunk(self, config, target)
        for chunk in chunks(order, max(1, rows // samples)):
            chunk_cells = [cells[i] for i in chunk]
            edits = ChunkEdits.build(config.kind, clean_states, chunk_cells, self.device, sever=config.sever,
                                      severed=severed, sever_at=config.sever_at)
            logits = block.logits(self, staircase(block.stack, corrupted_run, cross, chunk_cells, edits), target)
            s, c = logits.shape[:2]
            scores = score_rows(logits.reshape(s * c, *logits.shape[2:]), target, config.metric).view(s, c).double()
            mean[chunk] = scores.mean(0).cpu().numpy()
            stderr[chunk] = (scores.std(0) / np.sqrt(s)).cpu().numpy() if s > 1 else np.nan
            self.stats["engine_chunks"] += 1
            if progress is not None:
                progress(len(chunk))
        return mean, stderr

    def restore(self, cells: Sequence[Cell], config: TraceConfig, progress: Progress | None = None,
                ) -> tuple[np.ndarray, np.ndarray]:
        """Mean score and its standard error over noise samples, per cell of ``config.kind`` restored.

        With ``fresh_noise`` each cell gets its own draw, in order after the low score's draw (the paper's).
        """
        mean, stderr, _ = self.restore_marked(cells, config, progress)
        return mean, stderr

    def restore_marked(self, cells: Sequence[Cell], config: TraceConfig, progress: Progress | None = None,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`restore`, and which cells are exact (patched runs) rather than estimated."""
        block = self.blocks[config.block]
        target = self.target(config)
        done = 0

        def advance(count: int) -> None:
            nonlocal done
            done += count
            if progress is not None:
                progress(done, len(cells))

        self.stats["engine_calls"] += 1
        method = {"exact": self._exact, "estimate": self._estimated, "verified": self._verified}[config.method]
        return method(block, cells, config, target, advance)

    # Each method scores ``cells`` as (mean, standard error, which cells are exact), picked by config.method.
    def _estimated(self, block: Block, cells: Sequence[Cell], config: TraceConfig, target: Target,
                   advance: Callable[[int], None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Attribution patching for every cell (see :mod:`~.estimates`): no cell is exact."""
        return (*self.estimator.estimate(block, cells, config, target, advance), np.zeros(len(cells), bool))

    def _exact(self, block: Block, cells: Sequence[Cell], config: TraceConfig, target: Target,
               advance: Callable[[int], None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patched runs for every cell: one draw shared by every cell, or (``fresh_noise``) a draw per cell."""
        if not config.fresh_noise:
            return (*self._score(block, cells, config, target, None, advance), np.ones(len(cells), bool))
        generator = torch.Generator().manual_seed(int(config.seed))
        self._corrupt_draw(config, generator)
        mean, stderr = np.empty(len(cells)), np.empty(len(cells))
        for i, cell in enumerate(cells):
            corrupted = self._corrupt(config, generator)
            m, e = self._score(block, [cell], config, target, corrupted, advance)
            mean[i], stderr[i] = m[0], e[0]
        return mean, stderr, np.ones(len(cells), bool)

    def _verified(self, block: Block, cells: Sequence[Cell], config: TraceConfig, target: Target,
                  advance: Callable[[int], None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The estimate of every cell, then the exact score of the ``config.verify`` cells it puts furthest from
        the corrupted score (either way), over the same noise draw."""
        mean, stderr = self.estimator.estimate(block, cells, config, target, advance)
        low = float(self.estimator.gradients(block, config, target).scores.mean())  # the base: corrupted, or clean
        picked = np.argsort(-np.abs(mean - low), kind="stable")[: int(config.verify)]
        if config.order == 2:  # every flagged cell is made exact too
            picked = np.union1d(picked, np.flatnonzero(self.unreliable(config)))
        exact_mean, exact_stderr = self._score(block, [cells[i] for i in picked], config, target, None, None)
        mean[picked], stderr[picked] = exact_mean, exact_stderr
        marked = np.zeros(len(cells), bool)
        marked[picked] = True
        return mean, stderr, marked

    def unreliable(self, config: TraceConfig) -> np.ndarray:
        """Per cell of the last order=2 estimate: whether its second-order term (averaged over the noise samples)
        exceeds RELIABILITY_TOLERANCE of the total effect, or of the metric's floor when that is larger."""
        second = self.estimator.second_order
        assert second is not None and config.order == 2
        low, high = self.baselines(config)
        tolerance = RELIABILITY_TOLERANCE * max(abs(high - low), TINY_ABSOLUTE.get(config.metric, 0.0))
        return np.abs(second.mean(0).numpy()) > tolerance

    # ----- results -----------------------------------------------------------------------
    def trace(self, config: TraceConfig | None = None, *, progress: Progress | None = None, **overrides: Any) -> TraceResult:
        """The heatmap for ``config`` (or :class:`TraceConfig` fields as keywords); cached per config."""
        from .procedures import resolve_config

        config = replace(config, **overrides) if config is not None else resolve_config(self.bundle, **overrides)
        key = cache_key(config, "result")
        cached = self._results.get(key)
        if cached is not None:
            self.stats["cache_hits"] += 1
            return cached
        block = self.blocks[config.block]
        if config.window > len(block.stack):
            raise BlipTraceError(f"window {config.window} is wider than the {len(block.stack)} layers of the "
                                 f"{config.block.replace('_', ' ')}: use at most {len(block.stack)}")
        if config.block == VISION_ENCODER:
            self.clean_vision  # recorded before the clean pass, which then reuses it  # noqa: B018
        target = self.target(config)
        layout = block.layout(self, config, target)
        extra = dict(layout.extra)
        if config.corrupt == "question" and not is_head_kind(config.kind):  # a head map's rows are heads
            extra["corrupted_positions"] = self.corrupt_positions(config)
        mean, stderr, exact = self.restore_marked(layout.cells, config, progress)
        shape = (len(layout.labels), len(block.stack))
        if config.method == "verified":  # which cells are exact: [row, layer] pairs
            extra["exact_cells"] = [[int(i) // shape[1], int(i) % shape[1]] for i in np.flatnonzero(exact)]
        if config.order == 2:  # flagged cells that were not made exact
            flagged = self.unreliable(config) & ~exact
            extra["unreliable_cells"] = [[int(i) // shape[1], int(i) % shape[1]] for i in np.flatnonzero(flagged)]
        low, high = self.baselines(config)
        _check_finite(config, low, high, mean)
        result = TraceResult(
            scores=mean.reshape(shape), low_score=low, high_score=high,
            answer=self.scored_text(target), tokens=layout.labels, block=config.block,
            kind=config.kind, window=int(config.window), stderr=stderr.reshape(shape),
            config={**config.to_json(), "question": self.question, "model": self.bundle.name,
                    "head": self.head, "model_answer": self.model_answer,
                    **self.task.config_fields(config),
                    "answer_ids": [int(i) for i in target.tokens], **_contrast_text(self, config, target),
                    "dtype": str(self.bundle.dtype).replace("torch.", ""), **extra},
        )
        result.image = self.image  # for plot_on_image; not serialised
        return self._results.put(key, result)


def _contrast_text(tracer: Any, config: TraceConfig, target: Target) -> dict[str, Any]:
    """A logit difference's contrast as said, and the counterfactual's own answer when a pair supplied it."""
    if target.contrast is None:
        return {}
    fields: dict[str, Any] = {"contrast_answer": str(tracer.bundle.tokenizer.decode([target.contrast])).strip()}
    if config.contrast is None:
        fields["counterfactual_answer"] = fields["contrast_answer"]
    return fields


def _check_finite(config: TraceConfig, low: float, high: float, mean: np.ndarray) -> None:
    """Refuse a map whose scores are not numbers (a corruption so large that the runs overflow), and warn when
    the clean probability is below float64's range."""
    import warnings

    from .corruption import describe

    if not np.isfinite(high):
        raise BlipTraceError(f"the clean run's {config.metric} is not finite ({high}); the model's outputs overflow: "
                             "use metric='logprob' or a float32 model")
    if not (np.isfinite(low) and np.isfinite(mean).all()):
        level = {k: v for k, v in describe(config.corruption).items() if k not in ("repr", "region")}
        raise BlipTraceError(
            f"the corrupted runs' scores are not finite (NaN or infinite) with {level}: the corruption is so large "
            "that the model's activations overflow. Lower its level (ROME's is GaussianNoise(3.0); the paper's "
            "MultiplicativeNoise(5.0))")
    if config.metric == "prob" and high == 0.0:
        warnings.warn("the clean probability of what is scored is below 1e-308, float64's range, and reads as 0: "
                      "use metric='logprob'", RuntimeWarning, stacklevel=3)


def default_config(bundle: BlipBundle, **overrides: Any) -> TraceConfig:
    """A TraceConfig whose Gaussian noise is the bundle's ``noise_scale`` on the image embeddings
    (ROME's 3σ unless the model folder says otherwise); image-side traces keep ROME's 3σ on the patches.
    The same as ``resolve_config(bundle, "rome", **overrides)``."""
    from .procedures import resolve_config

    return resolve_config(bundle, "rome", **overrides)


def trace(
    bundle: BlipBundle,
    image: ImageLike,
    question: str,
    *,
    procedure: str = "rome",
    progress: Progress | None = None,
    max_batch_rows: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    **fields: Any,
) -> TraceResult:
    """Causal trace of one image and text: a VQA model's question, a captioner's prompt ("" for none), or the
    text an image-text matcher matches. The default block is the head's reader (question encoder, caption
    decoder or ITM encoder). For a captioner ``answer`` is the caption to score (teacher-forced; the model's
    own greedy caption by default) and ``target=k`` scores its word k; see :func:`~.captioning.trace_caption`
    for every word at once.

    ``procedure`` ("rome", "paper" or "paper_attention", see :mod:`~.procedures`) gives the
    defaults; any :class:`TraceConfig` field passed as a keyword (``block``, ``kind``,
    ``window``, ``corruption``, ``samples``, ``seed``, ``answer``, ``metric``, ``contrast``,
    ``sever``, ``sever_at``, ``corrupt``, ``corrupt_tokens``, ``regions``, ``fresh_noise``,
    ``method``, ``steps``, ``target``) overrides them. ``method="estimate"`` gives an attribution-patching
    estimate of every cell from one forward and one backward pass (see :mod:`~.estimates`).
    """
    from .procedures import resolve_config

    if not isinstance(bundle, BlipBundle):
        raise BlipTraceError("pass the bundle returned by load_model(...), not a bare model")
    config = resolve_config(bundle, procedure, **fields)
    tracer = Tracer(bundle, image, question, max_batch_rows=max_batch_rows, memory_budget=memory_budget)
    return tracer.trace(config, progress=progress)
