"""One class per traced block of BLIP VQA, behind one small protocol.

    >>> from blip_trace_widgets.blocks import BLOCK_CLASSES
    >>> sorted(BLOCK_CLASSES)
    ['answer_decoder', 'question_encoder', 'vision_encoder']

A block says what its positions are, how its clean and corrupted runs are made (from
the :class:`~.tracing.Tracer`'s shared clean pass and corrupted input), how many rows fit
a chunk, and how its final states become decoder logits. The tracer does the rest: cache,
cells, chunks, staircase, score, result. Adding a block is one class here, its row in
:data:`BLOCK_CLASSES`, and its module paths in :mod:`~.anatomy`.

BLIP VQA runs vision encoder → question encoder (cross-attending to the image) →
answer decoder (cross-attending to the question). Each block's :meth:`Block.logits`
runs the blocks after it, so restoring a vision state reaches the answer through both
text transformers.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from . import anatomy
from .engine import Cell, Run, TextStack, VisionStack, group_cells, rows_per_chunk, vision_rows_per_chunk
from .errors import BlipTraceError
from .names import ANSWER_DECODER, QUESTION_ENCODER, VISION_ENCODER
from .regions import patch_grid_size, region_grid

if TYPE_CHECKING:
    from .clean import CleanPass as Tracer
    from .config import TraceConfig

Cross = Sequence[Any]  # per layer: (keys, values) [S, Ck, H, N, D/H] for text stacks, None for the ViT


@dataclass
class Corrupted:
    """The corrupted input's runs: image embeddings [S, N, D] ([1, N, D] when only the question is
    corrupted), their cross keys and values for the question encoder, the question encoder's run, and
    the vision encoder's run when the corruption acts before it."""

    image_embeds: torch.Tensor
    image_cross: list[tuple[torch.Tensor, torch.Tensor]]
    question: Run
    vision: Run | None = None


@dataclass(frozen=True)
class Layout:
    """The positions of a trace: their labels, the cells to restore, and extra JSON for the result."""

    labels: list[str]
    cells: list[Cell]
    extra: dict[str, Any]


class Block(Protocol):
    """What the tracer needs from a block."""

    name: str
    stack: Any  # a Stack: TextStack or VisionStack

    def layout(self, tracer: Tracer, config: TraceConfig, answer_ids: tuple[int, ...]) -> Layout: ...

    def clean_run(self, tracer: Tracer, answer_ids: tuple[int, ...]) -> Run: ...

    def corrupted_run(self, tracer: Tracer, corrupted: Corrupted, answer_ids: tuple[int, ...]) -> tuple[Run, Cross]: ...

    def rows_per_chunk(self, tracer: Tracer, config: TraceConfig, answer_ids: tuple[int, ...]) -> int: ...

    def logits(self, tracer: Tracer, final: torch.Tensor, answer_ids: tuple[int, ...]) -> torch.Tensor: ...


def _text_layout(labels: list[str], layers: int, window: int) -> Layout:
    return Layout(labels, group_cells([[p] for p in range(len(labels))], layers, window), {})


def _text_rows(tracer: Tracer, config: TraceConfig, positions: int, cross_tokens: int, answer_ids: tuple[int, ...]) -> int:
    text = anatomy.text_config(tracer.model)
    return rows_per_chunk(
        samples=config.samples, tokens=positions, cross_tokens=cross_tokens, hidden=text.hidden_size,
        intermediate=text.intermediate_size, heads=text.num_attention_heads, vocab=text.vocab_size,
        decoder_tokens=len(answer_ids), element_size=tracer.bundle.working_itemsize,
        memory_budget=tracer.memory_budget, max_batch_rows=tracer.max_batch_rows,
    )


