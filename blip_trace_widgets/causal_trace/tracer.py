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

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal, NamedTuple, overload

import numpy as np
import torch

from ..core.cache import LRU
from ..core.errors import BlipTraceError, renamed
from ..core.inputs import ImageLike
from ..core.names import BLOCK_LABELS, is_head_kind
from ..core.scoring import Scores, Target, score_rows
from ..models import heads
from ..models.attention import Cell, Progress
from ..models.chunks import DEFAULT_MEMORY_BUDGET
from ..models.loading import BlipBundle
from . import directions, stages
from .captioning import CaptionTrace, trace_words
from .clean import CleanPass
from .config import CACHE_PARTS, TraceConfig, cache_key  # noqa: F401  (public here too)
from .corrupted import CorruptedRuns, tensor_bytes
from .estimates import Estimator
from .exact import ExactScorer, Scorer, VerifiedScorer
from .results import TraceResult
from .sharpen import AutoSampling, sharpen
from .targets import Targets


def _forward(part: str, name: str) -> Any:
    """A read-only attribute of the tracer that is ``name`` of its ``part``."""
    return property(lambda self: getattr(getattr(self, part), name), doc=f"``{part}.{name}``")


class Tracer:
    """Causal traces of one (image, text), sharing the clean pass and corrupted runs between them.

    The text is a VQA model's question, a captioner's prompt ("" for none) or an image-text matcher's text.
    A tracer is made of parts, each with one job: ``clean_pass`` (the clean pass, a :class:`~.clean.CleanPass`; the
    blocks read only its frozen :class:`~.blocks.Context`), ``targets`` (what a config scores), ``corrupted_runs`` (the corrupted
    input and runs, cached) and ``scorers`` (exact, estimated, or estimated then verified, one interface, picked
    by ``config.method``). Their public attributes that users read are forwarded here."""

    bundle = _forward("clean_pass", "bundle")
    model = _forward("clean_pass", "model")
    device = _forward("clean_pass", "device")
    image = _forward("clean_pass", "image")
    image_key = _forward("clean_pass", "image_key")
    question = _forward("clean_pass", "question")
    question_ids = _forward("clean_pass", "question_ids")
    task = _forward("clean_pass", "task")
    head = _forward("clean_pass", "head")
    blocks = _forward("clean_pass", "blocks")
    stats = _forward("clean_pass", "stats")
    clean = _forward("clean_pass", "clean")
    clean_vision = _forward("clean_pass", "clean_vision")
    model_answer = _forward("clean_pass", "model_answer")
    match_probability = _forward("clean_pass", "match_probability")
    unknown_words = _forward("clean_pass", "unknown_words")
    target = _forward("targets", "target")
    caption_words = _forward("targets", "caption_words")
    scored_text = _forward("targets", "scored_text")
    runs = _forward("corrupted_runs", "runs")
    clean_run = _forward("corrupted_runs", "clean_run")
    corrupted = _forward("corrupted_runs", "corrupted")
    corrupted_patches = _forward("corrupted_runs", "corrupted_patches")
    corrupt_positions = _forward("corrupted_runs", "corrupt_positions")

    def __init__(
        self,
        bundle: BlipBundle,
        image: ImageLike,
        text: str | None = None,
        *,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        max_batch_rows: int | None = None,
        result_cache_size: int = 256,
        corrupted_cache_size: int = 2,
        question: str | None = None,
    ) -> None:
        text = _text(text, question)
        self.clean_pass = CleanPass(bundle, image, text, memory_budget=memory_budget, max_batch_rows=max_batch_rows)
        self.targets = Targets(self.clean_pass)
        self.corrupted_runs = CorruptedRuns(self.clean_pass, self.targets, corrupted_cache_size)
        self.estimator = Estimator(self.corrupted_runs)
        exact = ExactScorer(self.corrupted_runs)
        self.scorers: dict[str, Scorer] = {"exact": exact, "estimate": self.estimator,
                                           "verified": VerifiedScorer(exact, self.estimator, self.unreliable)}
        self._results: LRU[TraceResult] = LRU(result_cache_size)

    def held_bytes(self) -> int:
        """Bytes of the tensors this object keeps: its clean pass, cached runs and estimates' gradients."""
        return tensor_bytes(*self.clean_pass.held(), *self.corrupted_runs.held(), *self.estimator.held())

    @property
    def session(self) -> CleanPass:
        """The old name of :attr:`clean_pass` (a DeprecationWarning names the new one; goes in the next release)."""
        import warnings

        warnings.warn("Tracer.session is now Tracer.clean_pass", DeprecationWarning, stacklevel=2)
        return self.clean_pass

    def clear(self) -> None:
        """Forget finished results and kept gradient passes (the clean pass and corrupted runs stay)."""
        self._results.clear()
        self.estimator.clear()

    # ----- scoring -----------------------------------------------------------------------
    def baselines(self, config: TraceConfig) -> tuple[float, float]:
        """(low, high): the corrupted run with nothing restored (the seed's first draw), and the clean run.

        For an estimate the low score comes from the estimate's own pass over the same corrupted draw
        (the same arithmetic), so that no separate corrupted pass is made."""
        low, high = self.baseline_draws(config)
        return float(low.mean()), float(high[0])

    @torch.no_grad()
    def baseline_draws(self, config: TraceConfig, corrupted: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """The corrupted score of each noise sample of the seed's first draw (or of ``corrupted``, a draw of
        :meth:`~.corrupted.CorruptedRuns.draw`), and the clean score ([1])."""
        target = self.target(config)
        last = self.blocks.vision if target.readout == "itc" else self.blocks.last

        def score(run: Any) -> torch.Tensor:
            return score_rows(last.logits(self.clean_pass.context, run.output[:, None], target)[:, 0], target, config.metric)

        high = score(self.clean_run(last, target))
        if config.method == "estimate" and directions.of(config.direction).restores and corrupted is None:
            low = self.estimator.gradients(self.blocks[config.block], config, target).scores
        else:
            low = score(self.runs(last, config, target, corrupted)[1])
        return low.double().cpu().numpy().reshape(-1), high.double().cpu().numpy().reshape(-1)

    def restore(self, cells: Sequence[Cell], config: TraceConfig, progress: Progress | None = None,
                ) -> tuple[np.ndarray, np.ndarray]:
        """Mean score and its standard error over noise samples, per cell of ``config.kind`` restored.

        With ``fresh_noise`` each cell gets its own draw, in order after the low score's draw (the paper's).
        """
        scores = self.restore_marked(cells, config, progress)
        return scores.mean, scores.stderr

    def restore_marked(self, cells: Sequence[Cell], config: TraceConfig, progress: Progress | None = None) -> Scores:
        """:meth:`restore`, and which cells are exact (patched runs) rather than estimated."""
        done = 0

        def advance(count: int) -> None:
            nonlocal done
            done += count
            if progress is not None:
                progress(done, len(cells))

        self.stats["engine_calls"] += 1
        scorer = self.scorers[config.method]
        return scorer.score(self.blocks[config.block], cells, config, self.target(config), advance)

    def unreliable(self, config: TraceConfig) -> np.ndarray:
        """Per cell of the last order=2 estimate: whether its second-order term (averaged over the noise samples)
        exceeds RELIABILITY_TOLERANCE of the total effect, or of the metric's floor when that is larger."""
        return self.estimator.flagged(config, *self.baselines(config))

    # ----- results -----------------------------------------------------------------------
    def trace(self, config: TraceConfig | None = None, *, progress: Progress | None = None, **overrides: Any) -> TraceResult:
        """The heatmap for ``config`` (or :class:`TraceConfig` fields as keywords); cached per config."""
        from .procedures import resolve_config

        config = replace(config, **overrides) if config is not None else resolve_config(self.bundle, **overrides)
        config = stages.completed(config, self.bundle)
        key = cache_key(config, "result")
        cached = self._results.get(key)
        if cached is not None:
            self.stats["cache_hits"] += 1
            return cached
        plan = self.plan(config)
        scores = self.restore_marked(plan.layout.cells, plan.config, progress)
        low, high = self.baseline_draws(plan.config)
        return self._results.put(key, self.assemble(plan, scores, low, high))

    def plan(self, config: TraceConfig) -> Plan:
        """What a trace of ``config`` runs: its block, target and cells (a deterministic corruption: one draw)."""
        config = stages.completed(config, self.bundle)
        asked = int(config.samples)
        if getattr(config.corruption, "deterministic", False) and asked > 1:  # every sample the same: run one
            config = replace(config, samples=1)
        block = self.blocks[config.block]
        if config.window > len(block.stack):
            raise BlipTraceError(f"window {config.window} is wider than the {len(block.stack)} layers of the "
                                 f"{BLOCK_LABELS.get(config.block, config.block)}: use at most {len(block.stack)}")
        if block.image_side:
            self.clean_vision  # recorded before the clean pass, which then reuses it  # noqa: B018
        target = self.target(config)
        layout = block.layout(self.clean_pass.context, config, target)
        extra = dict(layout.extra)
        if stages.of(config.corrupt).text and not is_head_kind(config.kind):  # a head map's rows are heads
            extra["corrupted_positions"] = self.corrupt_positions(config)
        if getattr(config.corruption, "deterministic", False):
            extra.update(deterministic=True, samples_asked=asked)
        return Plan(config, block, target, layout, extra)

    def assemble(self, plan: Plan, scores: Scores, low_draws: np.ndarray, high_draws: np.ndarray,
                 **extra: Any) -> TraceResult:
        """The result of ``plan`` from its cells' scores and each sample's corrupted and clean scores."""
        config, layout, target = plan.config, plan.layout, plan.target
        mean, stderr, exact, draws = scores
        shape = (len(layout.labels), len(plan.block.stack))
        extra = {**plan.extra, **extra}
        if config.method == "verified":  # which cells are exact: [row, layer] pairs
            extra["exact_cells"] = [[int(i) // shape[1], int(i) % shape[1]] for i in np.flatnonzero(exact)]
        low, high = float(low_draws.mean()), float(high_draws[0])
        effects = _paired_effects(config, draws, low_draws, high, shape)
        if effects is None and low_draws.size > 1 and not extra.get("deterministic"):  # unpaired: the low's error too
            extra["low_stderr"] = float(low_draws.std(ddof=1) / np.sqrt(low_draws.size))
        if config.flags_cells:  # flagged cells that were not made exact
            flagged = self.estimator.flagged(config, low, high) & ~exact
            extra["unreliable_cells"] = [[int(i) // shape[1], int(i) % shape[1]] for i in np.flatnonzero(flagged)]
        _check_finite(config, low, high, mean)
        result = TraceResult(
            scores=mean.reshape(shape), low_score=low, high_score=high,
            answer=self.scored_text(target), tokens=layout.labels, block=config.block,
            kind=config.kind, window=int(config.window), stderr=stderr.reshape(shape), draws=effects,
            config={**config.to_json(), "question": self.question, "model": self.bundle.name,
                    "head": self.head, "model_answer": self.model_answer,
                    **self.task.config_fields(config, self.targets),
                    "answer_ids": [int(i) for i in target.tokens], **_contrast_text(self, config, target),
                    "dtype": str(self.bundle.dtype).replace("torch.", ""), **extra},
        )
        result.image = self.image  # for plot_on_image; not serialised
        return result


class Plan(NamedTuple):
    """What one trace runs: its config (one sample for a deterministic corruption), block, target, cells and the
    result's extra fields."""

    config: TraceConfig
    block: Any
    target: Target
    layout: Any
    extra: dict[str, Any]


def _paired_effects(config: TraceConfig, draws: np.ndarray | None, low: np.ndarray, high: float,
                    shape: tuple[int, int]) -> np.ndarray | None:
    """Each noise sample's effect per cell [samples, rows, layers], paired with the same sample's baseline: the
    cell's score minus that sample's corrupted score (restoring), or the clean score minus the cell's (noising).
    None where the cells do not share one draw (fresh noise per cell)."""
    if draws is None:
        return None
    effects = directions.of(config.direction).paired(draws, low=low, high=high)
    return None if effects is None else effects.reshape(draws.shape[0], *shape)


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

    from ..corruptions.kinds import describe

    if not np.isfinite(high):
        raise BlipTraceError(f"the clean run's {config.metric} is not finite ({high}); the model's outputs overflow: "
                             "use metric='logprob' or a float32 model")
    if not (np.isfinite(low) and np.isfinite(mean).all()):
        said = describe(config.corruption) if config.corruption is not None else {}
        level = {k: v for k, v in said.items() if k not in ("repr", "region")}
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


def _text(text: str | None, question: str | None) -> str:
    """The model's text input, passed as ``text`` (or under its old keyword, ``question``)."""
    text = renamed(text, question, "question", "text", stacklevel=4)
    if text is None:
        raise BlipTraceError("the text must be a string: a VQA question, a captioner's prompt (\"\" for none) or "
                             "a matcher's text")
    return text


@overload
def trace(bundle: BlipBundle, image: ImageLike, text: str | None = None, *, word: Literal["all"],
          procedure: str = "rome", progress: Progress | None = None, max_batch_rows: int | None = None,
          memory_budget: int = DEFAULT_MEMORY_BUDGET, question: str | None = None, **fields: Any) -> CaptionTrace: ...


@overload
def trace(bundle: BlipBundle, image: ImageLike, text: str | None = None, *, procedure: str = "rome",
          progress: Progress | None = None, max_batch_rows: int | None = None,
          memory_budget: int = DEFAULT_MEMORY_BUDGET, question: str | None = None, **fields: Any) -> TraceResult: ...


def trace(
    bundle: BlipBundle,
    image: ImageLike,
    text: str | None = None,
    *,
    procedure: str = "rome",
    progress: Progress | None = None,
    max_batch_rows: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    question: str | None = None,
    **fields: Any,
) -> TraceResult | CaptionTrace:
    """Causal trace of one image and text: a VQA model's question, a captioner's prompt ("" for none), or the
    text an image-text matcher matches (``question=`` is the old name of ``text``). The default block is the
    head's reader (question encoder, caption decoder or ITM encoder). For a captioner ``answer`` is the caption
    to score (teacher-forced; the model's own greedy caption by default) and ``word=k`` scores its word k (by
    default its first content word); ``word="all"`` traces every word and returns a
    :class:`~.captioning.CaptionTrace`.

    ``procedure`` ("rome", "paper" or "paper_attention", see :mod:`~.procedures`) gives the
    defaults; any :class:`TraceConfig` field passed as a keyword (``block``, ``kind``,
    ``window``, ``corruption``, ``samples``, ``seed``, ``answer``, ``metric``, ``contrast``,
    ``sever``, ``sever_at``, ``corrupt``, ``corrupt_tokens``, ``regions``, ``fresh_noise``,
    ``method``, ``steps``, ``word``) overrides them. ``samples="auto"`` (or an :class:`~.sharpen.AutoSampling`)
    draws noise in rounds until the significant cells and the top cell hold still (:mod:`~.sharpen`).
    ``method="estimate"`` gives an attribution-patching
    estimate of every cell from one forward and one backward pass (see :mod:`~.estimates`). A trace that
    :func:`~.cost.trace_cost` prices over :data:`~.cost.WARN_SECONDS` here is said first, with a
    :class:`~.cost.LongTraceWarning` naming its time and what makes it cheaper.
    """
    from .procedures import resolve_config

    if not isinstance(bundle, BlipBundle):
        raise BlipTraceError("pass the bundle returned by load_model(...), not a bare model")
    every_word = fields.get("word") == "all"
    auto = _auto(fields)
    if auto is not None and every_word:
        raise BlipTraceError('samples="auto" sharpens one map: trace one caption word (word=k), not word="all"')
    config = resolve_config(bundle, procedure, **{**fields, "word": None if every_word else fields.get("word")})
    tracer = Tracer(bundle, image, _text(text, question), max_batch_rows=max_batch_rows, memory_budget=memory_budget)
    from .cost import warn_if_long

    if every_word:
        tracer.task.check_every_word()
        warn_if_long(tracer, [replace(config, word=k) for k in range(len(tracer.caption_words(config.answer)))])
        return trace_words(tracer, config)
    if auto is not None:  # priced at its first round; its budget is said in the result
        warn_if_long(tracer, [replace(config, samples=auto.round_samples)])
        return sharpen(tracer, config, auto, progress=progress)
    warn_if_long(tracer, [config])  # a long trace is said before it starts, with what makes it cheaper
    return tracer.trace(config, progress=progress)


def _auto(fields: dict[str, Any]) -> AutoSampling | None:
    """``samples="auto"`` (or an :class:`~.sharpen.AutoSampling`): the plan, with ``samples`` set to its budget."""
    samples = fields.get("samples")
    if not isinstance(samples, (str, AutoSampling)):
        return None
    if isinstance(samples, str) and samples != "auto":
        raise BlipTraceError(f'samples must be a whole number or "auto", got {samples!r}')
    plan = AutoSampling() if isinstance(samples, str) else samples
    fields["samples"] = plan.max_samples  # priced and checked at the budget
    return plan


def trace_caption(bundle: BlipBundle, image: ImageLike, prompt: str = "", caption: str | None = None, *,
                  procedure: str = "rome", **fields: Any) -> CaptionTrace:
    """Trace every word of a caption: the model's own greedy caption after ``prompt``, or ``caption`` (scored
    teacher-forced); the same as ``trace(bundle, image, prompt, answer=caption, word="all", ...)``. ``fields``
    are :class:`~.config.TraceConfig` fields (``block``, ``kind``, ``window``, ``corruption``, ``samples``, ...),
    the same for every word, with the same defaults as :func:`trace`."""
    if not isinstance(bundle, BlipBundle) or not heads.of(bundle).scores_words:
        raise BlipTraceError("trace_caption needs a captioning model: load_model('demo-caption') or "
                             "load_model('Salesforce/blip-image-captioning-base')")
    if {"word", "target", "answer"} & set(fields):
        raise BlipTraceError("trace_caption traces every word: pass the caption as caption='...', and no word")
    return trace(bundle, image, prompt, procedure=procedure, answer=caption, word="all", **fields)
