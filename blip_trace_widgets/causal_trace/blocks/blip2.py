"""BLIP-2's and InstructBLIP's blocks: the Q-Former, and the language model (OPT or LLaMA, or Flan-T5's
encoder and decoder).

    >>> from blip_trace_widgets.causal_trace.blocks.blip2 import LanguageDecoder
    >>> LanguageDecoder.__name__
    'LanguageDecoder'
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...core.names import LANGUAGE_MODEL, LM_DECODER, LM_ENCODER, QFORMER
from ...core.scoring import Target
from ...models.blip2.decoders import language_model_stack
from ...models.blip2.qformer import QFormerStack
from ...models.blip2.t5 import T5Stack
from ...models.runs import Run, record_run, shared_cross
from .base import (
    Context,
    Corrupted,
    Cross,
    Facts,
    ImageReader,
    Layout,
    Settings,
    after_queries,
    cross_rows,
    text_layout,
    text_rows,
)


class LanguageModel(Facts):
    """BLIP-2's language model (OPT): positions are the projected queries q0… (the image, as the language model
    reads it), then the prompt and the answer before the scored token."""

    name: str = LANGUAGE_MODEL
    runs_per_target = True

    def __init__(self, model: torch.nn.Module) -> None:
        self.stack = language_model_stack(model)
        self.queries = self.stack.count

    def labels(self, context: Context, target: Target) -> list[str]:
        return after_queries(self.queries, context.bundle.tokenizer.convert_ids_to_tokens(list(target.inputs)))

    def layout(self, context: Context, config: Settings, target: Target) -> Layout:
        return text_layout(self.labels(context, target), self.stack, config)

    def run(self, context: Context, query_states: torch.Tensor, target: Target, projected: bool = False,
            prompt: torch.Tensor | None = None) -> tuple[Run, Cross]:
        """The language model's run [S, Q + T, D] on Q-Former outputs [S, Q, Dq] (``projected``: [S, Q, D]),
        teacher-forced on the target; ``prompt`` [S, P, D] replaces the first P tokens' embeddings."""
        cross = [None] * len(self.stack)
        h0 = self.stack.embed(query_states, context.ids(target.inputs), projected, prompt)
        return record_run(self.stack, h0, cross), cross

    def prompt_states(self, context: Context, ids: Sequence[int]) -> torch.Tensor:
        """The token embeddings [1, P, D] of prompt tokens ``ids`` (what a corrupted question corrupts)."""
        return self.stack.tokens(context.ids(ids))

    def clean_run(self, context: Context, target: Target) -> Run:
        assert context.clean.text is not None
        return self.run(context, context.clean.text.output, target)[0]

    def clean_cross(self, context: Context, target: Target) -> Cross:
        return [None] * len(self.stack)

    def corrupted_run(self, context: Context, corrupted: Corrupted, target: Target) -> tuple[Run, Cross]:
        assert corrupted.text is not None
        return self.run(context, corrupted.text.output, target, corrupted.projected, corrupted.prompt)

    def rows_per_chunk(self, context: Context, config: Settings, target: Target) -> int:
        return text_rows(context, config, len(self.labels(context, target)), 0, 1, LANGUAGE_MODEL)

    def logits(self, context: Context, final: torch.Tensor, target: Target, prompt: torch.Tensor | None = None) -> torch.Tensor:
        return self.stack.logits(final)

    def decode_rows(self, context: Context, query_states: torch.Tensor, target: Target,
                    prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [S, C, Q + T, V] when each row reads its own Q-Former outputs [S, C, Q, Dq] (and ``prompt`` [S, P, D],
        the corrupted prompt's embeddings, in place of the prompt's)."""
        stack = self.stack
        h = stack.embed(query_states, context.ids(target.inputs), prompt=prompt)
        mask = stack.self_mask(h.shape[2], h.dtype, h.device)
        for j in range(len(stack)):
            h = stack.layer(j, h, None, mask)
        return stack.logits(h)

    def generate(self, context: Any, query_states: torch.Tensor, start: Sequence[int], limit: int,
                 stop: Sequence[int]) -> list[int]:
        """Greedy decoding after ``start`` on Q-Former outputs [1, Q, Dq], until a ``stop`` token, at most ``limit``
        new tokens: the tokens after ``start``."""
        ids = [int(i) for i in start]
        for _ in range(limit):
            logits = self.decode_rows(context, query_states[:, None], Target(tuple(ids)))
            token = int(logits[0, 0, -1].argmax())
            if token in stop:
                break
            ids.append(token)
        return ids[len(start):]


class LanguageDecoder(Facts):
    """A Flan-T5 language model's decoder: positions are the decoder's start token and the answer before the scored
    token; it cross-attends to the encoder's output (the projected queries and the prompt, encoded)."""

    name: str = LM_DECODER
    runs_per_target = True

    def __init__(self, model: torch.nn.Module) -> None:
        self.stack = T5Stack(model, LM_DECODER)
        self.encoder = T5Stack(model, LM_ENCODER)  # to encode the Q-Former's outputs (LanguageEncoder traces it)
        self.queries = self.encoder.count  # the image's positions of what it cross-attends to

    def labels(self, context: Context, target: Target) -> list[str]:
        return list(context.bundle.tokenizer.convert_ids_to_tokens(list(target.inputs)))

    def cross_labels(self, context: Context) -> list[str]:
        """What its cross-attention reads: the encoder's positions, the queries q0… then the prompt."""
        return after_queries(self.queries, context.bundle.tokenizer.convert_ids_to_tokens(list(context.question_ids)))

    def layout(self, context: Context, config: Settings, target: Target) -> Layout:
        return text_layout(self.labels(context, target), self.stack, config)

    def encode(self, context: Context, query_states: torch.Tensor, projected: bool = False,
               prompt: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output [..., Q + T, D] for Q-Former outputs [..., Q (+ T'), Dq] (``projected``: the
        queries at the language model's width) and the prompt (``prompt``: its embeddings [S, T, D], corrupted)."""
        h = self.encoder.embed(query_states, context.ids(context.question_ids), projected, prompt)
        if h.dim() == 3:
            h = h[:, None]
        mask = self.encoder.self_mask(h.shape[-2], h.dtype, h.device)
        for j in range(len(self.encoder)):
            h = self.encoder.layer(j, h, None, mask)
        return self.encoder.output(h if query_states.dim() == 4 else h[:, 0])

    def run(self, context: Context, encoded: torch.Tensor, target: Target) -> tuple[Run, Cross]:
        """The decoder's run [S, Td, D] on the encoder's output [S, N, D] (teacher-forced on the target)."""
        cross = shared_cross(self.stack, encoded)
        h0 = self.stack.embed_tokens(context.ids(target.inputs)).expand(encoded.shape[0], -1, -1)
        return record_run(self.stack, h0, cross), cross

    def clean_run(self, context: Context, target: Target) -> Run:
        return self.run(context, self.encode(context, context.clean.text.output), target)[0]

    def clean_cross(self, context: Context, target: Target) -> Cross:
        return shared_cross(self.stack, self.encode(context, context.clean.text.output))

    def corrupted_run(self, context: Context, corrupted: Corrupted, target: Target) -> tuple[Run, Cross]:
        assert corrupted.text is not None
        encoded = self.encode(context, corrupted.text.output, corrupted.projected, corrupted.prompt)
        return self.run(context, encoded, target)

    def prompt_states(self, context: Context, ids: Sequence[int]) -> torch.Tensor:
        """The token embeddings [1, P, D] of prompt tokens ``ids`` (what a corrupted question corrupts)."""
        return self.encoder.tokens(context.ids(ids))

    def rows_per_chunk(self, context: Context, config: Settings, target: Target) -> int:
        encoded = self.encoder.count + len(context.question_ids)
        return text_rows(context, config, len(target.inputs), encoded, len(target.inputs), LM_DECODER)

    def logits(self, context: Context, final: torch.Tensor, target: Target, prompt: torch.Tensor | None = None) -> torch.Tensor:
        return self.stack.logits(final)

    def decode_rows(self, context: Context, encoded: torch.Tensor, target: Target) -> torch.Tensor:
        """Logits [S, C, Td, V] when each row cross-attends to its own encoder output [S, C, N, D]."""
        return self.stack.logits(cross_rows(self.stack, self.stack.embed_tokens(context.ids(target.inputs)), encoded))

    def generate(self, context: Any, query_states: torch.Tensor, start: Sequence[int], limit: int,
                 stop: Sequence[int]) -> list[int]:
        """Greedy decoding after ``start`` (the decoder's start token) on Q-Former outputs [1, Q, Dq], until a
        ``stop`` token, at most ``limit`` new tokens: the tokens after ``start``."""
        encoded = self.encode(context, query_states)[:, None]
        ids = [int(i) for i in start]
        for _ in range(limit):
            token = int(self.decode_rows(context, encoded, Target(tuple(ids)))[0, 0, -1].argmax())
            if token in stop:
                break
            ids.append(token)
        return ids[len(start):]


class LanguageEncoder(Facts):
    """A Flan-T5 language model's encoder: positions are the projected queries q0… (the image, as the language model
    reads it), then the prompt; the decoder reads its output."""

    name: str = LM_ENCODER
    runs_per_target = True  # its runs do not read the target, but are made per trace, and kept per target

    def __init__(self, model: torch.nn.Module, decoder: LanguageDecoder) -> None:
        self.stack = T5Stack(model, LM_ENCODER)
        self.decoder = decoder
        self.queries = self.stack.count

    def labels(self, context: Context, target: Target) -> list[str]:
        return after_queries(self.queries, context.bundle.tokenizer.convert_ids_to_tokens(list(context.question_ids)))

    def layout(self, context: Context, config: Settings, target: Target) -> Layout:
        return text_layout(self.labels(context, target), self.stack, config)

    def run(self, context: Context, query_states: torch.Tensor, projected: bool = False,
            prompt: torch.Tensor | None = None) -> tuple[Run, Cross]:
        """The encoder's run [S, Q + T, D] on Q-Former outputs [S, Q, Dq] (``projected``: [S, Q, D]; ``prompt``: the
        prompt's embeddings [S, T, D], corrupted)."""
        cross = [None] * len(self.stack)
        h0 = self.stack.embed(query_states, context.ids(context.question_ids), projected, prompt)
        return record_run(self.stack, h0, cross), cross

    def clean_run(self, context: Context, target: Target) -> Run:
        return self.run(context, context.clean.text.output)[0]

    def clean_cross(self, context: Context, target: Target) -> Cross:
        return [None] * len(self.stack)

    def corrupted_run(self, context: Context, corrupted: Corrupted, target: Target) -> tuple[Run, Cross]:
        assert corrupted.text is not None
        return self.run(context, corrupted.text.output, corrupted.projected, corrupted.prompt)

    def rows_per_chunk(self, context: Context, config: Settings, target: Target) -> int:
        return text_rows(context, config, len(self.labels(context, target)), 0, len(target.inputs), LM_ENCODER)

    def logits(self, context: Context, final: torch.Tensor, target: Target, prompt: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder.decode_rows(context, self.stack.output(final), target)

    def decode_rows(self, context: Context, query_states: torch.Tensor, target: Target,
                    prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [S, C, Td, V] when each row reads its own Q-Former outputs [S, C, Q, Dq] (and ``prompt``, as the
        OPT language model's :meth:`LanguageModel.decode_rows` reads it)."""
        return self.decoder.decode_rows(context, self.decoder.encode(context, query_states, prompt=prompt), target)


class QFormer(ImageReader):
    """BLIP-2's Q-Former: positions are its learned queries q0…, which cross-attend to the image embeddings; the
    language model reads its outputs."""

    name: str = QFORMER

    def __init__(self, model: torch.nn.Module, decoder: LanguageModel | LanguageEncoder) -> None:
        self.stack: QFormerStack = QFormerStack(model)
        self.decoder = decoder

    def positions(self, context: Any) -> int:
        return self.stack.count + len(context.instruction_ids)

    def labels(self, context: Context, target: Target) -> list[str]:
        queries = [f"q{i}" for i in range(self.stack.count)]
        if not context.instruction_ids:
            return queries
        tokenizer = context.bundle.processor.qformer_tokenizer
        return [*queries, *tokenizer.convert_ids_to_tokens(list(context.instruction_ids))]

    def layout(self, context: Context, config: Settings, target: Target) -> Layout:
        """As any text block's; an instruction's positions never cross-attend, so their cross kinds are n/a."""
        layout = text_layout(self.labels(context, target), self.stack, config)
        if not context.instruction_ids or config.kind != "cross_attn":
            return layout
        rows = list(range(self.stack.count, self.positions(context)))
        return Layout(layout.labels, layout.cells, {**layout.extra, "absent_positions": rows})

    def first_states(self, context: Any) -> torch.Tensor:
        return self.stack.queries(context.ids(context.instruction_ids))

    def input_states(self, context: Context, target: Target) -> torch.Tensor:
        return self.first_states(context)

    def decoder_tokens(self, target: Target) -> int:
        return len(target.inputs) + self.decoder.queries

    def logits(self, context: Context, final: torch.Tensor, target: Target, prompt: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder.decode_rows(context, final, target, prompt)