class AnswerDecoder:
    """The answer decoder (``text_decoder.bert``): positions are [DEC] and the earlier answer tokens."""

    name: str = ANSWER_DECODER

    def __init__(self, model: torch.nn.Module) -> None:
        self.stack = TextStack(model, ANSWER_DECODER)
        self.head = anatomy.answer_head(model)

    def layout(self, tracer: Tracer, config: TraceConfig, answer_ids: tuple[int, ...]) -> Layout:
        labels = list(tracer.bundle.tokenizer.convert_ids_to_tokens(tracer.decoder_ids(answer_ids)))
        return _text_layout(labels, len(self.stack), int(config.window))

    def run(self, tracer: Tracer, question_states: torch.Tensor, answer_ids: tuple[int, ...]) -> tuple[Run, Cross]:
        """The decoder's run [S, Td, D] on question states [S, T, D] (teacher-forced on ``answer_ids``)."""
        from .engine import record_run, shared_cross

        cross = shared_cross(self.stack, question_states)
        h0 = self.stack.embed(tracer.ids(tracer.decoder_ids(answer_ids))).expand(question_states.shape[0], -1, -1)
        return record_run(self.stack, h0, cross), cross

    def clean_run(self, tracer: Tracer, answer_ids: tuple[int, ...]) -> Run:
        return self.run(tracer, tracer.clean.question.output, answer_ids)[0]

    def corrupted_run(self, tracer: Tracer, corrupted: Corrupted, answer_ids: tuple[int, ...]) -> tuple[Run, Cross]:
        return self.run(tracer, corrupted.question.output, answer_ids)

    def rows_per_chunk(self, tracer: Tracer, config: TraceConfig, answer_ids: tuple[int, ...]) -> int:
        return _text_rows(tracer, config, len(answer_ids), len(tracer.question_ids), answer_ids)

    def logits(self, tracer: Tracer, final: torch.Tensor, answer_ids: tuple[int, ...]) -> torch.Tensor:
        return self.head(final)

    def decode_rows(self, tracer: Tracer, question_states: torch.Tensor, answer_ids: tuple[int, ...]) -> torch.Tensor:
        """Decoder logits [S, C, Td, V] when each row cross-attends to its own question states [S, C, T, D]."""
        stack = self.stack
        s, c, t, d = question_states.shape
        flat = question_states.reshape(s * c, t, d)
        h = stack.embed(tracer.ids(tracer.decoder_ids(answer_ids)))[:, None].expand(s, c, -1, -1)
        mask = stack.self_mask(h.shape[2], h.dtype, h.device)
        for j in range(len(stack)):
            k, v = stack.cross_kv(j, flat)
            h = stack.layer(j, h, (k.view(s, c, *k.shape[1:]), v.view(s, c, *v.shape[1:])), mask)
        return self.head(h)


class QuestionEncoder:
    """The question encoder (``text_encoder``): positions are the question's tokens, [CLS] and [SEP] included."""

    name: str = QUESTION_ENCODER

    def __init__(self, model: torch.nn.Module, decoder: AnswerDecoder) -> None:
        self.stack = TextStack(model, QUESTION_ENCODER)
        self.decoder = decoder

    def layout(self, tracer: Tracer, config: TraceConfig, answer_ids: tuple[int, ...]) -> Layout:
        labels = list(tracer.bundle.tokenizer.convert_ids_to_tokens(tracer.question_ids))
        return _text_layout(labels, len(self.stack), int(config.window))

    def clean_run(self, tracer: Tracer, answer_ids: tuple[int, ...]) -> Run:
        return tracer.clean.question

    def corrupted_run(self, tracer: Tracer, corrupted: Corrupted, answer_ids: tuple[int, ...]) -> tuple[Run, Cross]:
        return corrupted.question, corrupted.image_cross

    def rows_per_chunk(self, tracer: Tracer, config: TraceConfig, answer_ids: tuple[int, ...]) -> int:
        cross_tokens = int(tracer.clean.image_embeds.shape[1])
        return _text_rows(tracer, config, len(tracer.question_ids), cross_tokens, answer_ids)

    def logits(self, tracer: Tracer, final: torch.Tensor, answer_ids: tuple[int, ...]) -> torch.Tensor:
        return self.decoder.decode_rows(tracer, final, answer_ids)

    def encode_rows(self, tracer: Tracer, image_embeds: torch.Tensor) -> torch.Tensor:
        """Question states [S, C, T, D] when each row cross-attends to its own image embeddings [S, C, N, Dv]."""
        stack = self.stack
        s, c, n, dv = image_embeds.shape
        flat = image_embeds.reshape(s * c, n, dv)
        h = stack.embed(tracer.ids(tracer.question_ids))[:, None].expand(s, c, -1, -1)
        for j in range(len(stack)):
            k, v = stack.cross_kv(j, flat)
            h = stack.layer(j, h, (k.view(s, c, *k.shape[1:]), v.view(s, c, *v.shape[1:])), None)
        return h


