"""The clean pass of one (image, text): inputs, image embeddings, the reader's states and the model's output.

    >>> from blip_trace_widgets import load_model, demo_samples
    >>> from blip_trace_widgets.causal_trace.clean import CleanPass
    >>> image, question, _ = demo_samples()[0]
    >>> CleanPass(load_model("demo"), image, question).model_answer
    'red'
    >>> CleanPass(load_model("demo-caption"), image, "").model_answer   # the caption, after the prompt
    'a red triangle'

The text is a VQA model's question, a captioner's prompt (``""`` for none, or BLIP's
``"a picture of"``), or the text an image-text matcher matches against the image.

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

from ..core.errors import BlipTraceError
from ..core.inputs import ImageLike, image_digest, to_rgb_image
from ..core.scoring import Target
from ..models import anatomy
from ..models.chunks import DEFAULT_MEMORY_BUDGET
from ..models.heads import Head, head_of_model
from ..models.loading import BlipBundle
from ..models.runs import Run, record_run, shared_cross
from .blocks.base import Context
from .blocks.registry import Blocks, build_blocks


@dataclass
class Clean:
    image_embeds: torch.Tensor  # [1, N, D]
    text: Run | None  # the reader's run, when its tokens do not depend on the target (VQA, ITM)
    greedy_ids: list[int]  # VQA: the answer; captioning: the caption after the prompt; ITM: none


class CleanPass:
    """The clean pass of one (image, text), computed when first needed and kept."""

    def __init__(self, bundle: BlipBundle, image: ImageLike, question: str, *,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, max_batch_rows: int | None = None) -> None:
        if not isinstance(bundle, BlipBundle):
            raise BlipTraceError("pass the bundle returned by load_model(...), not a bare model")
        #: The model's task head (what it reads, says and scores), and its name.
        self.task: Head = head_of_model(bundle.model)
        self.head = self.task.name
        self.bundle = bundle
        self.model = bundle.model
        self.image = to_rgb_image(image)
        self.image_key = image_digest(self.image)
        self.question, self.question_ids = self.task.encode(bundle.tokenizer, question, self.position_limit,
                                                            self.bos_id)
        #: The Q-Former's tokens after its queries (InstructBLIP's instruction); none for other models.
        self.instruction_ids: tuple[int, ...] = self.task.instruction(bundle, self.question)
        self.blocks: Blocks = build_blocks(self.model)
        self.memory_budget = memory_budget
        self.max_batch_rows = max_batch_rows
        self.stats: Counter[str] = Counter()
        self._pixels: torch.Tensor | None = None
        self._clean: Clean | None = None
        self._clean_vision: Run | None = None
        self._text_feature: torch.Tensor | None = None
        self._context: Context | None = None

    @property
    def context(self) -> Context:
        """What blocks read, frozen (made once, after the clean pass)."""
        if self._context is None:
            self._context = Context(self.bundle, self.model, self.device, tuple(self.question_ids), self.memory_budget,
                                    self.max_batch_rows, self.clean, lambda: self.clean_vision, self.itc_text_feature,
                                    self.instruction_ids)
        return self._context

    def held(self) -> list[Any]:
        """What this pass keeps: its clean pass, clean vision run, pixels and ITC text feature (None until made)."""
        return [self._clean, self._clean_vision, self._pixels, self._text_feature]

    # ----- inputs ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.bundle.device

    @property
    def position_limit(self) -> int:
        """The most tokens the text transformers read."""
        return self.task.position_limit(self.model)

    @property
    def bos_id(self) -> int:
        """The decoders' start token."""
        return self.task.start_token(self.model)

    @property
    def unknown_words(self) -> list[str]:
        """Words of the text that the model's vocabulary lacks (it reads them as [UNK])."""
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

    # ----- the clean pass ----------------------------------------------------------------
    @property
    def clean(self) -> Clean:
        """The clean pass: image embeddings, the reader's states and the greedy answer or caption (once)."""
        if self._clean is None:
            with torch.no_grad():
                # an image-side trace records the clean vision run first; its output is bitwise the
                # same as an unrecorded pass (the same arithmetic), so it is reused rather than recomputed
                embeds = (self.vision.post_norm(self._clean_vision.output) if self._clean_vision is not None
                          else self.embed_image(self.image))
                reader = self.blocks.reader
                cross = shared_cross(reader.stack, embeds)
                run = None if reader.runs_per_target else record_run(reader.stack, reader.first_states(self), cross)
                self._clean = Clean(embeds, run, self.task.greedy(self, embeds, run))
            self.stats["clean_passes"] += 1
        return self._clean

    @property
    def reader_output(self) -> torch.Tensor:
        """The reader's clean output [1, T, D] (BLIP-2's Q-Former queries; VQA's question states)."""
        if self.clean.text is None:
            raise BlipTraceError("this model's reader reads the target, so its output depends on what is scored")
        return self.clean.text.output

    @property
    def clean_vision(self) -> Run:
        """The clean vision-encoder run, layer by layer (recorded for image-side traces only)."""
        if self._clean_vision is None:
            with torch.no_grad():
                self.stats["vision_passes"] += 1
                self._clean_vision = record_run(self.vision, self.vision.embed(self.pixels), [None] * len(self.vision))
        return self._clean_vision

    @torch.no_grad()
    def decode(self, block: Any, states: torch.Tensor, start: Sequence[int], limit: int) -> list[int]:
        """Greedy decoding by ``block`` (its stack and output head), attending to ``states`` [1, N, D], from
        ``start`` until [SEP] or padding, at most ``limit`` new tokens (and never past the decoder's
        positions): the tokens after ``start``."""
        config = anatomy.text_config(self.model)
        stack, head, cross = block.stack, block.head, shared_cross(block.stack, states)
        ids = [int(i) for i in start]
        room = int(config.max_position_embeddings) - len(ids)
        for _ in range(min(limit, room)):
            run = record_run(stack, stack.embed(self.ids(ids)), cross)
            token = int(head(run.output[:, -1]).argmax(-1)[0])
            if token in (config.sep_token_id, config.pad_token_id):
                break
            ids.append(token)
        return ids[len(start):]

    @property
    def model_answer(self) -> str:
        """VQA: the model's own greedy answer, in full. Captioning: its greedy caption after the prompt.
        Image-text matching: "match" or "no match", from the ITM head."""
        return self.task.model_answer(self)

    @property
    def match_probability(self) -> float:
        """Image-text matching: the ITM head's p(match) for the clean image and the text."""
        self.task.check_matches()
        text = self.clean.text
        assert text is not None
        with torch.no_grad():
            logits = self.blocks.last.logits(self.context, text.output[:, None], Target(tuple(self.question_ids)))
        return float(torch.softmax(logits.float(), -1)[0, 0, 1])

    def itc_text_feature(self, projection: Any) -> torch.Tensor:
        """The text's normalised ITC feature [D'] (the text encoder's first state without the image, projected)."""
        if self._text_feature is None:
            with torch.no_grad():
                states = anatomy.text_encoder(self.model)(input_ids=self.ids(self.question_ids))
                first = states[0][0, 0] if isinstance(states, tuple) else states.last_hidden_state[0, 0]
                self._text_feature = torch.nn.functional.normalize(projection(first), dim=-1)
        return self._text_feature
