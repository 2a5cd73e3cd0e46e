"""Which class traces which block, and a model's blocks built from its head.

    >>> from blip_trace_widgets.causal_trace.blocks.registry import BLOCK_CLASSES
    >>> BLOCK_CLASSES["qformer"].__name__, BLOCK_CLASSES["lm_decoder"].__name__
    ('QFormer', 'LanguageDecoder')

Adding a block is one class in this package, its row in :data:`BLOCK_CLASSES`, its name in
:mod:`~blip_trace_widgets.core.names` and its module paths in :mod:`~blip_trace_widgets.models.anatomy`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...core.names import (
    ANSWER_DECODER,
    CAPTION_DECODER,
    ITM_ENCODER,
    LANGUAGE_MODEL,
    LM_DECODER,
    LM_ENCODER,
    QFORMER,
    QUESTION_ENCODER,
    VISION_ENCODER,
    facts,
)
from ...models import anatomy
from ...models.heads import head_of_model
from .base import Block, ImageReader
from .blip import AnswerDecoder, CaptionDecoder, ItmEncoder, QuestionEncoder
from .blip2 import LanguageDecoder, LanguageEncoder, LanguageModel, QFormer
from .vision import VisionEncoder

#: Every block by name.
BLOCK_CLASSES: dict[str, type] = {
    ANSWER_DECODER: AnswerDecoder,
    QUESTION_ENCODER: QuestionEncoder,
    CAPTION_DECODER: CaptionDecoder,
    ITM_ENCODER: ItmEncoder,
    VISION_ENCODER: VisionEncoder,
    QFORMER: QFormer,
    LANGUAGE_MODEL: LanguageModel,
    LM_ENCODER: LanguageEncoder,
    LM_DECODER: LanguageDecoder,
}


@dataclass(frozen=True)
class Blocks:
    """One instance of each block of a model: by name, the reader of the image, the block whose output the
    head reads (``last``), any between them (``middle``: a T5 language model's encoder), and the vision encoder."""

    head: str
    reader: ImageReader
    last: Any  # AnswerDecoder, CaptionDecoder, ItmEncoder, LanguageModel or LanguageDecoder
    vision: VisionEncoder
    middle: tuple[Any, ...] = ()

    def __getitem__(self, name: str) -> Block:
        anatomy.check_head_block(self.head, name)
        blocks: dict[str, Block] = {self.reader.name: self.reader, self.last.name: self.last,
                                    VISION_ENCODER: self.vision, **{block.name: block for block in self.middle}}
        return blocks[name]


def build_blocks(model: torch.nn.Module) -> Blocks:
    """One instance of each block of ``model``'s head, wired in the order of its forward pass: each text block is
    given the one after it (which runs on its output), from the last back to the reader."""
    task = head_of_model(model)
    chain = [block for block in task.blocks if not facts(block).image_side]  # the reader first, the last block last
    built: list[Any] = [BLOCK_CLASSES[chain[-1]](model)]
    for name in reversed(chain[:-1]):
        built.insert(0, BLOCK_CLASSES[name](model, built[0]))
    return Blocks(task.name, built[0], built[-1], VisionEncoder(model, built[0]), tuple(built[1:-1]))
