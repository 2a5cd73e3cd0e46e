"""BLIP-2's and InstructBLIP's own corruptions: the question where they read it (the language model's prompt, and
InstructBLIP's Q-Former instruction), and the Q-Former's output queries (before or after their projection).

    >>> from blip_trace_widgets import demo_samples, load_model, trace
    >>> image, question, _ = demo_samples()[0]
    >>> result = trace(load_model("demo-blip2"), image, question, block="language_model", corrupt="question",
    ...                samples=2)
    >>> result.config["corrupt"], result.low_score < result.high_score
    ('question', True)

BLIP reads its question in the question encoder, whose input a ``corrupt="question"`` trace corrupts. BLIP-2 reads
it only in its language model's prompt ("Question: {q} Answer:", after the image's queries): the corruption acts on
the prompt's token embeddings (OPT adds its positions after them; T5 adds none), at the positions
``corrupt_tokens`` names (every prompt token by default) or where a word swap changes a token. InstructBLIP reads
the question twice, as its Q-Former's instruction too, and that copy is corrupted with it: every instruction token,
the object's (``corrupt_tokens="object"``), or where the swap changes a token of the Q-Former's own tokenizer. Its
Q-Former input is corrupted after its embedding LayerNorm, as BLIP's question encoder input is.

``corrupt="queries"`` corrupts the Q-Former's output queries, what the language model reads; ``"projected"`` the same
after the language model's projection, its image tokens.
"""
from __future__ import annotations

from typing import Any

import torch

from ..core.errors import BlipTraceError
from ..core.names import QFORMER
from ..core.roles import last_content_word
from ..corruptions.kinds import WordSwap
from ..models.runs import record_run, shared_cross
from .blocks.base import Corrupted
from .blocks.blip2 import QFormer
from .config import TraceConfig


def reads_prompt(session: Any) -> bool:
    """Whether the model reads its question in a language model's prompt (BLIP-2, InstructBLIP)."""
    return hasattr(session.blocks.last, "prompt_states")


def prompt_embedding(session: Any) -> Any:
    """``ids -> [1, P, D]``: the language model's token embeddings of a prompt's token ids."""
    last = session.blocks.last
    return lambda ids: last.prompt_states(session.context, ids)


def corrupted_question(runs: Any, config: TraceConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw of the corrupted question: the language model's prompt embeddings [S, P, D], and the Q-Former's
    input [S, Q (+ I), Dq] (InstructBLIP's instruction corrupted too; BLIP-2's queries as they are)."""
    session, samples = runs.session, int(config.samples)
    clean = prompt_embedding(session)(session.question_ids)
    positions = runs.corrupt_positions(config)
    noisy = runs.corrupt_input(config, clean, generator)
    prompt = clean.expand(samples, -1, -1).clone()
    prompt[:, positions] = noisy[:, positions]
    queries = session.blocks.reader.first_states(session)
    if session.instruction_ids:
        return prompt, _corrupted_instruction(runs, config, queries, generator)
    return prompt, queries.expand(samples, -1, -1)


def _corrupted_instruction(runs: Any, config: TraceConfig, clean: torch.Tensor,
                           generator: torch.Generator) -> torch.Tensor:
    """InstructBLIP's Q-Former input [S, Q + I, Dq] with its instruction's copy of the question corrupted."""
    session, samples = runs.session, int(config.samples)
    stack = session.blocks.reader.stack
    first = stack.count  # the instruction follows the queries
    ids = list(session.instruction_ids)
    corruption = config.corruption
    if isinstance(corruption, WordSwap):
        bound = corruption.bind(session.bundle.processor.qformer_tokenizer, session.question, ids,
                                lambda swapped: stack.queries(session.ids(swapped))[:, first:],
                                lambda text: list(session.task.instruction(session.bundle, text)), what=session.task.text)
        assert bound.ids is not None
        positions = [p for p, (a, b) in enumerate(zip(ids, bound.ids)) if a != b]
        noisy = bound(clean[:, first:], samples, generator)
    else:
        positions = _instruction_positions(session, config, ids)
        noisy = runs.corrupt_input(config, clean[:, first:], generator)
    out = clean.expand(samples, -1, -1).clone()
    out[:, [first + p for p in positions]] = noisy[:, positions]
    return out


def _instruction_positions(session: Any, config: TraceConfig, ids: list[int]) -> list[int]:
    """The instruction positions ``config.corrupt_tokens`` names: all, or (``"object"``) the object's tokens."""
    if config.corrupt_tokens is None:
        return list(range(len(ids)))
    if config.corrupt_tokens == "object":
        positions = last_content_word(session.bundle.processor.qformer_tokenizer.convert_ids_to_tokens(ids))
        if positions:
            return list(positions)
    raise BlipTraceError("InstructBLIP reads the question twice (its Q-Former's instruction and the language "
                         "model's prompt, in two tokenizations), so corrupt_tokens positions are ambiguous: corrupt "
                         "every token (no corrupt_tokens), corrupt_tokens='object', or a WordSwap")


def queries_of(session: Any, image_embeds: torch.Tensor) -> torch.Tensor:
    """The Q-Former's output queries for image embeddings [1, N, D]: what the language model reads."""
    reader = session.blocks.reader
    run = record_run(reader.stack, reader.first_states(session), shared_cross(reader.stack, image_embeds))
    return language_model_queries(session, run.output)


def clean_queries(session: Any, stage: str) -> torch.Tensor:
    """The clean queries that ``stage`` corrupts: the Q-Former's output queries [1, Q, Dq], or (``"projected"``) the
    same projected to the language model's width [1, Q, D], its image tokens."""
    queries = language_model_queries(session, session.reader_output)
    return project(session, queries) if stage == "projected" else queries


def project(session: Any, queries: torch.Tensor) -> torch.Tensor:
    """Q-Former output queries [1, Q, Dq] at the language model's width, as it reads them."""
    return session.blocks.last.stack.projection(queries)


def language_model_queries(session: Any, states: torch.Tensor) -> torch.Tensor:
    """Of the Q-Former's output states [1, Q (+ T), D], the queries' (InstructBLIP's instruction outputs are not read
    by the language model, so noise there would change nothing)."""
    reader = session.blocks.reader
    assert isinstance(reader, QFormer), "only a Q-Former's outputs are queries"
    return states[:, : reader.stack.count]


def downstream_prompt(runs: Any, block: Any, config: TraceConfig, corrupted: Corrupted | None = None) -> Any:
    """The corrupted prompt embeddings [S, P, D] that the language model reads after a Q-Former trace's restored
    states, when the question is corrupted and the trace denoises (InstructBLIP reads the question twice, and its
    Q-Former's restoration leaves the prompt's copy corrupted); None otherwise (the clean prompt)."""
    if config.corrupt != "question" or config.direction == "noise" or block.name != QFORMER:
        return None
    return (corrupted if corrupted is not None else runs.corrupted(config)).prompt
