"""Where a corruption acts, one class per stage: what it corrupts, how one draw's corrupted runs are made, the
noise level it starts from, and the settings it refuses.

    >>> from blip_trace_widgets import demo_samples, load_model, trace
    >>> from blip_trace_widgets.causal_trace import stages
    >>> [stage.name for stage in stages.BY_NAME.values()]
    ['image', 'patches', 'pixels', 'question', 'queries', 'projected']
    >>> stages.of("patches").before_vision, stages.of("question").text
    (True, True)
    >>> image, question, _ = demo_samples()[0]
    >>> result = trace(load_model("demo-blip2"), image, question, block="language_model", corrupt="question",
    ...                samples=2)
    >>> result.config["corrupt"], result.low_score < result.high_score
    ('question', True)

* ``image``: the vision encoder's output, the image embeddings every text block cross-attends to (the paper's).
* ``patches`` and ``pixels``: the vision encoder's input, before or after its patch embedding; its corrupted run is
  recorded, so restoring a vision-encoder state can undo the corruption, and a region picks patches or pixels.
* ``question``: the question's token embeddings (ROME's own choice), at the positions ``corrupt_tokens`` names or
  where a word swap changes a token. BLIP reads its question in the question encoder. BLIP-2 reads it only in its
  language model's prompt ("Question: {q} Answer:", after the image's queries): the corruption acts on the prompt's
  token embeddings (OPT adds its positions after them; T5 adds none). InstructBLIP reads the question twice, as its
  Q-Former's instruction too, and that copy is corrupted with it: every instruction token, the object's
  (``corrupt_tokens="object"``), or where the swap changes a token of the Q-Former's own tokenizer. Its Q-Former
  input is corrupted after its embedding LayerNorm, as BLIP's question encoder input is.
* ``queries``: the Q-Former's output queries, what BLIP-2's language model reads; ``projected``: the same after the
  language model's projection, its image tokens.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ..core.errors import BlipTraceError
from ..core.names import QFORMER, ROME_NOISE_SCALE, STAGE_LABELS, STAGES, BlockFacts, facts
from ..core.names import Stage as StageName
from ..core.roles import last_content_word
from ..corruptions.kinds import GaussianNoise, ImageSwap, WordSwap
from ..models.runs import Run, record_run, shared_cross
from .blocks.base import Corrupted, Settings


class Stage(ABC):
    """One place a corruption acts."""

    name: ClassVar[StageName]
    #: It corrupts the vision encoder's input: the vision encoder's corrupted run is recorded, restoring its states
    #: can undo the corruption, and a region picks patches or pixels.
    before_vision: ClassVar[bool] = False
    #: It corrupts the text (the question's tokens): an image pair cannot replace it, ``corrupt_tokens`` picks
    #: positions, and a map records the positions it corrupted.
    text: ClassVar[bool] = False
    #: It corrupts what BLIP-2's Q-Former outputs: only a model with one has it, and only its language model's
    #: restored states can undo it.
    after_queries: ClassVar[bool] = False

    @property
    def label(self) -> str:
        return STAGE_LABELS[self.name]

    def __repr__(self) -> str:
        return f"stages.of({self.name!r})"

    def default_corruption(self, bundle: Any) -> GaussianNoise:
        """The Gaussian noise a trace corrupting this stage starts from: ROME's 3σ (the image embeddings take the
        model folder's ``noise_scale``, from its ``trace_defaults.json``)."""
        return GaussianNoise(ROME_NOISE_SCALE)

    def check_corruption(self, corruption: Any) -> None:
        """Refuse a corruption that cannot act here (every stage but the question's takes an image pair)."""
        return None

    def check(self, corruption: Any, tokens: Any) -> None:
        """Refuse what this stage cannot do, whatever the model: a region on a stage without patches, question
        positions on a stage without a question."""
        if getattr(corruption, "region", None) is not None and not self.before_vision:
            raise BlipTraceError(
                f"a region picks image patches or pixels, but this corruption acts on the {self.name}: use "
                "corrupt='patches' or corrupt='pixels', or corrupt_tokens=... to pick question tokens")
        if tokens is not None and not self.text:
            raise BlipTraceError("corrupt_tokens chooses question tokens: use it with corrupt='question'")

    def check_model(self, head: Any, block: BlockFacts) -> None:
        """Refuse what this stage cannot do on ``head``'s model, traced at ``block``."""
        if self.after_queries and not head.has_queries:
            raise BlipTraceError(f"corrupt={self.name!r} is noise on BLIP-2's Q-Former outputs: this model has none; "
                                 "corrupt the image, the patches, the pixels or the question")
        if self.after_queries and not block.language_model:
            blocks = " or ".join(repr(b) for b in head.blocks if facts(b).language_model)
            raise BlipTraceError(f"corrupt={self.name!r}, noise on the queries, acts after every block but the "
                                 f"language model, so restoring them undoes nothing: trace block={blocks}, or corrupt "
                                 "the image")

    @abstractmethod
    def clean_input(self, clean_pass: Any) -> torch.Tensor:
        """The clean tensor this stage's corruption perturbs, [1, ...]."""

    @abstractmethod
    def other_image(self, clean_pass: Any) -> Callable[[Any], torch.Tensor]:
        """``image -> tensor``: another image at this stage, what an :class:`ImageSwap` puts in."""

    @abstractmethod
    def draw(self, runs: Any, config: Settings, generator: torch.Generator) -> Corrupted:
        """One draw of ``config.samples`` corrupted runs from ``generator``."""

    def skip(self, runs: Any, config: Settings, generator: torch.Generator) -> None:
        """Advance ``generator`` past one draw without running the model."""
        runs.corrupt_input(config, self.clean_input(runs.clean_pass), generator)

    def downstream_prompt(self, runs: Any, block: Any, config: Settings, corrupted: Corrupted | None) -> Any:
        """The corrupted prompt embeddings [S, P, D] that the language model reads after ``block``'s restored states
        (None: the clean prompt)."""
        return None


