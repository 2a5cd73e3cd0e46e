"""What every traced block is: the protocol, the frozen clean :class:`Context` blocks read, the corrupted run
they are handed, their :class:`Layout` of rows and cells, and the helpers text blocks share.

    >>> from blip_trace_widgets.causal_trace.blocks.base import restored_positions
    >>> restored_positions(None, ["[CLS]", "what", "color"], True)
    [0, 1, 2]

A block says what its positions are, how its clean and corrupted runs are made (from the tracer's shared clean
pass and corrupted input), how many rows fit a chunk, and how its final states become the head's outputs. The
tracer does the rest: cache, cells, chunks, staircase, score, result. Each block's :meth:`Block.logits` runs
the blocks after it, so restoring a vision state reaches the score through every text transformer after it.

Every head has one *reader*, the text block that cross-attends to the image embeddings:

* VQA: vision encoder → question encoder (the reader) → answer decoder (cross-attending to the question);
* captioning: vision encoder → caption decoder (the reader; its outputs are the caption's next tokens);
* image-text matching: vision encoder → ITM encoder (the reader; the ITM head reads its first state);
* BLIP-2: vision encoder → Q-Former (the reader: learned queries cross-attend to the image) → language model
  (it reads the Q-Former's outputs, projected, before the prompt).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from ...core.errors import BlipTraceError
from ...core.names import BLOCK_FACTS, QUESTION_ENCODER, BlockFacts, is_head_kind
from ...core.roles import token_roles
from ...core.scoring import Target
from ...models import anatomy
from ...models.attention import Cell, head_unit
from ...models.blip.stacks import TextStack
from ...models.chunks import rows_per_chunk
from ...models.runs import Run, group_cells, shared_cross


class Settings(Protocol):
    """What blocks and corruption stages read of a trace's configuration (a :class:`~..config.TraceConfig`)."""

    @property
    def kind(self) -> str: ...
    @property
    def window(self) -> int: ...
    @property
    def position(self) -> Any: ...
    @property
    def regions(self) -> Any: ...
    @property
    def samples(self) -> Any: ...
    @property
    def corrupt(self) -> str | None: ...
    @property
    def corrupt_tokens(self) -> Any: ...
    @property
    def corruption(self) -> Any: ...
    @property
    def direction(self) -> str: ...


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


class Facts:
    """What a traced block is, asked of the block itself (``block.image_side``): its class's row of
    :data:`~blip_trace_widgets.core.names.BLOCK_FACTS`, found by the ``name`` the class sets when it is made."""

    name: str
    facts: ClassVar[BlockFacts]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # an abstract base (ImageReader) names no block
            cls.facts = BLOCK_FACTS[cls.name]

    @property
    def image_side(self) -> bool:
        """Whether its positions are the image's (CLS and the patches) rather than tokens."""
        return self.facts.image_side

    @property
    def default_stage(self) -> str:
        """The corruption stage its traces default to."""
        return self.facts.default_stage