class VisionEncoder:
    """The vision encoder (a pre-LN ViT): positions are CLS and the patches, or regions of patches."""

    name: str = VISION_ENCODER

    def __init__(self, model: torch.nn.Module, question: QuestionEncoder) -> None:
        self.stack = VisionStack(model)
        self.question = question

    def layout(self, tracer: Tracer, config: TraceConfig, answer_ids: tuple[int, ...]) -> Layout:
        side = patch_grid_size(int(tracer.clean.image_embeds.shape[1]))
        grid = region_grid(side, config.regions)
        extra = {"grid": {"patches_per_side": side, "regions_per_side": config.regions or side,
                          "boxes": [list(g.box) if g.box else None for g in grid]}}
        return Layout([g.label for g in grid], group_cells([g.tokens for g in grid], len(self.stack), int(config.window)),
                      extra)

    def clean_run(self, tracer: Tracer, answer_ids: tuple[int, ...]) -> Run:
        return tracer.clean_vision

    def corrupted_run(self, tracer: Tracer, corrupted: Corrupted, answer_ids: tuple[int, ...]) -> tuple[Run, Cross]:
        if corrupted.vision is None:
            raise BlipTraceError(
                "restoring vision-encoder states needs a corruption before the vision encoder: "
                "use corrupt='patches' or corrupt='pixels'")
        return corrupted.vision, [None] * len(self.stack)

    def rows_per_chunk(self, tracer: Tracer, config: TraceConfig, answer_ids: tuple[int, ...]) -> int:
        vision, text = anatomy.vision_config(tracer.model), anatomy.text_config(tracer.model)
        return vision_rows_per_chunk(
            samples=config.samples, patches=int(tracer.clean.image_embeds.shape[1]), vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size, vision_heads=vision.num_attention_heads,
            tokens=len(tracer.question_ids), text_hidden=text.hidden_size, text_intermediate=text.intermediate_size,
            text_heads=text.num_attention_heads, element_size=tracer.bundle.working_itemsize,
            memory_budget=tracer.memory_budget, max_batch_rows=tracer.max_batch_rows,
        )

    def logits(self, tracer: Tracer, final: torch.Tensor, answer_ids: tuple[int, ...]) -> torch.Tensor:
        question_states = self.question.encode_rows(tracer, self.stack.post_norm(final))
        return self.question.logits(tracer, question_states, answer_ids)


#: Every block by name: the order of BLIP's forward pass, reversed (each is built on the one after it).
BLOCK_CLASSES: dict[str, type] = {
    ANSWER_DECODER: AnswerDecoder,
    QUESTION_ENCODER: QuestionEncoder,
    VISION_ENCODER: VisionEncoder,
}


@dataclass(frozen=True)
class Blocks:
    """One instance of each block of a model, by name and by role."""

    decoder: AnswerDecoder
    question: QuestionEncoder
    vision: VisionEncoder

    def __getitem__(self, name: str) -> Block:
        blocks: dict[str, Block] = {ANSWER_DECODER: self.decoder, QUESTION_ENCODER: self.question,
                                    VISION_ENCODER: self.vision}
        return blocks[name]


def build_blocks(model: torch.nn.Module) -> Blocks:
    """One instance of each block for ``model``."""
    decoder = AnswerDecoder(model)
    question = QuestionEncoder(model, decoder)
    return Blocks(decoder, question, VisionEncoder(model, question))