def _reader_run(runs: Any, config: Settings, embeds: torch.Tensor, h0: torch.Tensor,
                vision: Run | None = None, text: bool = False) -> Corrupted:
    """The reader's corrupted run over ``embeds`` from its input ``h0`` (kept as the text's corrupted input instead,
    for a reader whose run depends on the target)."""
    clean_pass = runs.clean_pass
    reader = clean_pass.blocks.reader
    cross = shared_cross(reader.stack, embeds)
    clean_pass.stats["corrupted_passes"] += 1
    if reader.runs_per_target:
        return Corrupted(embeds, cross, None, vision, h0 if text else None)
    return Corrupted(embeds, cross, record_run(reader.stack, h0, cross), vision)


class ImageEmbeddings(Stage):
    name: ClassVar[StageName] = "image"

    def default_corruption(self, bundle: Any) -> GaussianNoise:
        return GaussianNoise(float(getattr(bundle, "noise_scale", ROME_NOISE_SCALE)))

    def clean_input(self, clean_pass: Any) -> torch.Tensor:
        return clean_pass.clean.image_embeds

    def other_image(self, clean_pass: Any) -> Callable[[Any], torch.Tensor]:
        return clean_pass.embed_image

    def draw(self, runs: Any, config: Settings, generator: torch.Generator) -> Corrupted:
        clean_pass = runs.clean_pass
        embeds = runs.corrupt_input(config, self.clean_input(runs.clean_pass), generator)
        h0 = clean_pass.blocks.reader.first_states(clean_pass).expand(int(config.samples), -1, -1)
        return _reader_run(runs, config, embeds, h0)


class Patches(Stage):
    name: ClassVar[StageName] = "patches"
    before_vision = True

    def clean_input(self, clean_pass: Any) -> torch.Tensor:
        return clean_pass.vision.embed(clean_pass.pixels)

    def other_image(self, clean_pass: Any) -> Callable[[Any], torch.Tensor]:
        return lambda image: clean_pass.vision.embed(clean_pass.pixel_values(image))

    def patches(self, runs: Any, corrupted: torch.Tensor) -> torch.Tensor:
        """The vision encoder's input, [S, N, D], from this stage's corrupted tensor."""
        return corrupted

    def draw(self, runs: Any, config: Settings, generator: torch.Generator) -> Corrupted:
        clean_pass = runs.clean_pass
        vstack = clean_pass.vision
        patches = self.patches(runs, runs.corrupt_input(config, self.clean_input(runs.clean_pass), generator))
        clean_pass.stats["vision_passes"] += 1
        vision = record_run(vstack, patches, [None] * len(vstack))
        h0 = clean_pass.blocks.reader.first_states(clean_pass).expand(int(config.samples), -1, -1)
        return _reader_run(runs, config, vstack.post_norm(vision.output), h0, vision)


class Pixels(Patches):
    name: ClassVar[StageName] = "pixels"

    def clean_input(self, clean_pass: Any) -> torch.Tensor:
        return clean_pass.pixels

    def other_image(self, clean_pass: Any) -> Callable[[Any], torch.Tensor]:
        return clean_pass.pixel_values

    def patches(self, runs: Any, corrupted: torch.Tensor) -> torch.Tensor:
        return runs.clean_pass.vision.embed(corrupted)


