"""BLIP's text blocks: the question encoder and answer decoder (VQA), the caption decoder, the ITM encoder.

    >>> from blip_trace_widgets.causal_trace.blocks.blip import QuestionEncoder
    >>> QuestionEncoder.__mro__[1].__name__
    'ImageReader'
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ...core.names import ANSWER_DECODER, CAPTION_DECODER, ITM_ENCODER, QUESTION_ENCODER
from ...core.scoring import Target
from ...models import anatomy
from ...models.blip.stacks import TextStack
from ...models.runs import Run, record_run, shared_cross
from .base import Context, Corrupted, Cross, Facts, ImageReader, Layout, Settings, cross_rows, text_layout, text_rows


class AnswerDecoder(Facts):
    """VQA's answer decoder (``text_decoder.bert``): positions are [DEC] and the earlier answer tokens."""

    name: str = ANSWER_DECODER
    runs_per_target = True

    def __init__(self, model: torch.nn.Module) -> None:
        self.stack = TextStack(model, ANSWER_DECODER)
        self.head = anatomy.answer_head(model)

    def labels(self, context: Context, target: Target) -> list[str]:
        return list(context.bundle.tokenizer.convert_ids_to_tokens(list(target.inputs)))

    def layout(self, context: Context, config: Settings, target: Target) -> Layout:
        return text_layout(self.labels(context, target), self.stack, config)

    def cross_labels(self, context: Context) -> list[str]:
        """What its cross-attention reads: the question's tokens."""
        return list(context.bundle.tokenizer.convert_ids_to_tokens(list(context.question_ids)))

    def run(self, context: Context, question_states: torch.Tensor, target: Target) -> tuple[Run, Cross]:
        """The decoder's run [S, Td, D] on question states [S, T, D] (teacher-forced on the target)."""
        cross = shared_cross(self.stack, question_states)
        h0 = self.stack.embed(context.ids(target.inputs)).expand(question_states.shape[0], -1, -1)
        return record_run(self.stack, h0, cross), cross

    def clean_run(self, context: Context, target: Target) -> Run:
        assert context.clean.text is not None
        return self.run(context, context.clean.text.output, target)[0]

    def clean_cross(self, context: Context, target: Target) -> Cross:
        """Cross keys and values of the clean question states (what the clean run attends to)."""
        assert context.clean.text is not None
        return shared_cross(self.stack, context.clean.text.output)

    def corrupted_run(self, context: Context, corrupted: Corrupted, target: Target) -> tuple[Run, Cross]:
        assert corrupted.text is not None
        return self.run(context, corrupted.text.output, target)

    def rows_per_chunk(self, context: Context, config: Settings, target: Target) -> int:
        return text_rows(context, config, len(target.inputs), len(context.question_ids), len(target.inputs))

    def logits(self, context: Context, final: torch.Tensor, target: Target, prompt: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(final)

    def decode_rows(self, context: Context, question_states: torch.Tensor, target: Target) -> torch.Tensor:
        """Decoder logits [S, C, Td, V] when each row cross-attends to its own question states [S, C, T, D]."""
        return self.head(cross_rows(self.stack, self.stack.embed(context.ids(target.inputs)), question_states))


class QuestionEncoder(ImageReader):
    """VQA's question encoder (``text_encoder``): positions are the question's tokens, [CLS] and [SEP] included."""

    name: str = QUESTION_ENCODER

    def __init__(self, model: torch.nn.Module, decoder: AnswerDecoder) -> None:
        super().__init__(model)
        self.decoder = decoder

    def decoder_tokens(self, target: Target) -> int:
        return len(target.inputs)

    def logits(self, context: Context, final: torch.Tensor, target: Target, prompt: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder.decode_rows(context, final, target)


class ItmEncoder(ImageReader):
    """The image-text matcher's text encoder: positions are the text's tokens; the ITM head reads the first."""

    name: str = ITM_ENCODER

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.head = anatomy.itm_head(model)

    def logits(self, context: Context, final: torch.Tensor, target: Target, prompt: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(final[..., 0, :])  # [S, C, 2]: (no match, match)


class CaptionDecoder(ImageReader):
    """The captioner's decoder: positions are [DEC], the prompt and the caption before the scored word."""

    name: str = CAPTION_DECODER
    runs_per_target = True

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.head = anatomy.answer_head(model)

    def input_ids(self, context: Context, target: Target) -> Sequence[int]:
        return target.inputs

    def run(self, context: Context, image_cross: Cross, samples: int, target: Target,
            prompt: torch.Tensor | None = None) -> Run:
        """The decoder's run over ``target.inputs``, its first positions replaced by ``prompt`` [S, P, D] if given
        (a corrupted prompt: the embeddings are per position, so the rest is as in the clean run)."""
        h0 = self.stack.embed(context.ids(target.inputs)).expand(samples, -1, -1)
        if prompt is not None:
            h0 = torch.cat([prompt.expand(samples, -1, -1), h0[:, prompt.shape[1]:]], 1)
        return record_run(self.stack, h0, image_cross)

    def clean_run(self, context: Context, target: Target) -> Run:
        return self.run(context, shared_cross(self.stack, context.clean.image_embeds), 1, target)

    def corrupted_run(self, context: Context, corrupted: Corrupted, target: Target) -> tuple[Run, Cross]:
        prompt = corrupted.prompt
        samples = int(corrupted.image_embeds.shape[0] if prompt is None else prompt.shape[0])
        return self.run(context, corrupted.image_cross, samples, target, prompt), corrupted.image_cross

    def logits(self, context: Context, final: torch.Tensor, target: Target, prompt: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(final)
