"""One class per traced block of BLIP, behind one small protocol.

    >>> from blip_trace_widgets.blocks import BLOCK_CLASSES
    >>> BLOCK_CLASSES["qformer"].__name__, BLOCK_CLASSES["lm_decoder"].__name__
    ('QFormer', 'LanguageDecoder')

A block says what its positions are, how its clean and corrupted runs are made (from
the :class:`~.tracing.Tracer`'s shared clean pass and corrupted input), how many rows fit
a chunk, and how its final states become the head's outputs. The tracer does the rest: cache,
cells, chunks, staircase, score, result. Adding a block is one class here, its row in
:data:`BLOCK_CLASSES`, and its module paths in :mod:`~.anatomy`.

Every BLIP head has one *reader*, the text block that cross-attends to the image embeddings:

* VQA: vision encoder → question encoder (the reader) → answer decoder (cross-attending to
  the question);
* captioning: vision encoder → caption decoder (the reader; its outputs are the caption's next tokens);
* image-text matching: vision encoder → ITM encoder (the reader; the ITM head reads its first state);
* BLIP-2: vision encoder → Q-Former (the reader: learned queries cross-attend to the image) → language model (it
  reads the Q-Former's outputs, projected, before the prompt).

Each block's :meth:`Block.logits` runs the blocks after it, so restoring a vision state reaches
the score through every text transformer after it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from . import anatomy
from .config import TraceConfig
from .engine import (
    Cell,
    QFormerStack,
    Run,
    T5Stack,
    TextStack,
    VisionStack,
    group_cells,
    head_unit,
    language_model_stack,
    record_run,
    rows_per_chunk,
    shared_cross,
    vision_rows_per_chunk,
)
from .errors import BlipTraceError
from .heads import head_of_model
from .names import (
    ANSWER_DECODER,
    CAPTION_DECODER,
    ITM_ENCODER,
    LANGUAGE_MODEL,
    LM_DECODER,
    LM_ENCODER,
    QFORMER,
    QUESTION_ENCODER,
    VISION_ENCODER,
    is_head_kind,
)
from .regions import patch_grid_size, region_grid
from .roles import token_roles
from .scoring import Target


class Pass(Protocol):
    """What a block reads from the clean pass of one (image, text), read-only: the model and its tokens, the
    clean runs, and the memory settings that size its chunks (a :class:`~.clean.CleanPass`, the session a
    :class:`~.tracing.Tracer` holds; never the tracer itself)."""

    @property
    def bundle(self) -> Any: ...

    @property
    def model(self) -> torch.nn.Module: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def question_ids(self) -> Sequence[int]: ...

    @property
    def memory_budget(self) -> int: ...

    @property
    def max_batch_rows(self) -> int | None: ...

    @property
    def clean(self) -> Any: ...

    @property
    def clean_vision(self) -> Run: ...

    @property
    def instruction_ids(self) -> Sequence[int]: ...

    def ids(self, ids: Sequence[int]) -> torch.Tensor: ...

    def itc_text_feature(self, projection: Any) -> torch.Tensor: ...


@dataclass(frozen=True)
class Context:
    """What a block reads, frozen: one (image, text)'s model and tokens, its clean pass, and the memory settings
    that size chunks (a :class:`~.clean.CleanPass` makes it once its clean pass exists). The clean vision-encoder
    run with every state kept is recorded only when an image-side trace first asks (``clean_vision``): it is the
    largest thing a trace keeps."""

    bundle: Any
    model: torch.nn.Module
    device: torch.device
    question_ids: tuple[int, ...]
    memory_budget: int
    max_batch_rows: int | None
    clean: Any  # a clean.Clean
    record_vision: Callable[[], Run] = field(repr=False)
    text_feature: Callable[[Any], torch.Tensor] = field(repr=False)
    instruction_ids: tuple[int, ...] = ()  # InstructBLIP's instruction, as its Q-Former reads it

    @property
    def clean_vision(self) -> Run:
        return self.record_vision()

    def ids(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor([list(ids)], device=self.device)

    def itc_text_feature(self, projection: Any) -> torch.Tensor:
        return self.text_feature(projection)


Cross = Sequence[Any]  # per layer: (keys, values) [S, Ck, H, N, D/H] for text stacks, None for the ViT


@dataclass
class Corrupted:
    """The corrupted input's runs: image embeddings [S, N, D] ([1, N, D] when only the text is
    corrupted), their cross keys and values for the reader, the reader's run (None when the reader's
    tokens depend on the target, as a caption decoder's do), and the vision encoder's run when the
    corruption acts before it."""

    image_embeds: torch.Tensor
    image_cross: list[tuple[torch.Tensor, torch.Tensor]]
    text: Run | None
    vision: Run | None = None
    #: A reader that reads the target (a captioner), or a language model that reads the question in its prompt
    #: (BLIP-2): its corrupted text input [S, P, D], the first P positions of its text (the prompt), when the
    #: text is corrupted; None otherwise.
    prompt: torch.Tensor | None = None
    #: Whether ``text.output`` is the queries already projected to the language model's width (corrupt="projected").
    projected: bool = False


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
    reads_target: bool  # whether its runs depend on the target's tokens (then they are cached per target)

    def layout(self, session: Pass, config: TraceConfig, target: Target) -> Layout: ...

    def labels(self, session: Pass, target: Target) -> list[str]: ...

    def clean_run(self, session: Pass, target: Target) -> Run: ...

    def corrupted_run(self, session: Pass, corrupted: Corrupted, target: Target) -> tuple[Run, Cross]: ...

    def clean_cross(self, session: Pass, target: Target) -> Cross: ...

    def rows_per_chunk(self, session: Pass, config: TraceConfig, target: Target) -> int: ...

    def logits(self, session: Pass, final: torch.Tensor, target: Target, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """The head's outputs for final states [S, C, T, D]; ``prompt`` [S, P, D]: the language model's corrupted
        prompt embeddings, which a Q-Former trace's downstream reads when the question is corrupted (InstructBLIP
        reads it twice); None: the clean prompt."""


def _text_layout(labels: list[str], stack: Any, config: TraceConfig) -> Layout:
    absent = stack.absent.get(config.kind, [])
    extra = {"absent_layers": absent} if absent else {}
    if is_head_kind(config.kind):
        layout = head_layout(labels, stack.heads, len(stack), config)
        return Layout(layout.labels, layout.cells, {**layout.extra, **extra})
    return Layout(labels, group_cells([[p] for p in range(len(labels))], len(stack), int(config.window)), extra)


def restored_positions(position: Any, labels: Sequence[str], text: bool) -> list[int]:
    """The positions a head map restores: every one (None), one, several, or a token role's (text blocks)."""
    count = len(labels)
    if position is None:
        return list(range(count))
    if isinstance(position, str):
        if not text:
            raise BlipTraceError("roles name question tokens: on the vision encoder pass position=0 for CLS, or "
                                 "patch positions from 1")
        picked = [p for p, role in enumerate(token_roles(list(labels))) if role == position]
        if not picked:
            raise BlipTraceError(f"no token of {' '.join(labels)!r} has the role {position!r}: pick positions instead")
        return picked
    picked = [position] if isinstance(position, int) else list(position)
    for p in picked:
        if not 0 <= p < count:
            raise BlipTraceError(f"position {p} is outside the {count} positions of this block (0 to {count - 1})")
    return picked