class Question(Stage):
    name: ClassVar[StageName] = "question"
    text = True

    def clean_input(self, clean_pass: Any) -> torch.Tensor:
        if reads_prompt(clean_pass):
            return prompt_embedding(clean_pass)(clean_pass.question_ids)
        return clean_pass.blocks.reader.first_states(clean_pass)

    def other_image(self, clean_pass: Any) -> Callable[[Any], torch.Tensor]:
        raise BlipTraceError("ImageSwap replaces the image: use it with corrupt='image', 'patches' or 'pixels' "
                             "(WordSwap replaces the question's words)")

    def check_corruption(self, corruption: Any) -> None:
        if isinstance(corruption, ImageSwap):
            self.other_image(None)

    def check_model(self, head: Any, block: BlockFacts) -> None:
        if block.name == QFORMER and not head.reads_instruction:
            raise BlipTraceError("BLIP-2's Q-Former does not read the question (only its language model does), so "
                                 "restoring it undoes nothing: trace a block of the language model, or corrupt the "
                                 "image")

    def skip(self, runs: Any, config: Settings, generator: torch.Generator) -> None:
        if reads_prompt(runs.clean_pass):
            corrupted_question(runs, config, generator)
        else:
            super().skip(runs, config, generator)

    def draw(self, runs: Any, config: Settings, generator: torch.Generator) -> Corrupted:
        clean_pass = runs.clean_pass
        embeds = clean_pass.clean.image_embeds
        if reads_prompt(clean_pass):  # BLIP-2: its language model's prompt
            prompt, h0 = corrupted_question(runs, config, generator)
            cross = shared_cross(clean_pass.blocks.reader.stack, embeds)
            clean_pass.stats["corrupted_passes"] += 1
            return Corrupted(embeds, cross, record_run(clean_pass.blocks.reader.stack, h0, cross), prompt=prompt)
        h0 = self.clean_input(runs.clean_pass)
        positions = runs.corrupt_positions(config)
        noisy = runs.corrupt_input(config, h0, generator)
        h0 = h0.expand(int(config.samples), -1, -1).clone()
        h0[:, positions] = noisy[:, positions]
        return _reader_run(runs, config, embeds, h0, text=True)

    def downstream_prompt(self, runs: Any, block: Any, config: Settings, corrupted: Corrupted | None) -> Any:
        """InstructBLIP reads the question twice, and a restoring trace of its Q-Former leaves the prompt's copy
        corrupted: the language model reads it after the Q-Former's restored states."""
        from . import directions

        if not directions.of(config.direction).restores or block.name != QFORMER:
            return None
        return (corrupted if corrupted is not None else runs.corrupted(config)).prompt


class Queries(Stage):
    name: ClassVar[StageName] = "queries"
    after_queries = True

    def clean_input(self, clean_pass: Any) -> torch.Tensor:
        return language_model_queries(clean_pass, clean_pass.reader_output)

    def other_image(self, clean_pass: Any) -> Callable[[Any], torch.Tensor]:
        return lambda image: queries_of(clean_pass, clean_pass.embed_image(image))

    def draw(self, runs: Any, config: Settings, generator: torch.Generator) -> Corrupted:
        """The reader's clean run, its output replaced: what the decoder reads."""
        clean_pass = runs.clean_pass
        embeds = clean_pass.clean.image_embeds
        noisy = runs.corrupt_input(config, self.clean_input(runs.clean_pass), generator)
        clean_pass.stats["corrupted_passes"] += 1
        return Corrupted(embeds, shared_cross(clean_pass.blocks.reader.stack, embeds), Run(inputs=[noisy]),
                         projected=self.name == PROJECTED)


PROJECTED: StageName = "projected"


class Projected(Queries):
    name = PROJECTED

    def clean_input(self, clean_pass: Any) -> torch.Tensor:
        return project(clean_pass, super().clean_input(clean_pass))

    def other_image(self, clean_pass: Any) -> Callable[[Any], torch.Tensor]:
        return lambda image: project(clean_pass, queries_of(clean_pass, clean_pass.embed_image(image)))


BY_NAME: dict[str, Stage] = {stage.name: stage for stage in (ImageEmbeddings(), Patches(), Pixels(), Question(),
                                                              Queries(), Projected())}
assert tuple(BY_NAME) == STAGES, "a stage's class and its name in names.py go together"


def of(name: str | None) -> Stage:
    """The stage named ``name``."""
    if name not in BY_NAME:
        raise BlipTraceError(f"unknown corrupt {name!r}: use one of {', '.join(BY_NAME)}")
    return BY_NAME[name]


def completed(config: Any, bundle: Any) -> Any:
    """``config`` with its corruption filled in where it names none: the model's default at its stage."""
    if config.corruption is not None:
        return config
    from dataclasses import replace

    return replace(config, corruption=of(config.corrupt).default_corruption(bundle))


