"""Causal tracing of BLIP VQA: corrupt the image embeddings, restore one state at a time.

    >>> from blip_trace_widgets import load_model, trace, demo_samples
    >>> bundle = load_model("demo")
    >>> image, question, _ = demo_samples()[0]
    >>> result = trace(bundle, image, question, kind="mlp", window=3, samples=4)
    >>> result.scores.shape == (len(result.tokens), result.num_layers)
    True

:func:`trace` is a one-shot call. :class:`Tracer` keeps the work that does not change
between traces of one (image, question): the clean pass, the corrupted runs (per
corruption, samples and seed) and finished results (per :class:`TraceConfig`), which
is what the widgets use.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from . import anatomy
from .corruption import GaussianNoise, ImageSwap, describe
from .engine import (
    DEFAULT_MEMORY_BUDGET,
    Cell,
    Progress,
    Run,
    TextStack,
    VisionStack,
    _ChunkEdits,
    chunks,
    grid_cells,
    group_cells,
    record_run,
    rows_per_chunk,
    shared_cross,
    staircase,
    start_layer,
    vision_rows_per_chunk,
)
from .regions import patch_grid_size, region_grid
from .inputs import ImageLike, check_question, encode_answer, encode_question, to_rgb_image
from .loading import BlipBundle
from .results import TraceResult

METRICS = ("prob", "logprob", "logit_diff")
#: Where a corruption is applied: the vision encoder's output (the paper's), the patch
#: embeddings before the vision encoder, the pixels, or the question's token embeddings.
CORRUPT_STAGES = ("image", "patches", "pixels", "question")
MAX_ANSWER_TOKENS = 10


@dataclass(frozen=True)
class TraceConfig:
    """Everything that defines one heatmap besides the (image, question); hashable, so a cache key."""

    block: str = "question_encoder"
    kind: str = "hidden"
    window: int = 1
    corruption: Callable[..., torch.Tensor] = field(default_factory=lambda: GaussianNoise(scale=3.0))
    samples: int = 10
    seed: int = 0
    answer: str | None = None
    metric: str = "prob"
    contrast: str | None = None
    sever: str | None = None
    corrupt: str | None = None  # None: the corruption's own stage, else "patches" for the vision block, else "image"
    corrupt_tokens: tuple[int, ...] | str | None = None  # corrupt="question": positions, "object", or None for all
    regions: int | None = None  # vision block: regions per side restored as units (None: every patch)

    def __post_init__(self) -> None:
        anatomy.check_block(self.block)
        anatomy.check_kind(self.kind, self.block)
        self._check_corruption_stage()
        if not isinstance(self.window, (int, np.integer)) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        if not isinstance(self.samples, (int, np.integer)) or self.samples < 1:
            raise ValueError(f"samples must be an integer >= 1, got {self.samples!r}")
        if not callable(self.corruption):
            raise ValueError(
                "corruption must be GaussianNoise, MultiplicativeNoise, UniformNoise, ImageSwap "
                "or a callable (clean, samples, generator) -> corrupted"
            )
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}: use one of {', '.join(METRICS)}")
        if self.metric == "logit_diff" and not self.contrast:
            raise ValueError("metric='logit_diff' needs contrast='...', the answer to compare against")
        if self.sever is not None:
            if self.sever not in anatomy.SEVERABLE:
                raise ValueError(f"unknown sever {self.sever!r}: use one of {', '.join(anatomy.SEVERABLE)}")
            if self.kind != "hidden":
                raise ValueError("sever holds a sublayer while hidden states are restored: use it with kind='hidden'")
            anatomy.check_kind(self.sever, self.block)
        if self.regions is not None:
            if self.block != anatomy.VISION_BLOCK:
                raise ValueError("regions group image patches: use them with block='vision_encoder'")
            if not isinstance(self.regions, (int, np.integer)) or self.regions < 1:
                raise ValueError(f"regions must be an integer >= 1 (regions per side), got {self.regions!r}")

    def _check_corruption_stage(self) -> None:
        own = getattr(self.corruption, "stage", None)
        stage = self.corrupt or own or ("patches" if self.block == anatomy.VISION_BLOCK else "image")
        if stage not in CORRUPT_STAGES:
            raise ValueError(f"unknown corrupt {stage!r}: use one of {', '.join(CORRUPT_STAGES)}")
        if own is not None and own != stage:
            raise ValueError(f"{type(self.corruption).__name__} works on {own}: use corrupt={own!r}")
        if isinstance(self.corruption, ImageSwap) and stage != "image":
            raise ValueError("ImageSwap replaces the image embeddings: use it with corrupt='image'")
        if self.block == anatomy.VISION_BLOCK and stage not in ("patches", "pixels"):
            raise ValueError(
                f"restoring vision-encoder states undoes nothing when the corruption is on the {stage}: "
                "corrupt the patches (corrupt='patches') or pixels (corrupt='pixels') before the vision encoder"
            )
        tokens = self.corrupt_tokens
        if tokens is not None:
            if stage != "question":
                raise ValueError("corrupt_tokens chooses question tokens: use it with corrupt='question'")
            if isinstance(tokens, str):
                if tokens != "object":
                    raise ValueError(f"corrupt_tokens must be positions or 'object', got {tokens!r}")
            else:
                tokens = tuple(int(t) for t in tokens)
                if not tokens:
                    raise ValueError("corrupt_tokens is empty: pass positions, 'object', or None for every token")
                object.__setattr__(self, "corrupt_tokens", tokens)
        object.__setattr__(self, "corrupt", stage)

    def to_json(self) -> dict[str, Any]:
        return {
            "block": self.block,
            "kind": self.kind,
            "window": int(self.window),
            "corruption": describe(self.corruption),
            "samples": int(self.samples),
            "seed": int(self.seed),
            "answer": self.answer,
            "metric": self.metric,
            "contrast": self.contrast,
            "sever": self.sever,
            "corrupt": self.corrupt,
            "corrupt_tokens": list(self.corrupt_tokens) if isinstance(self.corrupt_tokens, tuple) else self.corrupt_tokens,
            "regions": self.regions,
        }


@dataclass
class _Clean:
    image_embeds: torch.Tensor  # [1, N, D]
    question: Run
    greedy_ids: list[int]


@dataclass
class _Corrupted:
    image_embeds: torch.Tensor  # [S, N, D] ([1, N, D] when only the question is corrupted)
    image_cross: list[tuple[torch.Tensor, torch.Tensor]]
    question: Run
    vision: Run | None = None  # the corrupted vision-encoder run, for corruptions before it


def _score_rows(logits: torch.Tensor, targets: list[int], metric: str, contrast: int | None) -> torch.Tensor:
    """Score each row of decoder logits [R, Td, V]; Td-th position predicts targets[Td]."""
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
    ) -> None:
        if not isinstance(bundle, BlipBundle):
            raise ValueError("pass the bundle returned by load_model(...), not a bare model")
        anatomy.check_blip(bundle.model)
        self.bundle = bundle
        self.model = bundle.model
        self.image = to_rgb_image(image)
        self.question = check_question(question)
        config = anatomy.text_config(self.model)
        self.question_ids = encode_question(bundle.tokenizer, self.question, int(config.max_position_embeddings))
        self.stacks: dict[str, Any] = {block: TextStack(self.model, block) for block in anatomy.TEXT_BLOCKS}
        self.stacks[anatomy.VISION_BLOCK] = VisionStack(self.model)
        self._pixels: torch.Tensor | None = None
        self._clean_vision: Run | None = None
        self.memory_budget = memory_budget
        self.max_batch_rows = max_batch_rows
        self.stats: Counter[str] = Counter()
        self._clean: _Clean | None = None
        self._decoder_runs: dict[tuple[int, ...], Run] = {}
        self._corrupted: OrderedDict[Any, _Corrupted] = OrderedDict()
        self._corrupted_decoder: OrderedDict[Any, tuple[Run, list[tuple[torch.Tensor, torch.Tensor]]]] = OrderedDict()
        self._results: OrderedDict[TraceConfig, TraceResult] = OrderedDict()
        self.result_cache_size = result_cache_size
        self.corrupted_cache_size = 2

    # ----- shared work -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.bundle.device

    def _ids(self, ids: Sequence[int]) -> torch.Tensor:
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

    @torch.no_grad()
    def embed_image(self, image: ImageLike) -> torch.Tensor:
        """The vision encoder's output for ``image``: [1, N, D]."""
        pixels = self.pixels if image is self.image else self.pixel_values(image)
        self.stats["vision_passes"] += 1
        return anatomy.vision_encoder(self.model)(pixel_values=pixels)[0]

    @property
    def clean_vision(self) -> Run:
        """The clean vision-encoder run, layer by layer (for image-side traces)."""
        if self._clean_vision is None:
            vstack = self.stacks[anatomy.VISION_BLOCK]
            with torch.no_grad():
                self._clean_vision = record_run(vstack, vstack.embed(self.pixels), vstack.no_cross())
        return self._clean_vision

    @property
    def clean(self) -> _Clean:
        """The clean pass: image embeddings, question-encoder states and the greedy answer (once)."""
        if self._clean is None:
            with torch.no_grad():
                if self._clean_vision is not None:  # an image-side trace ran the vision encoder already
                    embeds = self.stacks[anatomy.VISION_BLOCK].post_norm(self._clean_vision.output)
                else:
                    embeds = self.embed_image(self.image)
                qstack = self.stacks["question_encoder"]
                run = record_run(qstack, qstack.embed(self._ids(self.question_ids)), shared_cross(qstack, embeds))
                self._clean = _Clean(embeds, run, self._greedy(run.output))
            self.stats["clean_passes"] += 1
        return self._clean

    def _head(self, states: torch.Tensor) -> torch.Tensor:
        return anatomy.answer_head(self.model)(states)

    def _greedy(self, question_states: torch.Tensor) -> list[int]:
        config = anatomy.text_config(self.model)
        dstack = self.stacks["answer_decoder"]
        cross = shared_cross(dstack, question_states)
        ids = [int(config.bos_token_id)]
        for _ in range(MAX_ANSWER_TOKENS):
            run = record_run(dstack, dstack.embed(self._ids(ids)), cross)
            token = int(self._head(run.output[:, -1]).argmax(-1)[0])
            if token == config.sep_token_id or token == config.pad_token_id:
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
            greedy = self.clean.greedy_ids
            if not greedy:
                raise ValueError("the model gives an empty answer to this question; pass answer='...' to score one")
            return (greedy[0],)
        return tuple(encode_answer(self.bundle.tokenizer, answer))

    def decoder_ids(self, answer_ids: Sequence[int]) -> list[int]:
        """Decoder inputs: [DEC] then every answer token but the last (teacher forcing)."""
        return [int(anatomy.text_config(self.model).bos_token_id), *answer_ids[:-1]]

    def _clean_decoder(self, answer_ids: tuple[int, ...]) -> Run:
        if answer_ids not in self._decoder_runs:
            with torch.no_grad():
                dstack = self.stacks["answer_decoder"]
                cross = shared_cross(dstack, self.clean.question.output)
                self._decoder_runs[answer_ids] = record_run(dstack, dstack.embed(self._ids(self.decoder_ids(answer_ids))), cross)
        return self._decoder_runs[answer_ids]

    def _bind(self, corruption: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if isinstance(corruption, ImageSwap) and corruption.embeddings is None:
            return corruption.bind(self.embed_image)
        return corruption

    def _apply(self, corruption: Callable[..., torch.Tensor], clean: torch.Tensor, samples: int,
               generator: torch.Generator) -> torch.Tensor:
        out = self._bind(corruption)(clean, samples, generator)
        if not isinstance(out, torch.Tensor) or out.shape != (samples, *clean.shape[1:]):
            raise ValueError(
                f"the corruption must return a tensor of shape {(samples, *clean.shape[1:])}, "
                f"got {getattr(out, 'shape', type(out).__name__)}"
            )
        return out.to(device=self.device, dtype=self.bundle.dtype)

    def corrupt_positions(self, config: TraceConfig) -> list[int]:
        """Question positions a corrupt='question' trace corrupts."""
        count = len(self.question_ids)
        if config.corrupt_tokens is None:
            return list(range(count))
        if config.corrupt_tokens == "object":
            from .aggregate import last_content_word

            positions = last_content_word(self.tokens("question_encoder"))
            if not positions:
                raise ValueError("the question has no content word to corrupt; pass corrupt_tokens=(positions...)")
            return positions
        for position in config.corrupt_tokens:
            if not 0 <= position < count:
                raise ValueError(f"corrupt_tokens position {position} is outside the question's {count} tokens")
        return list(config.corrupt_tokens)

    def corrupted(self, config: TraceConfig) -> _Corrupted:
        """The corrupted question-encoder run for ``config``'s corruption, samples and seed (cached)."""
        key = (config.corrupt, config.corrupt_tokens, config.corruption, config.samples, config.seed)
        if key in self._corrupted:
            self._corrupted.move_to_end(key)
            return self._corrupted[key]
        clean = self.clean
        samples = int(config.samples)
        qstack = self.stacks["question_encoder"]
        vstack = self.stacks[anatomy.VISION_BLOCK]
        with torch.no_grad():
            generator = torch.Generator().manual_seed(int(config.seed))
            h0 = qstack.embed(self._ids(self.question_ids))
            vision = None
            if config.corrupt == "question":
                embeds = clean.image_embeds
                positions = self.corrupt_positions(config)
                noisy = self._apply(config.corruption, h0, samples, generator)
                h0 = h0.expand(samples, -1, -1).clone()
                h0[:, positions] = noisy[:, positions]
            else:
                if config.corrupt == "image":
                    embeds = self._apply(config.corruption, clean.image_embeds, samples, generator)
                else:
                    start = self.pixels if config.corrupt == "pixels" else vstack.embed(self.pixels)
                    corrupted_input = self._apply(config.corruption, start, samples, generator)
                    patches = vstack.embed(corrupted_input) if config.corrupt == "pixels" else corrupted_input
                    vision = record_run(vstack, patches, vstack.no_cross())
                    embeds = vstack.post_norm(vision.output)
                h0 = h0.expand(samples, -1, -1)
            cross = shared_cross(qstack, embeds)
            entry = _Corrupted(embeds, cross, record_run(qstack, h0, cross), vision)
        self.stats["corrupted_passes"] += 1
        self._corrupted[key] = entry
        while len(self._corrupted) > self.corrupted_cache_size:
            self._corrupted.popitem(last=False)
        return entry

    def _corrupted_decoder_run(self, config: TraceConfig, answer_ids: tuple[int, ...]):
        key = (config.corruption, config.samples, config.seed, answer_ids)
        if key not in self._corrupted_decoder:
            corrupted = self.corrupted(config)
            with torch.no_grad():
                dstack = self.stacks["answer_decoder"]
                cross = shared_cross(dstack, corrupted.question.output)
                h0 = dstack.embed(self._ids(self.decoder_ids(answer_ids))).expand(config.samples, -1, -1)
                self._corrupted_decoder[key] = (record_run(dstack, h0, cross), cross)
            while len(self._corrupted_decoder) > self.corrupted_cache_size:
                self._corrupted_decoder.popitem(last=False)
        return self._corrupted_decoder[key]

    def tokens(self, block: str, answer_ids: Sequence[int] = ()) -> list[str]:
        """Word-piece labels of the positions of ``block`` (for the vision encoder: CLS and patch coordinates)."""
        if block == anatomy.VISION_BLOCK:
            side = patch_grid_size(self.clean.image_embeds.shape[1])
            return [g.label for g in region_grid(side)]
        ids = self.question_ids if block == "question_encoder" else self.decoder_ids(list(answer_ids))
        return list(self.bundle.tokenizer.convert_ids_to_tokens(ids))

    def _targets(self, config: TraceConfig) -> tuple[tuple[int, ...], int | None]:
        answer_ids = self.answer_ids(config.answer)
        contrast = None
        if config.metric == "logit_diff":
            contrast = encode_answer(self.bundle.tokenizer, config.contrast or "")[0]
            if contrast == answer_ids[0]:
                raise ValueError("the contrast answer starts with the same token as the answer; pick another contrast")
        return answer_ids, contrast

    # ----- scoring -----------------------------------------------------------------------
    @torch.no_grad()
    def baselines(self, config: TraceConfig) -> tuple[float, float]:
        """(low, high): the corrupted run with nothing restored, and the clean run."""
        answer_ids, contrast = self._targets(config)
        high = _score_rows(self._head(self._clean_decoder(answer_ids).output), list(answer_ids), config.metric, contrast)
        low_run, _ = self._corrupted_decoder_run(config, answer_ids)
        low = _score_rows(self._head(low_run.output), list(answer_ids), config.metric, contrast)
        return float(low.mean()), float(high[0])

    def _decode_rows(self, question_states: torch.Tensor, answer_ids: tuple[int, ...]) -> torch.Tensor:
        """Decoder logits [S, C, Td, V] for question states [S, C, T, D], one row per cell x sample."""
        dstack = self.stacks["answer_decoder"]
        s, c, t, d = question_states.shape
        flat = question_states.reshape(s * c, t, d)
        embedded = dstack.embed(self._ids(self.decoder_ids(answer_ids)))
        h = embedded[:, None].expand(s, c, -1, -1)
        mask = dstack.self_mask(h.shape[2], h.dtype, h.device)
        for j in range(len(dstack)):
            k, v = dstack.cross_kv(j, flat)
            h = dstack.layer(j, h, (k.view(s, c, *k.shape[1:]), v.view(s, c, *v.shape[1:])), mask)
        return self._head(h)

    def _encode_question_rows(self, vision_states: torch.Tensor) -> torch.Tensor:
        """Question-encoder output [S, C, T, D] when each row sees its own vision states [S, C, N, Dv]."""
        qstack = self.stacks["question_encoder"]
        s, c, n, dv = vision_states.shape
        flat = self.stacks[anatomy.VISION_BLOCK].post_norm(vision_states).reshape(s * c, n, dv)
        h = qstack.embed(self._ids(self.question_ids))[:, None].expand(s, c, -1, -1)
        for j in range(len(qstack)):
            k, v = qstack.cross_kv(j, flat)
            h = qstack.layer(j, h, (k.view(s, c, *k.shape[1:]), v.view(s, c, *v.shape[1:])), None)
        return h

    @torch.no_grad()
    def restore(self, cells: Sequence[Cell], config: TraceConfig, progress: Progress | None = None) -> np.ndarray:
        """Score of each cell: restore its (layer, position) pairs of ``config.kind`` in every corrupted row."""
        block, kind = config.block, config.kind
        answer_ids, contrast = self._targets(config)
        stack = self.stacks[block]
        n_layers = len(stack)
        if block == anatomy.VISION_BLOCK:
            positions = int(self.clean.image_embeds.shape[1])
        else:
            positions = len(self.question_ids) if block == "question_encoder" else len(answer_ids)
        for cell in cells:
            for layer, pos in cell:
                if not (0 <= layer < n_layers and 0 <= pos < positions):
                    raise ValueError(f"cell entry (layer={layer}, position={pos}) is outside {n_layers} layers x {positions} positions")
        corrupted = self.corrupted(config)
        text = anatomy.text_config(self.model)
        if block == anatomy.VISION_BLOCK:
            clean_run, corrupted_run, cross = self.clean_vision, corrupted.vision, stack.no_cross()
            assert corrupted_run is not None
            vision = self.model.config.vision_config
            rows = vision_rows_per_chunk(
                samples=config.samples, patches=positions, vision_hidden=vision.hidden_size,
                vision_intermediate=vision.intermediate_size, vision_heads=vision.num_attention_heads,
                tokens=len(self.question_ids), text_hidden=text.hidden_size, text_intermediate=text.intermediate_size,
                text_heads=text.num_attention_heads, element_size=self.bundle.dtype.itemsize,
                memory_budget=self.memory_budget, max_batch_rows=self.max_batch_rows,
            )
        else:
            if block == "question_encoder":
                clean_run, corrupted_run, cross = self.clean.question, corrupted.question, corrupted.image_cross
                cross_tokens = corrupted.image_embeds.shape[1]
            else:
                clean_run = self._clean_decoder(answer_ids)
                corrupted_run, cross = self._corrupted_decoder_run(config, answer_ids)
                cross_tokens = len(self.question_ids)
            rows = rows_per_chunk(
                samples=config.samples, tokens=positions, cross_tokens=cross_tokens, hidden=text.hidden_size,
                intermediate=text.intermediate_size, heads=text.num_attention_heads, vocab=text.vocab_size,
                decoder_tokens=len(answer_ids), element_size=self.bundle.dtype.itemsize,
                memory_budget=self.memory_budget, max_batch_rows=self.max_batch_rows,
            )
        clean_states = [x[0] for x in clean_run.kinds[kind]]
        severed = corrupted_run.kinds[config.sever] if config.sever else None
        order = sorted(range(len(cells)), key=lambda i: start_layer(cells[i], kind, n_layers))
        scores = np.empty(len(cells), dtype=np.float64)
        done = 0
        for chunk in chunks(order, max(1, rows // config.samples)):
            chunk_cells = [cells[i] for i in chunk]
            edits = _ChunkEdits.build(kind, clean_states, chunk_cells, self.device, sever=config.sever, severed=severed)
            final = staircase(stack, corrupted_run, cross, chunk_cells, edits)
            if block == anatomy.VISION_BLOCK:
                logits = self._decode_rows(self._encode_question_rows(final), answer_ids)
            elif block == "question_encoder":
                logits = self._decode_rows(final, answer_ids)
            else:
                logits = self._head(final)
            s, c = logits.shape[:2]
            rows_scores = _score_rows(logits.reshape(s * c, *logits.shape[2:]), list(answer_ids), config.metric, contrast)
            scores[chunk] = rows_scores.view(s, c).mean(0).double().cpu().numpy()
            self.stats["engine_chunks"] += 1
            done += len(chunk)
            if progress is not None:
                progress(done, len(cells))
        self.stats["engine_calls"] += 1
        return scores

    def trace(self, config: TraceConfig | None = None, *, progress: Progress | None = None, **overrides: Any) -> TraceResult:
        """The heatmap for ``config`` (or :class:`TraceConfig` fields as keywords); cached per config."""
        config = replace(config, **overrides) if config is not None else TraceConfig(**overrides)
        if config in self._results:
            self._results.move_to_end(config)
            self.stats["cache_hits"] += 1
            return self._results[config]
        if config.block == anatomy.VISION_BLOCK:
            self.clean_vision  # recorded first, so the clean pass reuses it instead of a second vision pass
        answer_ids, _ = self._targets(config)
        n_layers = len(self.stacks[config.block])
        extra: dict[str, Any] = {}
        if config.block == anatomy.VISION_BLOCK:
            side = patch_grid_size(self.clean.image_embeds.shape[1])
            grid = region_grid(side, config.regions)
            tokens = [g.label for g in grid]
            cells = group_cells([g.tokens for g in grid], n_layers, int(config.window))
            extra["grid"] = {"patches_per_side": side, "regions_per_side": config.regions or side,
                             "boxes": [list(g.box) if g.box else None for g in grid]}
        else:
            tokens = self.tokens(config.block, answer_ids)
            cells = grid_cells(len(tokens), n_layers, int(config.window))
        if config.corrupt == "question":
            extra["corrupted_positions"] = self.corrupt_positions(config)
        scores = self.restore(cells, config, progress).reshape(len(tokens), n_layers)
        low, high = self.baselines(config)
        result = TraceResult(
            scores=scores,
            low_score=low,
            high_score=high,
            answer=self.bundle.tokenizer.decode(list(answer_ids)).strip(),
            tokens=tokens,
            block=config.block,
            kind=config.kind,
            window=int(config.window),
            config={
                **config.to_json(),
                "question": self.question,
                "model": self.bundle.name,
                "model_answer": self.model_answer,
                "answer_ids": [int(i) for i in answer_ids],
                "dtype": str(self.bundle.dtype).replace("torch.", ""),
                **extra,
            },
        )
        result.image = self.image  # for plot_on_image; not serialised
        self._results[config] = result
        while len(self._results) > self.result_cache_size:
            self._results.popitem(last=False)
        return result


def default_config(bundle: BlipBundle, **overrides: Any) -> TraceConfig:
    """A TraceConfig whose Gaussian noise is the bundle's ``noise_scale`` (ROME's 3σ unless the model says otherwise)."""
    overrides.setdefault("corruption", GaussianNoise(scale=bundle.noise_scale))
    return TraceConfig(**overrides)


def trace(
    bundle: BlipBundle,
    image: ImageLike,
    question: str,
    *,
    block: str = "question_encoder",
    kind: str = "hidden",
    window: int = 1,
    corruption: Callable[..., torch.Tensor] | None = None,
    samples: int = 10,
    seed: int = 0,
    answer: str | None = None,
    metric: str = "prob",
    contrast: str | None = None,
    sever: str | None = None,
    corrupt: str | None = None,
    corrupt_tokens: Sequence[int] | str | None = None,
    regions: int | None = None,
    progress: Progress | None = None,
    max_batch_rows: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> TraceResult:
    """Causal trace of ``block``'s ``kind`` states for one image and question (see :class:`TraceConfig`)."""
    config = TraceConfig(
        block=block, kind=kind, window=window, corruption=corruption or GaussianNoise(scale=3.0), samples=samples,
        seed=seed, answer=answer, metric=metric, contrast=contrast, sever=sever, corrupt=corrupt,
        corrupt_tokens=tuple(corrupt_tokens) if isinstance(corrupt_tokens, (list, tuple)) else corrupt_tokens,
        regions=regions,
    )
    tracer = Tracer(bundle, image, question, max_batch_rows=max_batch_rows, memory_budget=memory_budget)
    return tracer.trace(config, progress=progress)