class Block(Protocol):
    """What the tracer needs from a block (each class is a :class:`Facts` too: ``block.image_side``)."""

    name: str
    facts: ClassVar[BlockFacts]
    stack: Any  # a Stack: TextStack or VisionStack
    #: Whether its runs are made per target (they read the target's tokens, as a decoder's do, or are made per
    #: trace, as T5's encoder's are) and kept per target; else made once per corrupted draw.
    runs_per_target: bool

    @property
    def image_side(self) -> bool: ...

    @property
    def default_stage(self) -> str: ...

    def layout(self, context: Context, config: Settings, target: Target) -> Layout: ...

    def labels(self, context: Context, target: Target) -> list[str]: ...

    def clean_run(self, context: Context, target: Target) -> Run: ...

    def corrupted_run(self, context: Context, corrupted: Corrupted, target: Target) -> tuple[Run, Cross]: ...

    def clean_cross(self, context: Context, target: Target) -> Cross: ...

    def rows_per_chunk(self, context: Context, config: Settings, target: Target) -> int: ...

    def logits(self, context: Context, final: torch.Tensor, target: Target, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """The head's outputs for final states [S, C, T, D]; ``prompt`` [S, P, D]: the language model's corrupted
        prompt embeddings, which a Q-Former trace's downstream reads when the question is corrupted (InstructBLIP
        reads it twice); None: the clean prompt."""


def text_layout(labels: list[str], stack: Any, config: Settings) -> Layout:
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


def head_layout(labels: Sequence[str], heads: int, layers: int, config: Settings, text: bool = True) -> Layout:
    """Rows are heads ``h0``…; each cell restores one head at the chosen positions over a window of layers."""
    positions = restored_positions(config.position, labels, text)
    units = [[head_unit(h, p, len(labels)) for p in positions] for h in range(heads)]
    extra = {"restored_positions": positions, "restored_labels": [labels[p] for p in positions]}
    return Layout([f"h{h}" for h in range(heads)], group_cells(units, layers, int(config.window)), extra)


def text_rows(context: Context, config: Settings, positions: int, cross_tokens: int, decoder_tokens: int,
               block: str = QUESTION_ENCODER) -> int:
    text = anatomy.block_config(context.model, block)
    vocab = anatomy.text_config(context.model).vocab_size
    return rows_per_chunk(
        samples=config.samples, tokens=positions, cross_tokens=cross_tokens, hidden=text.hidden_size,
        intermediate=anatomy.feed_forward_size(text), heads=text.num_attention_heads, vocab=vocab,
        decoder_tokens=decoder_tokens, element_size=context.bundle.working_itemsize,
        memory_budget=context.memory_budget, max_batch_rows=context.max_batch_rows,
    )


def per_row_cross(stack: Any, j: int, states: torch.Tensor, s: int, c: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Cross keys and values at layer j when each of the S x C rows attends to its own states [S*C, N, D'] (None
    at a layer without cross-attention)."""
    kv = stack.cross_kv(j, states)
    if kv is None:
        return None
    k, v = kv
    return k.view(s, c, *k.shape[1:]), v.view(s, c, *v.shape[1:])


def after_queries(queries: int, tokens: Sequence[str]) -> list[str]:
    """A language model's positions: the projected queries q0… (the image, as it reads it), then the tokens."""
    return [*(f"q{i}" for i in range(queries)), *tokens]


def cross_rows(stack: Any, first: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """A decoder's final states [S, C, T, D] from its first states [1, T, D] when each row cross-attends to its own
    ``states`` [S, C, N, D'] (an encoder's output per row)."""
    s, c, n, d = states.shape
    flat = states.reshape(s * c, n, d)
    h = first[:, None].expand(s, c, -1, -1)
    mask = stack.self_mask(h.shape[2], h.dtype, h.device)
    for j in range(len(stack)):
        h = stack.layer(j, h, per_row_cross(stack, j, flat, s, c), mask)
    return h


class ImageReader(Facts, ABC):
    """A text block that cross-attends to the image embeddings; each head has one (see the module's notes)."""

    name: str
    runs_per_target = False

    def __init__(self, model: torch.nn.Module) -> None:
        self.stack = TextStack(model, self.name)

    def input_ids(self, context: Context, target: Target) -> Sequence[int]:
        """The tokens this block reads."""
        return context.question_ids

    def labels(self, context: Context, target: Target) -> list[str]:
        """Its positions' labels: the tokens it reads."""
        return list(context.bundle.tokenizer.convert_ids_to_tokens(list(self.input_ids(context, target))))

    def positions(self, context: Any) -> int:
        """How many positions its clean run has (the question's tokens)."""
        return len(context.question_ids)

    def first_states(self, context: Any) -> torch.Tensor:
        """Its input on the text alone, [1, T, D] (the question's or prompt's embeddings): what a corruption of the
        text corrupts."""
        return self.stack.embed(context.ids(context.question_ids))

    def input_states(self, context: Context, target: Target) -> torch.Tensor:
        """Its input for ``target``, [1, T, D]."""
        return self.stack.embed(context.ids(self.input_ids(context, target)))

    def layout(self, context: Context, config: Settings, target: Target) -> Layout:
        return text_layout(self.labels(context, target), self.stack, config)

    def clean_run(self, context: Context, target: Target) -> Run:
        assert context.clean.text is not None
        return context.clean.text

    def clean_cross(self, context: Context, target: Target) -> Cross:
        """Cross keys and values of the clean image embeddings."""
        return shared_cross(self.stack, context.clean.image_embeds)

    def corrupted_run(self, context: Context, corrupted: Corrupted, target: Target) -> tuple[Run, Cross]:
        assert corrupted.text is not None
        return corrupted.text, corrupted.image_cross

    def rows_per_chunk(self, context: Context, config: Settings, target: Target) -> int:
        cross_tokens = int(context.clean.image_embeds.shape[1])
        positions = len(self.labels(context, target))
        return text_rows(context, config, positions, cross_tokens, self.decoder_tokens(target), self.name)

    def decoder_tokens(self, target: Target) -> int:
        """Positions of any decoder run after this block, per row (for sizing chunks)."""
        return 0

    @abstractmethod
    def logits(self, context: Context, final: torch.Tensor, target: Target, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """The head's outputs for this block's final states [S, C, T, D] (each reader has its own head)."""

    def encode_rows(self, context: Context, image_embeds: torch.Tensor, target: Target) -> torch.Tensor:
        """This block's final states [S, C, T, D] when each row cross-attends to its own image embeddings
        [S, C, N, Dv]."""
        stack = self.stack
        s, c, n, dv = image_embeds.shape
        flat = image_embeds.reshape(s * c, n, dv)
        h = self.input_states(context, target)[:, None].expand(s, c, -1, -1)
        mask = stack.self_mask(h.shape[2], h.dtype, h.device)
        for j in range(len(stack)):
            h = stack.layer(j, h, per_row_cross(stack, j, flat, s, c), mask)
        return h