# ----- BLIP-2's and InstructBLIP's question and queries -----------------------------------------------------------
def reads_prompt(clean_pass: Any) -> bool:
    """Whether the model reads its question in a language model's prompt (BLIP-2, InstructBLIP)."""
    return hasattr(clean_pass.blocks.last, "prompt_states")


def prompt_embedding(clean_pass: Any) -> Any:
    """``ids -> [1, P, D]``: the language model's token embeddings of a prompt's token ids."""
    last = clean_pass.blocks.last
    return lambda ids: last.prompt_states(clean_pass.context, ids)


def corrupted_question(runs: Any, config: Settings, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw of the corrupted question: the language model's prompt embeddings [S, P, D], and the Q-Former's
    input [S, Q (+ I), Dq] (InstructBLIP's instruction corrupted too; BLIP-2's queries as they are)."""
    clean_pass, samples = runs.clean_pass, int(config.samples)
    clean = prompt_embedding(clean_pass)(clean_pass.question_ids)
    positions = runs.corrupt_positions(config)
    noisy = runs.corrupt_input(config, clean, generator)
    prompt = clean.expand(samples, -1, -1).clone()
    prompt[:, positions] = noisy[:, positions]
    queries = clean_pass.blocks.reader.first_states(clean_pass)
    if clean_pass.instruction_ids:
        return prompt, _corrupted_instruction(runs, config, queries, generator)
    return prompt, queries.expand(samples, -1, -1)


def _corrupted_instruction(runs: Any, config: Settings, clean: torch.Tensor,
                           generator: torch.Generator) -> torch.Tensor:
    """InstructBLIP's Q-Former input [S, Q + I, Dq] with its instruction's copy of the question corrupted."""
    clean_pass, samples = runs.clean_pass, int(config.samples)
    stack = clean_pass.blocks.reader.stack
    first = stack.count  # the instruction follows the queries
    ids = list(clean_pass.instruction_ids)
    corruption = config.corruption
    if isinstance(corruption, WordSwap):
        bound = corruption.bind(clean_pass.bundle.processor.qformer_tokenizer, clean_pass.question, ids,
                                lambda swapped: stack.queries(clean_pass.ids(swapped))[:, first:],
                                lambda text: list(clean_pass.task.instruction(clean_pass.bundle, text)),
                                what=clean_pass.task.text)
        assert bound.ids is not None
        positions = [p for p, (a, b) in enumerate(zip(ids, bound.ids)) if a != b]
        noisy = bound(clean[:, first:], samples, generator)
    else:
        positions = _instruction_positions(clean_pass, config, ids)
        noisy = runs.corrupt_input(config, clean[:, first:], generator)
    out = clean.expand(samples, -1, -1).clone()
    out[:, [first + p for p in positions]] = noisy[:, positions]
    return out


def _instruction_positions(clean_pass: Any, config: Settings, ids: list[int]) -> list[int]:
    """The instruction positions ``config.corrupt_tokens`` names: all, or (``"object"``) the object's tokens."""
    if config.corrupt_tokens is None:
        return list(range(len(ids)))
    if config.corrupt_tokens == "object":
        positions = last_content_word(clean_pass.bundle.processor.qformer_tokenizer.convert_ids_to_tokens(ids))
        if positions:
            return list(positions)
    raise BlipTraceError("InstructBLIP reads the question twice (its Q-Former's instruction and the language "
                         "model's prompt, in two tokenizations), so corrupt_tokens positions are ambiguous: corrupt "
                         "every token (no corrupt_tokens), corrupt_tokens='object', or a WordSwap")


def queries_of(clean_pass: Any, image_embeds: torch.Tensor) -> torch.Tensor:
    """The Q-Former's output queries for image embeddings [1, N, D]: what the language model reads."""
    reader = clean_pass.blocks.reader
    run = record_run(reader.stack, reader.first_states(clean_pass), shared_cross(reader.stack, image_embeds))
    return language_model_queries(clean_pass, run.output)


def project(clean_pass: Any, queries: torch.Tensor) -> torch.Tensor:
    """Q-Former output queries [1, Q, Dq] at the language model's width, as it reads them."""
    return clean_pass.blocks.last.stack.projection(queries)


def language_model_queries(clean_pass: Any, states: torch.Tensor) -> torch.Tensor:
    """Of the Q-Former's output states [1, Q (+ T), D], the queries' (InstructBLIP's instruction outputs are not read
    by the language model, so noise there would change nothing)."""
    reader = clean_pass.blocks.reader
    assert reader.name == QFORMER, "only a Q-Former's outputs are queries"
    return states[:, : reader.stack.count]
