"""Causal tracing of BLIP VQA: corrupt the input, restore one state at a time, score the answer.

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

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from . import anatomy
from .blocks import Block, Blocks, Corrupted, build_blocks
from .cache import LRU
from .corruption import GaussianNoise, ImageSwap, describe
from .engine import (
    DEFAULT_MEMORY_BUDGET,
    Cell,
    Progress,
    Run,
    _ChunkEdits,
    chunks,
    record_run,
    shared_cross,
    staircase,
    start_layer,
)
from .errors import BlipTraceError
from .inputs import ImageLike, check_question, encode_answer, encode_question, image_digest, to_rgb_image
from .loading import BlipBundle
from .names import (
    ANSWER_DECODER,
    DEFAULT_SAMPLES,
    MAX_ANSWER_TOKENS,
    METRICS,
    QUESTION_ENCODER,
    ROME_NOISE_SCALE,
    SEVER_AT,
    STAGES,
    VISION_ENCODER,
    Metric,
    SeverAt,
    Stage,
)
from .results import TraceResult
from .roles import last_content_word

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


def _affects(part: str, **kw: Any) -> Any:
    return field(metadata={"affects": part}, **kw)


@dataclass(frozen=True)
class TraceConfig:
    """Everything that defines one heatmap besides the (image, question); hashable, so a cache key."""

    block: str = _affects(RESTORE, default=QUESTION_ENCODER)
    kind: str = _affects(RESTORE, default="hidden")
    window: int = _affects(RESTORE, default=1)
    corruption: Callable[..., torch.Tensor] = _affects(INPUT, default_factory=lambda: GaussianNoise(scale=ROME_NOISE_SCALE))
    samples: int = _affects(INPUT, default=DEFAULT_SAMPLES)  # noise draws averaged per cell
    seed: int = _affects(INPUT, default=0)
    answer: str | None = _affects(ANSWER, default=None)
    metric: Metric = _affects(RESTORE, default="prob")
    contrast: str | None = _affects(RESTORE, default=None)
    sever: str | None = _affects(RESTORE, default=None)
    sever_at: SeverAt = _affects(RESTORE, default="restored")  # ROME's: only at the restored positions
    corrupt: Stage | None = _affects(INPUT, default=None)  # None: the corruption's own stage, else patches (vision) or image
    corrupt_tokens: tuple[int, ...] | str | None = _affects(INPUT, default=None)  # corrupt="question": positions or "object"
    regions: int | None = _affects(RESTORE, default=None)  # vision block: regions per side restored as units
    fresh_noise: bool = _affects(INPUT, default=False)  # the paper's: a new draw for every cell and for the low score

    def __post_init__(self) -> None:
        anatomy.check_block(self.block)
        anatomy.check_kind(self.kind, self.block)
        self._check_corruption_stage()
        _check_int("window", self.window, 1)
        _check_int("samples", self.samples, 1, MAX_SAMPLES)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        if not callable(self.corruption):
            raise BlipTraceError(
                "corruption must be GaussianNoise, MultiplicativeNoise, UniformNoise, Scale, ImageSwap, Blur, Grey "
                "or a callable (clean, samples, generator) -> corrupted")
        if self.metric not in METRICS:
            raise BlipTraceError(f"unknown metric {self.metric!r}: use one of {', '.join(METRICS)}")
        if self.metric == "logit_diff" and not self.contrast:
            raise BlipTraceError("metric='logit_diff' needs contrast='...', the answer to compare against")
        for name in ("answer", "contrast"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise BlipTraceError(f"{name} must be a string or None, got {type(value).__name__} {value!r}")
        self._check_sever()
        if self.regions is not None:
            if self.block != VISION_ENCODER:
                raise BlipTraceError("regions group image patches: use them with block='vision_encoder'")
            _check_int("regions", self.regions, 1)
        if not isinstance(self.fresh_noise, bool):
            raise BlipTraceError(f"fresh_noise must be True or False, got {self.fresh_noise!r}")

    def _check_sever(self) -> None:
        if self.sever_at not in SEVER_AT:
            raise BlipTraceError(f"unknown sever_at {self.sever_at!r}: use one of {', '.join(SEVER_AT)}")
        if self.sever is None:
            return
        if self.sever not in anatomy.SEVERABLE:
            raise BlipTraceError(f"unknown sever {self.sever!r}: use one of {', '.join(anatomy.SEVERABLE)}")
        if self.kind != "hidden":
            raise BlipTraceError("sever holds a sublayer while hidden states are restored: use it with kind='hidden'")
        anatomy.check_kind(self.sever, self.block)

    def _check_corruption_stage(self) -> None:
        own = getattr(self.corruption, "stage", None)
        stage = self.corrupt or own or ("patches" if self.block == VISION_ENCODER else "image")
        if stage not in STAGES:
            raise BlipTraceError(f"unknown corrupt {stage!r}: use one of {', '.join(STAGES)}")
        if own is not None and own != stage:
            raise BlipTraceError(f"{type(self.corruption).__name__} works on {own}: use corrupt={own!r}")
        if isinstance(self.corruption, ImageSwap) and stage != "image":
            raise BlipTraceError("ImageSwap replaces the image embeddings: use it with corrupt='image'")
        if self.block == VISION_ENCODER and stage not in ("patches", "pixels"):
            raise BlipTraceError(
                f"restoring vision-encoder states undoes nothing when the corruption is on the {stage}: "
                "corrupt the patches (corrupt='patches') or pixels (corrupt='pixels') before the vision encoder")
        if getattr(self.corruption, "region", None) is not None and stage not in ("patches", "pixels"):
            raise BlipTraceError(
                f"a region picks image patches or pixels, but this corruption acts on the {stage}: use "
                "corrupt='patches' or corrupt='pixels', or corrupt_tokens=... to pick question tokens")
        object.__setattr__(self, "corrupt_tokens", _check_tokens(self.corrupt_tokens, stage))
        object.__setattr__(self, "corrupt", stage)

    def to_json(self) -> dict[str, Any]:
        return {
            "block": self.block, "kind": self.kind, "window": int(self.window), "corruption": describe(self.corruption),
            "samples": int(self.samples), "seed": int(self.seed), "answer": self.answer, "metric": self.metric,
            "contrast": self.contrast, "sever": self.sever, "sever_at": self.sever_at, "corrupt": self.corrupt,
            "corrupt_tokens": list(self.corrupt_tokens) if isinstance(self.corrupt_tokens, tuple) else self.corrupt_tokens,
            "regions": self.regions, "fresh_noise": self.fresh_noise,
        }


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise BlipTraceError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise BlipTraceError(f"{name} must be {bound}, got {value}")


def _check_tokens(tokens: Any, stage: str) -> tuple[int, ...] | str | None:
    if tokens is None:
        return None
    if stage != "question":
        raise BlipTraceError("corrupt_tokens chooses question tokens: use it with corrupt='question'")
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


def cache_key(config: TraceConfig, part: str) -> tuple[Any, ...]:
    """The key of ``config`` in the cache of ``part`` ("corrupted", "decoder" or "result"): every field
    whose declared effect reaches that part, by name. No cache key is written by hand."""
    wanted = CACHE_PARTS[part]
    return tuple((f.name, getattr(config, f.name)) for f in fields(config) if f.metadata["affects"] in wanted)


@dataclass
class _Clean:
    image_embeds: torch.Tensor  # [1, N, D]
    question: Run
    greedy_ids: list[int]


def _score_rows(logits: torch.Tensor, targets: list[int], metric: str, contrast: int | None) -> torch.Tensor:
    """Score each row of decoder logits [R, Td, V]; the Td-th position predicts targets[Td].

    A multi-token answer's probability is the product of its tokens' probabilities, summed in
    log space so that a long answer does not underflow before the exponential.
    """
    logits = logits.float()
    if metric == "logit_diff":
        return logits[:, 0, targets[0]] - logits[:, 0, contrast]
    logprobs = torch.log_softmax(logits, dim=-1)
    index = torch.tensor(targets, device=logits.device)
    total = logprobs[:, torch.arange(len(targets), device=logits.device), index].sum(-1)
    return total if metric == "logprob" else total.exp()


class Tracer:
    """Causal traces of one (image, question), sharing the clean pass and corrupted runs between them."""

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
        if not isinstance(bundle, BlipBundle):
            raise BlipTraceError("pass the bundle returned by load_model(...), not a bare model")
        anatomy.check_blip(bundle.model)
        self.bundle = bundle
        self.model = bundle.model
        self.image = to_rgb_image(image)
        self.image_key = image_digest(self.image)
        self.question = check_question(question)
        self.question_ids = encode_question(bundle.tokenizer, self.question,
                                            int(anatomy.text_config(self.model).max_position_embeddings))
        self.blocks: Blocks = build_blocks(self.model)
        self.memory_budget = memory_budget
        self.max_batch_rows = max_batch_rows
        self.stats: Counter[str] = Counter()
        self._pixels: torch.Tensor | None = None
        self._clean: _Clean | None = None
        self._clean_vision: Run | None = None
        self._clean_decoder: LRU[Run] = LRU(8)
        self._corrupted: LRU[Corrupted] = LRU(corrupted_cache_size)
        self._corrupted_decoder: LRU[tuple[Run, Any]] = LRU(corrupted_cache_size)
        self._results: LRU[TraceResult] = LRU(result_cache_size)

    # ----- inputs ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.bundle.device

    @property
    def unknown_words(self) -> list[str]:
        """Words of the question that the model's vocabulary lacks (it reads them as [UNK])."""
        tokenizer = self.bundle.tokenizer
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is None or unk not in self.question_ids:
            return []
        words = tokenizer.basic_tokenizer.tokenize(self.question) if hasattr(tokenizer, "basic_tokenizer") \
            else self.question.split()
        return [w for w in words if unk in tokenizer(w, add_special_tokens=False)["input_ids"]]

    def ids(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor([list(ids)], device=self.device)

    def pixel_values(self, image: ImageLike) -> torch.Tensor:
        """The processor's pixels for ``image``: [1, 3, H, W] on the model's device and dtype."""
        pixels = self.bundle.processor.image_processor(to_rgb_image(image), return_tensors="pt")["pixel_values"]
        return pixels.to(device=self.device, dtype=self.bundle.dtype)

    @property
    def pixels(self) -> torch.Tensor:
        if self._pixels is None:
            self._pixels = self.pixel_values(self.image)
        return self._pixels

    @property
    def vision(self) -> Any:
        return self.blocks.vision.stack

    @torch.no_grad()
    def embed_image(self, image: ImageLike) -> torch.Tensor:
        """The vision encoder's output for ``image``: [1, N, D] (the one path every image takes)."""
        pixels = self.pixels if image is self.image else self.pixel_values(image)
        self.stats["vision_passes"] += 1
        return self.vision.run(pixels)

    def decoder_ids(self, answer_ids: Sequence[int]) -> list[int]:
        """Decoder inputs: [DEC] then every answer token but the last (teacher forcing)."""
        return [int(anatomy.text_config(self.model).bos_token_id), *answer_ids[:-1]]

    # ----- the clean pass ----------------------------------------------------------------
    @property
    def clean(self) -> _Clean:
        """The clean pass: image embeddings, question-encoder states and the greedy answer (once)."""
        if self._clean is None:
            with torch.no_grad():
                # an image-side trace records the clean vision run first; its output is bitwise the
                # same as an unrecorded pass (the same arithmetic), so it is reused rather than recomputed
                embeds = (self.vision.post_norm(self._clean_vision.output) if self._clean_vision is not None
                          else self.embed_image(self.image))
                qstack = self.blocks.question.stack
                run = record_run(qstack, qstack.embed(self.ids(self.question_ids)), shared_cross(qstack, embeds))
                self._clean = _Clean(embeds, run, self._greedy(run.output))
            self.stats["clean_passes"] += 1
        return self._clean

    @property
    def clean_vision(self) -> Run:
        """The clean vision-encoder run, layer by layer (recorded for image-side traces only)."""
        if self._clean_vision is None:
            with torch.no_grad():
                self.stats["vision_passes"] += 1
                self._clean_vision = record_run(self.vision, self.vision.embed(self.pixels), [None] * len(self.vision))
        return self._clean_vision

    def _greedy(self, question_states: torch.Tensor) -> list[int]:
        config = anatomy.text_config(self.model)
        decoder = self.blocks.decoder
        ids = [int(config.bos_token_id)]
        cross = shared_cross(decoder.stack, question_states)
        for _ in range(MAX_ANSWER_TOKENS):
            run = record_run(decoder.stack, decoder.stack.embed(self.ids(ids)), cross)
            token = int(decoder.head(run.output[:, -1]).argmax(-1)[0])
            if token in (config.sep_token_id, config.pad_token_id):
                break
            ids.append(token)
        return ids[1:]

    @property
    def model_answer(self) -> str:
        """The model's own greedy answer to the question, in full."""
        return self.bundle.tokenizer.decode(self.clean.greedy_ids, skip_special_tokens=True).strip()

    def answer_ids(self, answer: str | None) -> tuple[int, ...]:
        """Tokens scored: the clean greedy first token, or the given answer's tokens."""
        if answer is None:
            if not self.clean.greedy_ids:
                raise BlipTraceError("the model gives an empty answer to this question; pass answer='...' to score one")
            return (self.clean.greedy_ids[0],)
        ids = tuple(encode_answer(self.bundle.tokenizer, answer))
        limit = int(anatomy.text_config(self.model).max_position_embeddings)
        if len(ids) >= limit:
            raise BlipTraceError(f"the answer is {len(ids)} tokens long; the decoder reads at most {limit - 1}: shorten it")
        return ids

    def _targets(self, config: TraceConfig) -> tuple[tuple[int, ...], int | None]:
        answer_ids = self.answer_ids(config.answer)
        contrast = None
        if config.metric == "logit_diff":
            contrast = encode_answer(self.bundle.tokenizer, config.contrast or "")[0]
            if contrast == answer_ids[0]:
                raise BlipTraceError("the contrast answer starts with the same token as the answer; pick another contrast")
        return answer_ids, contrast

    # ----- corrupted runs ----------------------------------------------------------------
    def corrupt_positions(self, config: TraceConfig) -> list[int]:
        """Question positions a corrupt='question' trace corrupts."""
        count = len(self.question_ids)
        if config.corrupt_tokens is None:
            return list(range(count))
        if isinstance(config.corrupt_tokens, str):  # "object"
            tokens = self.bundle.tokenizer.convert_ids_to_tokens(self.question_ids)
            positions = last_content_word(tokens)
            if not positions:
                raise BlipTraceError("the question has no content word to corrupt; pass corrupt_tokens=(positions...)")
            return positions
        for position in config.corrupt_tokens:
            if not 0 <= position < count:
                raise BlipTraceError(f"corrupt_tokens position {position} is outside the question's {count} tokens")
        return list(config.corrupt_tokens)

    def _apply(self, config: TraceConfig, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        corruption = config.corruption
        if isinstance(corruption, ImageSwap) and corruption.embeddings is None:
            corruption = corruption.bind(self.embed_image)
        samples = int(config.samples)
        out = corruption(clean, samples, generator)
        if not isinstance(out, torch.Tensor) or out.shape != (samples, *clean.shape[1:]):
            raise BlipTraceError(f"the corruption must return a tensor of shape {(samples, *clean.shape[1:])}, "
                                 f"got {getattr(out, 'shape', type(out).__name__)}")
        if not bool(torch.isfinite(out).all()):
            raise BlipTraceError("the corruption returned NaN or infinite values: lower its level, or fix the callable")
        return out.to(device=self.device, dtype=self.bundle.dtype)

    @torch.no_grad()
    def _corrupt(self, config: TraceConfig, generator: torch.Generator) -> Corrupted:
        """The corrupted runs for one draw of ``config.samples`` from ``generator``."""
        samples = int(config.samples)
        qstack, vstack = self.blocks.question.stack, self.vision
        h0 = qstack.embed(self.ids(self.question_ids))
        vision = None
        if config.corrupt == "question":
            embeds = self.clean.image_embeds
            positions = self.corrupt_positions(config)
            noisy = self._apply(config, h0, generator)
            h0 = h0.expand(samples, -1, -1).clone()
            h0[:, positions] = noisy[:, positions]
        elif config.corrupt == "image":
            embeds = self._apply(config, self.clean.image_embeds, generator)
            h0 = h0.expand(samples, -1, -1)
        else:
            start = self.pixels if config.corrupt == "pixels" else vstack.embed(self.pixels)
            corrupted_input = self._apply(config, start, generator)
            patches = vstack.embed(corrupted_input) if config.corrupt == "pixels" else corrupted_input
            self.stats["vision_passes"] += 1
            vision = record_run(vstack, patches, [None] * len(vstack))
            embeds = vstack.post_norm(vision.output)
            h0 = h0.expand(samples, -1, -1)
        cross = shared_cross(qstack, embeds)
        self.stats["corrupted_passes"] += 1
        return Corrupted(embeds, cross, record_run(qstack, h0, cross), vision)

    def corrupted(self, config: TraceConfig) -> Corrupted:
        """The corrupted runs for ``config``'s corruption, samples and seed (cached): the first draw of the seed."""
        return self._corrupted.get_or_make(cache_key(config, "corrupted"),
                                           lambda: self._corrupt(config, torch.Generator().manual_seed(int(config.seed))))

    def _decoder_run(self, config: TraceConfig, answer_ids: tuple[int, ...]) -> tuple[Run, Any]:
        decoder = self.blocks.decoder
        return self._corrupted_decoder.get_or_make(
            (cache_key(config, "decoder"), answer_ids),
            lambda: decoder.corrupted_run(self, self.corrupted(config), answer_ids))

    def _runs(self, block: Any, config: TraceConfig, answer_ids: tuple[int, ...],
              corrupted: Corrupted | None) -> tuple[Run, Run, Any]:
        """Clean run, corrupted run and cross states of ``block``; ``corrupted=None`` means the cached first draw."""
        with torch.no_grad():
            if block.name == ANSWER_DECODER:
                clean = self._clean_decoder.get_or_make(answer_ids, lambda: block.clean_run(self, answer_ids))
                run, cross = self._decoder_run(config, answer_ids) if corrupted is None else block.corrupted_run(
                    self, corrupted, answer_ids)
            else:
                clean = block.clean_run(self, answer_ids)
                run, cross = block.corrupted_run(self, corrupted or self.corrupted(config), answer_ids)
        return clean, run, cross

    # ----- scoring -----------------------------------------------------------------------
    @torch.no_grad()
    def baselines(self, config: TraceConfig) -> tuple[float, float]:
        """(low, high): the corrupted run with nothing restored (the seed's first draw), and the clean run."""
        answer_ids, contrast = self._targets(config)
        decoder = self.blocks.decoder
        clean, low_run, _ = self._runs(decoder, config, answer_ids, None)
        high = _score_rows(decoder.head(clean.output), list(answer_ids), config.metric, contrast)
        low = _score_rows(decoder.head(low_run.output), list(answer_ids), config.metric, contrast)
        return float(low.mean()), float(high[0])

    def _check_cells(self, block: Block, cells: Sequence[Cell], positions: int) -> None:
        layers = len(block.stack)
        for cell in cells:
            for layer, pos in cell:
                if not (0 <= layer < layers and 0 <= pos < positions):
                    raise BlipTraceError(
                        f"cell entry (layer={layer}, position={pos}) is outside {layers} layers x {positions} positions")

    @torch.no_grad()
    def _score(self, block: Block, cells: Sequence[Cell], config: TraceConfig, answer_ids: tuple[int, ...],
               contrast: int | None, corrupted: Corrupted | None, progress: Callable[[int], None] | None = None,
               ) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard error over noise samples of each cell's score, against one corrupted draw."""
        clean_run, corrupted_run, cross = self._runs(block, config, answer_ids, corrupted)
        self._check_cells(block, cells, int(clean_run.inputs[0].shape[1]))
        clean_states = [x[0] for x in clean_run.kinds[config.kind]]
        severed = corrupted_run.kinds[config.sever] if config.sever else None
        n_layers, samples = len(block.stack), int(config.samples)
        order = sorted(range(len(cells)), key=lambda i: start_layer(cells[i], config.kind, n_layers))
        mean, stderr = np.empty(len(cells)), np.empty(len(cells))
        rows = block.rows_per_chunk(self, config, answer_ids)
        for chunk in chunks(order, max(1, rows // samples)):
            chunk_cells = [cells[i] for i in chunk]
            edits = _ChunkEdits.build(config.kind, clean_states, chunk_cells, self.device, sever=config.sever,
                                      severed=severed, sever_at=config.sever_at)
            logits = block.logits(self, staircase(block.stack, corrupted_run, cross, chunk_cells, edits), answer_ids)
            s, c = logits.shape[:2]
            scores = _score_rows(logits.reshape(s * c, *logits.shape[2:]), list(answer_ids), config.metric,
                                 contrast).view(s, c).double()
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
        block = self.blocks[config.block]
        answer_ids, contrast = self._targets(config)
        done = 0

        def advance(count: int) -> None:
            nonlocal done
            done += count
            if progress is not None:
                progress(done, len(cells))

        self.stats["engine_calls"] += 1
        if not config.fresh_noise:
            return self._score(block, cells, config, answer_ids, contrast, None, advance)
        generator = torch.Generator().manual_seed(int(config.seed))
        self._corrupt_draw(config, generator)
        mean, stderr = np.empty(len(cells)), np.empty(len(cells))
        for i, cell in enumerate(cells):
            corrupted = self._corrupt(config, generator)
            m, e = self._score(block, [cell], config, answer_ids, contrast, corrupted, advance)
            mean[i], stderr[i] = m[0], e[0]
        return mean, stderr

    def _corrupt_draw(self, config: TraceConfig, generator: torch.Generator) -> None:
        """Advance ``generator`` past the low score's draw without running the model."""
        start = {"question": lambda: self.blocks.question.stack.embed(self.ids(self.question_ids)),
                 "image": lambda: self.clean.image_embeds, "pixels": lambda: self.pixels,
                 "patches": lambda: self.vision.embed(self.pixels)}[str(config.corrupt)]
        with torch.no_grad():
            self._apply(config, start(), generator)

    # ----- results -----------------------------------------------------------------------
    def trace(self, config: TraceConfig | None = None, *, progress: Progress | None = None, **overrides: Any) -> TraceResult:
        """The heatmap for ``config`` (or :class:`TraceConfig` fields as keywords); cached per config."""
        config = replace(config, **overrides) if config is not None else TraceConfig(**overrides)
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
        answer_ids, _ = self._targets(config)
        layout = block.layout(self, config, answer_ids)
        extra = dict(layout.extra)
        if config.corrupt == "question":
            extra["corrupted_positions"] = self.corrupt_positions(config)
        mean, stderr = self.restore(layout.cells, config, progress)
        shape = (len(layout.labels), len(block.stack))
        low, high = self.baselines(config)
        result = TraceResult(
            scores=mean.reshape(shape), low_score=low, high_score=high,
            answer=self.bundle.tokenizer.decode(list(answer_ids)).strip(), tokens=layout.labels, block=config.block,
            kind=config.kind, window=int(config.window), stderr=stderr.reshape(shape),
            config={**config.to_json(), "question": self.question, "model": self.bundle.name,
                    "model_answer": self.model_answer, "answer_ids": [int(i) for i in answer_ids],
                    "dtype": str(self.bundle.dtype).replace("torch.", ""), **extra},
        )
        result.image = self.image  # for plot_on_image; not serialised
        return self._results.put(key, result)


def default_config(bundle: BlipBundle, **overrides: Any) -> TraceConfig:
    """A TraceConfig whose Gaussian noise is the bundle's ``noise_scale`` on the image embeddings
    (ROME's 3σ unless the model folder says otherwise); image-side traces keep ROME's 3σ on the patches."""
    from .procedures import default_corruption

    block = overrides.get("block", QUESTION_ENCODER)
    stage = overrides.get("corrupt") or ("patches" if block == VISION_ENCODER else "image")
    overrides.setdefault("corruption", default_corruption(bundle, stage))
    return TraceConfig(**overrides)


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
    """Causal trace of one image and question.

    ``procedure`` ("rome", "paper" or "paper_attention", see :mod:`~.procedures`) gives the
    defaults; any :class:`TraceConfig` field passed as a keyword (``block``, ``kind``,
    ``window``, ``corruption``, ``samples``, ``seed``, ``answer``, ``metric``, ``contrast``,
    ``sever``, ``sever_at``, ``corrupt``, ``corrupt_tokens``, ``regions``, ``fresh_noise``)
    overrides them.
    """
    from .procedures import procedure_config

    config = procedure_config(procedure, **fields)
    tracer = Tracer(bundle, image, question, max_batch_rows=max_batch_rows, memory_budget=memory_budget)
    return tracer.trace(config, progress=progress)