def head_layout(labels: Sequence[str], heads: int, layers: int, config: TraceConfig, text: bool = True) -> Layout:
    """Rows are heads ``h0``…; each cell restores one head at the chosen positions over a window of layers."""
    positions = restored_positions(config.position, labels, text)
    units = [[head_unit(h, p, len(labels)) for p in positions] for h in range(heads)]
    extra = {"restored_positions": positions, "restored_labels": [labels[p] for p in positions]}
    return Layout([f"h{h}" for h in range(heads)], group_cells(units, layers, int(config.window)), extra)


def _text_rows(session: Pass, config: TraceConfig, positions: int, cross_tokens: int, decoder_tokens: int,
               block: str = QUESTION_ENCODER) -> int:
    text = anatomy.block_config(session.model, block)
    vocab = anatomy.text_config(session.model).vocab_size
    return rows_per_chunk(
        samples=config.samples, tokens=positions, cross_tokens=cross_tokens, hidden=text.hidden_size,
        intermediate=anatomy.feed_forward_size(text), heads=text.num_attention_heads, vocab=vocab,
        decoder_tokens=decoder_tokens, element_size=session.bundle.working_itemsize,
        memory_budget=session.memory_budget, max_batch_rows=session.max_batch_rows,
    )


def _per_row_cross(stack: Any, j: int, states: torch.Tensor, s: int, c: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Cross keys and values at layer j when each of the S x C rows attends to its own states [S*C, N, D'] (None
    at a layer without cross-attention)."""
    kv = stack.cross_kv(j, states)
    if kv is None:
        return None
    k, v = kv
    return k.view(s, c, *k.shape[1:]), v.view(s, c, *v.shape[1:])


def _after_queries(queries: int, tokens: Sequence[str]) -> list[str]:
    """A language model's positions: the projected queries q0… (the image, as it reads it), then the tokens."""
    return [*(f"q{i}" for i in range(queries)), *tokens]


def _cross_rows(stack: Any, first: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """A decoder's final states [S, C, T, D] from its first states [1, T, D] when each row cross-attends to its own
    ``states`` [S, C, N, D'] (an encoder's output per row)."""
    s, c, n, d = states.shape
    flat = states.reshape(s * c, n, d)
    h = first[:, None].expand(s, c, -1, -1)
    mask = stack.self_mask(h.shape[2], h.dtype, h.device)
    for j in range(len(stack)):
        h = stack.layer(j, h, _per_row_cross(stack, j, flat, s, c), mask)
    return h


class AnswerDecoder:
    """VQA's answer decoder (``text_decoder.bert``): positions are [DEC] and the earlier answer tokens."""

    name: str = ANSWER_DECODER
    reads_target = True

    def __init__(self, model: torch.nn.Module) -> None:
        self.stack = TextStack(model, ANSWER_DECODER)
        self.head = anatomy.answer_head(model)

    def labels(self, session: Pass, target: Target) -> list[str]:
        return list(session.bundle.tokenizer.convert_ids_to_tokens(list(target.inputs)))

    def layout(self, session: Pass, config: TraceConfig, target: Target) -> Layout:
        return _text_layout(self.labels(session, target), self.stack, config)

    def cross_labels(self, session: Pass) -> list[str]:
        """What its cross-attention reads: the question's tokens."""
        return list(session.bundle.tokenizer.convert_ids_to_tokens(list(session.question_ids)))

    def run(self, session: Pass, question_states: torch.Tensor, target: Target) -> tuple[Run, Cross]:
        """The decoder's run [S, Td, D] on question states [S, T, D] (teacher-forced on the target)."""
        cross = shared_cross(self.stack, question_states)
        h0 = self.stack.embed(session.ids(target.inputs)).expand(question_states.shape[0], -1, -1)
        return record_run(self.stack, h0, cross), cross

    def clean_run(self, session: Pass, target: Target) -> Run:
        assert session.clean.text is not None
        return self.run(session, session.clean.text.output, target)[0]

    def clean_cross(self, session: Pass, target: Target) -> Cross:
        """Cross keys and values of the clean question states (what the clean run attends to)."""
        assert session.clean.text is not None
        return shared_cross(self.stack, session.clean.text.output)

    def corrupted_run(self, session: Pass, corrupted: Corrupted, target: Target) -> tuple[Run, Cross]:
        assert corrupted.text is not None
        return self.run(session, corrupted.text.output, target)

    def rows_per_chunk(self, session: Pass, config: TraceConfig, target: Target) -> int:
        return _text_rows(session, config, len(target.inputs), len(session.question_ids), len(target.inputs))

    def logits(self, session: Pass, final: torch.Tensor, target: Target, prompt: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(final)

    def decode_rows(self, session: Pass, question_states: torch.Tensor, target: Target) -> torch.Tensor:
        """Decoder logits [S, C, Td, V] when each row cross-attends to its own question states [S, C, T, D]."""
        return self.head(_cross_rows(self.stack, self.stack.embed(session.ids(target.inputs)), question_states))


class ImageReader(ABC):
    """A text block that cross-attends to the image embeddings; each head has one (see the module's notes)."""

    name: str
    reads_target = False

    def __init__(self, model: torch.nn.Module) -> None:
        self.stack = TextStack(model, self.name)

    def input_ids(self, session: Pass, target: Target) -> Sequence[int]:
        """The tokens this block reads."""
        return session.question_ids

    def labels(self, session: Pass, target: Target) -> list[str]:
        """Its positions' labels: the tokens it reads."""
        return list(session.bundle.tokenizer.convert_ids_to_tokens(list(self.input_ids(session, target))))

    def positions(self, session: Any) -> int:
        """How many positions its clean run has (the question's tokens)."""
        return len(session.question_ids)

    def first_states(self, session: Any) -> torch.Tensor:
        """Its input on the text alone, [1, T, D] (the question's or prompt's embeddings): what a corruption of the
        text corrupts."""
        return self.stack.embed(session.ids(session.question_ids))

    def input_states(self, session: Pass, target: Target) -> torch.Tensor:
        """Its input for ``target``, [1, T, D]."""
        return self.stack.embed(session.ids(self.input_ids(session, target)))

    def layout(self, session: Pass, config: TraceConfig, target: Target) -> Layout:
        return _text_layout(self.labels(session, target), self.stack, config)

    def clean_run(self, session: Pass, target: Target) -> Run:
        assert session.clean.text is not None
        return session.clean.text

    def clean_cross(self, session: Pass, target: Target) -> Cross:
        """Cross keys and values of the clean image embeddings."""
        return shared_cross(self.stack, session.clean.image_embeds)

    def corrupted_run(self, session: Pass, corrupted: Corrupted, target: Target) -> tuple[Run, Cross]:
        assert corrupted.text is not None
        return corrupted.text, corrupted.image_cross

    def rows_per_chunk(self, session: Pass, config: TraceConfig, target: Target) -> int:
        cross_tokens = int(session.clean.image_embeds.shape[1])
        positions = len(self.labels(session, target))
        return _text_rows(session, config, positions, cross_tokens, self.decoder_tokens(target), self.name)

    def decoder_tokens(self, target: Target) -> int:
        """Positions of any decoder run after this block, per row (for sizing chunks)."""
        return 0

    @abstractmethod
    def logits(self, session: Pass, final: torch.Tensor, target: Target, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """The head's outputs for this block's final states [S, C, T, D] (each reader has its own head)."""

    def encode_rows(self, session: Pass, image_embeds: torch.Tensor, target: Target) -> torch.Tensor:
        """This block's final states [S, C, T, D] when each row cross-attends to its own image embeddings
        [S, C, N, Dv]."""
        stack = self.stack
        s, c, n, dv = image_embeds.shape
        flat = image_embeds.reshape(s * c, n, dv)
        h = self.input_states(session, target)[:, None].expand(s, c, -1, -1)
        mask = stack.self_mask(h.shape[2], h.dtype, h.device)
        for j in range(len(stack)):
            h = stack.layer(j, h, _per_row_cross(stack, j, flat, s, c), mask)
        return h


class QuestionEncoder(ImageReader):
    """VQA's question encoder (``text_encoder``): positions are the question's tokens, [CLS] and [SEP] included."""

    name: str = QUESTION_ENCODER

    def __init__(self, model: torch.nn.Module, decoder: AnswerDecoder) -> None:
        super().__init__(model)
        self.decoder = decoder

    def decoder_tokens(self, target: Target) -> int:
        return len(target.inputs)

    def logits(self, session: Pass, final: torch.Tensor, target: Target, prompt: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder.decode_rows(session, final, target)


class ItmEncoder(ImageReader):
    """The image-text matcher's text encoder: positions are the text's tokens; the ITM head reads the first."""

    name: str = ITM_ENCODER

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.head = anatomy.itm_head(model)

    def logits(self, session: Pass, final: torch.Tensor, target: Target, prompt: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(final[..., 0, :])  # [S, C, 2]: (no match, match)


class CaptionDecoder(ImageReader):
    """The captioner's decoder: positions are [DEC], the prompt and the caption before the scored word."""

    name: str = CAPTION_DECODER
    reads_target = True

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.head = anatomy.answer_head(model)

    def input_ids(self, session: Pass, target: Target) -> Sequence[int]:
        return target.inputs

    def run(self, session: Pass, image_cross: Cross, samples: int, target: Target,
            prompt: torch.Tensor | None = None) -> Run:
        """The decoder's run over ``target.inputs``, its first positions replaced by ``prompt`` [S, P, D] if given
        (a corrupted prompt: the embeddings are per position, so the rest is as in the clean run)."""
        h0 = self.stack.embed(session.ids(target.inputs)).expand(samples, -1, -1)
        if prompt is not None:
            h0 = torch.cat([prompt.expand(samples, -1, -1), h0[:, prompt.shape[1]:]], 1)
        return record_run(self.stack, h0, image_cross)

    def clean_run(self, session: Pass, target: Target) -> Run:
        return self.run(session, shared_cross(self.stack, session.clean.image_embeds), 1, target)

    def corrupted_run(self, session: Pass, corrupted: Corrupted, target: Target) -> tuple[Run, Cross]:
        prompt = corrupted.prompt
        samples = int(corrupted.image_embeds.shape[0] if prompt is None else prompt.shape[0])
        return self.run(session, corrupted.image_cross, samples, target, prompt), corrupted.image_cross

    def logits(self, session: Pass, final: torch.Tensor, target: Target, prompt: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(final)


class LanguageModel:
    """BLIP-2's language model (OPT): positions are the projected queries q0… (the image, as the language model
    reads it), then the prompt and the answer before the scored token."""

    name: str = LANGUAGE_MODEL
    reads_target = True

    def __init__(self, model: torch.nn.Module) -> None:
        self.stack = language_model_stack(model)
        self.queries = self.stack.count

    def labels(self, session: Pass, target: Target) -> list[str]:
        return _after_queries(self.queries, session.bundle.tokenizer.convert_ids_to_tokens(list(target.inputs)))

    def layout(self, session: Pass, config: TraceConfig, target: Target) -> Layout:
        return _text_layout(self.labels(session, target), self.stack, config)

    def run(self, session: Pass, query_states: torch.Tensor, target: Target, projected: bool = False,
            prompt: torch.Tensor | None = None) -> tuple[Run, Cross]:
        """The language model's run [S, Q + T, D] on Q-Former outputs [S, Q, Dq] (``projected``: [S, Q, D]),
        teacher-forced on the target; ``prompt`` [S, P, D] replaces the first P tokens' embeddings."""
        cross = [None] * len(self.stack)
        h0 = self.stack.embed(query_states, session.ids(target.inputs), projected, prompt)
        return record_run(self.stack, h0, cross), cross

    def prompt_states(self, session: Pass, ids: Sequence[int]) -> torch.Tensor:
        """The token embeddings [1, P, D] of prompt tokens ``ids`` (what a corrupted question corrupts)."""
        return self.stack.tokens(session.ids(ids))

    def clean_run(self, session: Pass, target: Target) -> Run:
        assert session.clean.text is not None
        return self.run(session, session.clean.text.output, target)[0]

    def clean_cross(self, session: Pass, target: Target) -> Cross:
        return [None] * len(self.stack)

    def corrupted_run(self, session: Pass, corrupted: Corrupted, target: Target) -> tuple[Run, Cross]:
        assert corrupted.text is not None
        return self.run(session, corrupted.text.output, target, corrupted.projected, corrupted.prompt)

    def rows_per_chunk(self, session: Pass, config: TraceConfig, target: Target) -> int:
        return _text_rows(session, config, len(self.labels(session, target)), 0, 1, LANGUAGE_MODEL)

    def logits(self, session: Pass, final: torch.Tensor, target: Target, prompt: torch.Tensor | None = None) -> torch.Tensor:
        return self.stack.logits(final)

    def decode_rows(self, session: Pass, query_states: torch.Tensor, target: Target,
                    prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [S, C, Q + T, V] when each row reads its own Q-Former outputs [S, C, Q, Dq] (and ``prompt`` [S, P, D],
        the corrupted prompt's embeddings, in place of the prompt's)."""
        stack = self.stack
        h = stack.embed(query_states, session.ids(target.inputs), prompt=prompt)
        mask = stack.self_mask(h.shape[2], h.dtype, h.device)
        for j in range(len(stack)):
            h = stack.layer(j, h, None, mask)
        return stack.logits(h)

    def generate(self, session: Any, query_states: torch.Tensor, start: Sequence[int], limit: int,
                 stop: Sequence[int]) -> list[int]:
        """Greedy decoding after ``start`` on Q-Former outputs [1, Q, Dq], until a ``stop`` token, at most ``limit``
        new tokens: the tokens after ``start``."""
        ids = [int(i) for i in start]
        for _ in range(limit):
            logits = self.decode_rows(session, query_states[:, None], Target(tuple(ids)))
            token = int(logits[0, 0, -1].argmax())
            if token in stop:
                break
            ids.append(token)
        return ids[len(start):]


class LanguageDecoder:
    """A Flan-T5 language model's decoder: positions are the decoder's start token and the answer before the scored
    token; it cross-attends to the encoder's output (the projected queries and the prompt, encoded)."""

    name: str = LM_DECODER
    reads_target = True

    def __init__(self, model: torch.nn.Module) -> None:
        self.stack = T5Stack(model, LM_DECODER)
        self.encoder = T5Stack(model, LM_ENCODER)  # to encode the Q-Former's outputs (LanguageEncoder traces it)
        self.queries = self.encoder.count  # the image's positions of what it cross-attends to

    def labels(self, session: Pass, target: Target) -> list[str]:
        return list(session.bundle.tokenizer.convert_ids_to_tokens(list(target.inputs)))

    def cross_labels(self, session: Pass) -> list[str]:
        """What its cross-attention reads: the encoder's positions, the queries q0… then the prompt."""
        return _after_queries(self.queries, session.bundle.tokenizer.convert_ids_to_tokens(list(session.question_ids)))

    def layout(self, session: Pass, config: TraceConfig, target: Target) -> Layout:
        return _text_layout(self.labels(session, target), self.stack, config)

    def encode(self, session: Pass, query_states: torch.Tensor, projected: bool = False,
               prompt: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output [..., Q + T, D] for Q-Former outputs [..., Q (+ T'), Dq] (``projected``: the
        queries at the language model's width) and the prompt (``prompt``: its embeddings [S, T, D], corrupted)."""
        h = self.encoder.embed(query_states, session.ids(session.question_ids), projected, prompt)
        if h.dim() == 3:
            h = h[:, None]
        mask = self.encoder.self_mask(h.shape[-2], h.dtype, h.device)
        for j in range(len(self.encoder)):
            h = self.encoder.layer(j, h, None, mask)
        return self.encoder.output(h if query_states.dim() == 4 else h[:, 0])

    def run(self, session: Pass, encoded: torch.Tensor, target: Target) -> tuple[Run, Cross]:
        """The decoder's run [S, Td, D] on the encoder's output [S, N, D] (teacher-forced on the target)."""
        cross = shared_cross(self.stack, encoded)
        h0 = self.stack.embed_tokens(session.ids(target.inputs)).expand(encoded.shape[0], -1, -1)
        return record_run(self.stack, h0, cross), cross

    def clean_run(self, session: Pass, target: Target) -> Run:
        return self.run(session, self.encode(session, session.clean.text.output), target)[0]

    def clean_cross(self, session: Pass, target: Target) -> Cross:
        return shared_cross(self.stack, self.encode(session, session.clean.text.output))

    def corrupted_run(self, session: Pass, corrupted: Corrupted, target: Target) -> tuple[Run, Cross]:
        assert corrupted.text is not None
        encoded = self.encode(session, corrupted.text.output, corrupted.projected, corrupted.prompt)
        return self.run(session, encoded, target)

    def prompt_states(self, session: Pass, ids: Sequence[int]) -> torch.Tensor:
        """The token embeddings [1, P, D] of prompt tokens ``ids`` (what a corrupted question corrupts)."""
        return self.encoder.tokens(session.ids(ids))

    def rows_per_chunk(self, session: Pass, config: TraceConfig, target: Target) -> int:
        encoded = self.encoder.count + len(session.question_ids)
        return _text_rows(session, config, len(target.inputs), encoded, len(target.inputs), LM_DECODER)

    def logits(self, session: Pass, final: torch.Tensor, target: Target, prompt: torch.Tensor | None = None) -> torch.Tensor:
        return self.stack.logits(final)

    def decode_rows(self, session: Pass, encoded: torch.Tensor, target: Target) -> torch.Tensor:
        """Logits [S, C, Td, V] when each row cross-attends to its own encoder output [S, C, N, D]."""
        return self.stack.logits(_cross_rows(self.stack, self.stack.embed_tokens(session.ids(target.inputs)), encoded))

    def generate(self, session: Any, query_states: torch.Tensor, start: Sequence[int], limit: int,
                 stop: Sequence[int]) -> list[int]:
        """Greedy decoding after ``start`` (the decoder's start token) on Q-Former outputs [1, Q, Dq], until a
        ``stop`` token, at most ``limit`` new tokens: the tokens after ``start``."""
        encoded = self.encode(session, query_states)[:, None]
        ids = [int(i) for i in start]
        for _ in range(limit):
            token = int(self.decode_rows(session, encoded, Target(tuple(ids)))[0, 0, -1].argmax())
            if token in stop:
                break
            ids.append(token)
        return ids[len(start):]


class LanguageEncoder:
    """A Flan-T5 language model's encoder: positions are the projected queries q0… (the image, as the language model
    reads it), then the prompt; the decoder reads its output."""

    name: str = LM_ENCODER
    reads_target = True  # its runs do not depend on the target, but are made per trace: cached as a decoder's are

    def __init__(self, model: torch.nn.Module, decoder: LanguageDecoder) -> None:
        self.stack = T5Stack(model, LM_ENCODER)
        self.decoder = decoder
        self.queries = self.stack.count

    def labels(self, session: Pass, target: Target) -> list[str]:
        return _after_queries(self.queries, session.bundle.tokenizer.convert_ids_to_tokens(list(session.question_ids)))

    def layout(self, session: Pass, config: TraceConfig, target: Target) -> Layout:
        return _text_layout(self.labels(session, target), self.stack, config)

    def run(self, session: Pass, query_states: torch.Tensor, projected: bool = False,
            prompt: torch.Tensor | None = None) -> tuple[Run, Cross]:
        """The encoder's run [S, Q + T, D] on Q-Former outputs [S, Q, Dq] (``projected``: [S, Q, D]; ``prompt``: the
        prompt's embeddings [S, T, D], corrupted)."""
        cross = [None] * len(self.stack)
        h0 = self.stack.embed(query_states, session.ids(session.question_ids), projected, prompt)
        return record_run(self.stack, h0, cross), cross

    def clean_run(self, session: Pass, target: Target) -> Run:
        return self.run(session, session.clean.text.output)[0]

    def clean_cross(self, session: Pass, target: Target) -> Cross:
        return [None] * len(self.stack)

    def corrupted_run(self, session: Pass, corrupted: Corrupted, target: Target) -> tuple[Run, Cross]:
        assert corrupted.text is not None
        return self.run(session, corrupted.text.output, corrupted.projected, corrupted.prompt)

    def rows_per_chunk(self, session: Pass, config: TraceConfig, target: Target) -> int:
        return _text_rows(session, config, len(self.labels(session, target)), 0, len(target.inputs), LM_ENCODER)

    def logits(self, session: Pass, final: torch.Tensor, target: Target, prompt: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder.decode_rows(session, self.stack.output(final), target)

    def decode_rows(self, session: Pass, query_states: torch.Tensor, target: Target,
                    prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [S, C, Td, V] when each row reads its own Q-Former outputs [S, C, Q, Dq] (and ``prompt``, as the
        OPT language model's :meth:`LanguageModel.decode_rows` reads it)."""
        return self.decoder.decode_rows(session, self.decoder.encode(session, query_states, prompt=prompt), target)


class QFormer(ImageReader):
    """BLIP-2's Q-Former: positions are its learned queries q0…, which cross-attend to the image embeddings; the
    language model reads its outputs."""

    name: str = QFORMER

    def __init__(self, model: torch.nn.Module, decoder: LanguageModel | LanguageEncoder) -> None:
        self.stack: QFormerStack = QFormerStack(model)
        self.decoder = decoder

    def positions(self, session: Any) -> int:
        return self.stack.count + len(session.instruction_ids)

    def labels(self, session: Pass, target: Target) -> list[str]:
        queries = [f"q{i}" for i in range(self.stack.count)]
        if not session.instruction_ids:
            return queries
        tokenizer = session.bundle.processor.qformer_tokenizer
        return [*queries, *tokenizer.convert_ids_to_tokens(list(session.instruction_ids))]

    def layout(self, session: Pass, config: TraceConfig, target: Target) -> Layout:
        """As any text block's; an instruction's positions never cross-attend, so their cross kinds are n/a."""
        layout = _text_layout(self.labels(session, target), self.stack, config)
        if not session.instruction_ids or config.kind != "cross_attn":
            return layout
        rows = list(range(self.stack.count, self.positions(session)))
        return Layout(layout.labels, layout.cells, {**layout.extra, "absent_positions": rows})

    def first_states(self, session: Any) -> torch.Tensor:
        return self.stack.queries(session.ids(session.instruction_ids))

    def input_states(self, session: Pass, target: Target) -> torch.Tensor:
        return self.first_states(session)

    def decoder_tokens(self, target: Target) -> int:
        return len(target.inputs) + self.decoder.queries

    def logits(self, session: Pass, final: torch.Tensor, target: Target, prompt: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder.decode_rows(session, final, target, prompt)


class VisionEncoder:
    """The vision encoder (a pre-LN ViT): positions are CLS and the patches, or regions of patches."""

    name: str = VISION_ENCODER
    reads_target = False

    def __init__(self, model: torch.nn.Module, reader: ImageReader) -> None:
        self.stack = VisionStack(model)
        self.reader = reader
        self.projections = anatomy.projections(model)

    def labels(self, session: Pass, target: Target) -> list[str]:
        """Its positions: CLS and each patch, by row and column."""
        side = patch_grid_size(int(session.clean.image_embeds.shape[1]))
        return ["[CLS]", *(f"p{r}c{c}" for r in range(side) for c in range(side))]

    def layout(self, session: Pass, config: TraceConfig, target: Target) -> Layout:
        side = patch_grid_size(int(session.clean.image_embeds.shape[1]))
        if is_head_kind(config.kind):
            return head_layout(self.labels(session, target), self.stack.heads, len(self.stack), config, text=False)
        grid = region_grid(side, config.regions)
        extra = {"grid": {"patches_per_side": side, "regions_per_side": config.regions or side,
                          "boxes": [list(g.box) if g.box else None for g in grid]}}
        return Layout([g.label for g in grid], group_cells([g.tokens for g in grid], len(self.stack), int(config.window)),
                      extra)

    def clean_run(self, session: Pass, target: Target) -> Run:
        return session.clean_vision

    def clean_cross(self, session: Pass, target: Target) -> Cross:
        return [None] * len(self.stack)

    def corrupted_run(self, session: Pass, corrupted: Corrupted, target: Target) -> tuple[Run, Cross]:
        if corrupted.vision is None:
            raise BlipTraceError(
                "restoring vision-encoder states needs a corruption before the vision encoder: "
                "use corrupt='patches' or corrupt='pixels'")
        return corrupted.vision, [None] * len(self.stack)

    def rows_per_chunk(self, session: Pass, config: TraceConfig, target: Target) -> int:
        vision, text = anatomy.vision_config(session.model), anatomy.block_config(session.model, self.reader.name)
        return vision_rows_per_chunk(
            samples=config.samples, patches=int(session.clean.image_embeds.shape[1]), vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size, vision_heads=vision.num_attention_heads,
            tokens=len(self.reader.labels(session, target)),
            text_hidden=text.hidden_size, text_intermediate=anatomy.feed_forward_size(text),
            text_heads=text.num_attention_heads, element_size=session.bundle.working_itemsize,
            memory_budget=session.memory_budget, max_batch_rows=session.max_batch_rows,
        )

    def logits(self, session: Pass, final: torch.Tensor, target: Target, prompt: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.stack.post_norm(final)
        if target.readout == "itc":
            return self.itc(session, embeds)
        return self.reader.logits(session, self.reader.encode_rows(session, embeds, target), target)

    def itc(self, session: Pass, image_embeds: torch.Tensor) -> torch.Tensor:
        """ITC cosine similarity [...] of image embeddings [..., N, D] with the text (BLIP's projections of
        the image's first state and of the text encoder's first state, the text read without the image)."""
        if self.projections is None:
            raise BlipTraceError("this checkpoint has no ITC projections (vision_proj, text_proj): use metric='prob'")
        image_feature = torch.nn.functional.normalize(self.projections[0](image_embeds[..., 0, :]), dim=-1)
        return (image_feature * session.itc_text_feature(self.projections[1]).to(image_feature.dtype)).sum(-1)


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
    chain = [block for block in task.blocks if block != VISION_ENCODER]  # the reader first, the last block last
    built: list[Any] = [BLOCK_CLASSES[chain[-1]](model)]
    for name in reversed(chain[:-1]):
        built.insert(0, BLOCK_CLASSES[name](model, built[0]))
    return Blocks(task.name, built[0], built[-1], VisionEncoder(model, built[0]), tuple(built[1:-1]))
