"""The clean pass of one (image, question): inputs, image embeddings, question states and the model's answer.

    >>> from blip_trace_widgets import load_model, demo_samples
    >>> from blip_trace_widgets.clean import CleanPass
    >>> image, question, _ = demo_samples()[0]
    >>> clean = CleanPass(load_model("demo"), image, question)
    >>> clean.model_answer
    'red'

Everything here is computed once per (image, question) and shared by every trace of it.
The image embeddings take one path, the vision encoder layer by layer (the same
arithmetic whether or not an image-side trace records it), so they never depend on
which trace ran first.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import anatomy
from .blocks import Blocks, build_blocks
from .config import TraceConfig
from .engine import DEFAULT_MEMORY_BUDGET, Run, record_run, shared_cross
from .errors import BlipTraceError
from .inputs import ImageLike, check_question, encode_answer, encode_question, image_digest, to_rgb_image
from .loading import BlipBundle
from .names import MAX_ANSWER_TOKENS


@dataclass
class Clean:
    image_embeds: torch.Tensor  # [1, N, D]
    question: Run
    greedy_ids: list[int]


class CleanPass:
    """The clean pass of one (image, question), computed when first needed and kept."""

    def __init__(self, bundle: BlipBundle, image: ImageLike, question: str, *,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, max_batch_rows: int | None = None) -> None:
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
        self._clean: Clean | None = None
        self._clean_vision: Run | None = None

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
    def clean(self) -> Clean:
        """The clean pass: image embeddings, question-encoder states and the greedy answer (once)."""
        if self._clean is None:
            with torch.no_grad():
                # an image-side trace records the clean vision run first; its output is bitwise the
                # same as an unrecorded pass (the same arithmetic), so it is reused rather than recomputed
                embeds = (self.vision.post_norm(self._clean_vision.output) if self._clean_vision is not None
                          else self.embed_image(self.image))
                qstack = self.blocks.question.stack
                run = record_run(qstack, qstack.embed(self.ids(self.question_ids)), shared_cross(qstack, embeds))
                self._clean = Clean(embeds, run, self._greedy(run.output))
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
