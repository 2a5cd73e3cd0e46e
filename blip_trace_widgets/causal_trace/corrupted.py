"""Corrupted runs: the input corrupted as a TraceConfig says, and every state of the runs after it.

    >>> from blip_trace_widgets import load_model, demo_samples, TraceConfig
    >>> from blip_trace_widgets.causal_trace.clean import CleanPass
    >>> from blip_trace_widgets.causal_trace.corrupted import CorruptedRuns
    >>> from blip_trace_widgets.causal_trace.targets import Targets
    >>> image, question, _ = demo_samples()[0]
    >>> session = CleanPass(load_model("demo"), image, question)
    >>> runs = CorruptedRuns(session, Targets(session))
    >>> tuple(runs.corrupted(TraceConfig(samples=3)).text.output.shape[:1])
    (3,)

A draw of ``samples`` noise samples is made from a generator seeded with ``seed``; the
first draw of a seed is cached (by :func:`~.config.cache_key`) and shared by every cell
of every heatmap that asks for it, as in ROME. With ``fresh_noise`` each cell takes the
next draw of the same generator instead, as in the paper.
"""
from __future__ import annotations

from typing import Any

import torch

from ..core.cache import LRU
from ..core.errors import BlipTraceError
from ..core.memory import available_memory
from ..core.names import QUERY_STAGES
from ..core.roles import last_content_word
from ..core.scoring import Target
from ..corruptions.kinds import ImageSwap, WordSwap
from ..models import anatomy
from ..models.runs import Run, record_run, shared_cross
from .blocks.base import Context, Corrupted
from .clean import CleanPass
from .config import TraceConfig, cache_key
from .prompt_noise import clean_queries, corrupted_question, project, prompt_embedding, queries_of, reads_prompt
from .targets import Targets


def tensor_bytes(*objects: Any) -> int:
    """Bytes of the tensors reachable from ``objects`` (dataclasses, lists, tuples, dicts), each storage once."""
    import dataclasses

    seen: set[int] = set()
    total = 0
    todo = list(objects)
    while todo:
        item = todo.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            todo.extend(getattr(item, f.name) for f in dataclasses.fields(item))
        elif isinstance(item, (list, tuple)):
            todo.extend(item)
        elif isinstance(item, dict):
            todo.extend(item.values())
    return total


def chosen_positions(session: CleanPass, config: TraceConfig) -> list[int]:
    """The positions ``config.corrupt_tokens`` names in the text: every one when None."""
    count, text = len(session.question_ids), session.task.text
    if config.corrupt_tokens is None:
        return list(range(count))
    if isinstance(config.corrupt_tokens, str):  # "object"
        positions = last_content_word(session.bundle.tokenizer.convert_ids_to_tokens(session.question_ids))
        if not positions:
            raise BlipTraceError(f"the {text} has no content word to corrupt; pass corrupt_tokens=(positions...)")
        return positions
    for position in config.corrupt_tokens:
        if not 0 <= position < count:
            raise BlipTraceError(f"corrupt_tokens position {position} is outside the {text}'s {count} tokens")
    return list(config.corrupt_tokens)


def _swapped_among(session: CleanPass, config: TraceConfig, swapped: list[int]) -> list[int]:
    """The positions ``corrupt_tokens`` names, refused when they leave out every position a word swap changes
    (nothing would be swapped)."""
    chosen = chosen_positions(session, config)
    if not set(chosen) & set(swapped):
        tokens = session.bundle.tokenizer.convert_ids_to_tokens(session.question_ids)
        raise BlipTraceError(
            f"corrupt_tokens {chosen} ({', '.join(repr(tokens[p]) for p in chosen)}) leave out every position "
            f"the swap changes ({', '.join(f'{p}: {tokens[p]!r}' for p in swapped)}), so nothing would be swapped: "
            "drop corrupt_tokens (a swap corrupts the positions it changes) or name those positions")
    return chosen


class CorruptedRuns:
    """The corrupted runs of one (image, text)'s clean pass, in bounded caches."""

    def __init__(self, session: CleanPass, targets: Targets, corrupted_cache_size: int = 2) -> None:
        self.session = session
        self.targets = targets
        self._clean_target: LRU[Run] = LRU(8)
        self._corrupted: LRU[Corrupted] = LRU(corrupted_cache_size)
        self._corrupted_target: LRU[tuple[Run, Any]] = LRU(corrupted_cache_size)

    @property
    def context(self) -> Context:
        """What blocks read: the session's frozen context."""
        return self.session.context

    def bound_swap(self, swap: WordSwap) -> WordSwap:
        """``swap`` bound to this question, the model's tokenizer and the token embeddings of the block that reads
        the question (the reader's; BLIP-2's language model's, its prompt)."""
        session = self.session
        stack, tokenizer = session.blocks.reader.stack, session.bundle.tokenizer
        embed = prompt_embedding(session) if reads_prompt(session) else lambda ids: stack.embed(session.ids(ids))
        return swap.bind(tokenizer, session.question, session.question_ids, embed,
                         lambda text: session.task.encode(tokenizer, text, session.position_limit, session.bos_id)[1],
                         what=session.task.text)

    def corrupt_positions(self, config: TraceConfig) -> list[int]:
        """Question positions a corrupt='question' trace corrupts (a word swap's: where the tokens differ, or those
        of them that ``corrupt_tokens`` names)."""
        if not isinstance(config.corruption, WordSwap):
            return chosen_positions(self.session, config)
        other = self.bound_swap(config.corruption).ids or ()
        swapped = [p for p, (a, b) in enumerate(zip(self.session.question_ids, other)) if a != b]
        return swapped if config.corrupt_tokens is None else _swapped_among(self.session, config, swapped)

    def corrupt_input(self, config: TraceConfig, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        corruption = config.corruption
        if isinstance(corruption, ImageSwap) and corruption.embeddings is None:  # the other image at this stage
            corruption = corruption.bind({"image": self.session.embed_image, "pixels": self.session.pixel_values,
                                          "patches": lambda image: self.session.vision.embed(self.session.pixel_values(image)),
                                          "queries": lambda image: queries_of(self.session, self.session.embed_image(image)),
                                          "projected": lambda image: project(
                                              self.session, queries_of(self.session, self.session.embed_image(image))),
                                          }[str(config.corrupt)])
        if isinstance(corruption, WordSwap) and corruption.embeddings is None:
            corruption = self.bound_swap(corruption)
        samples = int(config.samples)
        out = corruption(clean, samples, generator)
        if not isinstance(out, torch.Tensor) or out.shape != (samples, *clean.shape[1:]):
            raise BlipTraceError(f"the corruption must return a tensor of shape {(samples, *clean.shape[1:])}, "
                                 f"got {getattr(out, 'shape', type(out).__name__)}")
        if not bool(torch.isfinite(out).all()):
            raise BlipTraceError("the corruption returned NaN or infinite values: lower its level, or fix the callable")
        return out.to(device=self.session.device, dtype=self.session.bundle.dtype)

    @torch.no_grad()
    def held(self) -> list[Any]:
        """What this object keeps: its cached runs."""
        return [cache.values() for cache in (self._clean_target, self._corrupted, self._corrupted_target)]

    def run_bytes(self, samples: int, vision: bool) -> int:
        """About how many bytes the corrupted runs of ``samples`` noise samples keep (every state a trace restores,
        and the image keys and values of every text layer)."""
        reader = self.session.blocks.reader
        text = anatomy.block_config(self.session.model, reader.name)
        image = anatomy.vision_config(self.session.model)
        tokens = int((image.image_size // image.patch_size) ** 2 + 1)
        layers = len(reader.stack)
        positions = reader.positions(self.session)
        question = (layers + 1) * positions * text.hidden_size * (1 + len(reader.stack.kinds))
        cross = layers * 2 * tokens * text.hidden_size + tokens * image.hidden_size
        vit = (len(self.session.vision) + 1) * tokens * image.hidden_size * (1 + len(self.session.vision.kinds)) if vision else 0
        return samples * (question + cross + vit) * self.session.bundle.dtype.itemsize

    def _check_memory(self, config: TraceConfig) -> None:
        """Refuse, before allocating anything, noise samples whose runs would not fit in the memory available."""
        needed = self.run_bytes(int(config.samples), config.corrupt in ("patches", "pixels"))
        free = available_memory()
        if free is not None and needed > 0.8 * free:
            per_sample = self.run_bytes(1, config.corrupt in ("patches", "pixels"))
            raise BlipTraceError(
                f"{config.samples} noise samples need about {needed / 2**30:.1f} GiB for the corrupted runs, and "
                f"{free / 2**30:.1f} GiB are available: use at most {max(1, int(0.8 * free // per_sample))} samples")

    def draw(self, config: TraceConfig, generator: torch.Generator) -> Corrupted:
        """The corrupted runs for one draw of ``config.samples`` from ``generator``."""
        self._check_memory(config)
        self.targets.check_config(config)
        samples = int(config.samples)
        reader, vstack = self.session.blocks.reader, self.session.vision
        qstack = reader.stack
        h0 = reader.first_states(self.session)
        vision = None
        if config.corrupt == "question" and reads_prompt(self.session):  # BLIP-2: its language model's prompt
            embeds = self.session.clean.image_embeds
            prompt, h0 = corrupted_question(self, config, generator)
            cross = shared_cross(qstack, embeds)
            self.session.stats["corrupted_passes"] += 1
            return Corrupted(embeds, cross, record_run(qstack, h0, cross), prompt=prompt)
        if config.corrupt == "question":
            embeds = self.session.clean.image_embeds
            positions = self.corrupt_positions(config)
            noisy = self.corrupt_input(config, h0, generator)
            h0 = h0.expand(samples, -1, -1).clone()
            h0[:, positions] = noisy[:, positions]
        elif config.corrupt in QUERY_STAGES:  # the reader's clean run, its output replaced: what the decoder reads
            embeds = self.session.clean.image_embeds
            noisy = self.corrupt_input(config, clean_queries(self.session, str(config.corrupt)), generator)
            self.session.stats["corrupted_passes"] += 1
            return Corrupted(embeds, shared_cross(qstack, embeds), Run(inputs=[noisy]),
                             projected=config.corrupt == "projected")
        elif config.corrupt == "image":
            embeds = self.corrupt_input(config, self.session.clean.image_embeds, generator)
            h0 = h0.expand(samples, -1, -1)
        else:
            patches = self._corrupted_patches(config, generator)
            self.session.stats["vision_passes"] += 1
            vision = record_run(vstack, patches, [None] * len(vstack))
            embeds = vstack.post_norm(vision.output)
            h0 = h0.expand(samples, -1, -1)
        cross = shared_cross(qstack, embeds)
        self.session.stats["corrupted_passes"] += 1
        if reader.reads_target:  # its run depends on the target: kept is the text's corrupted input, if corrupted
            return Corrupted(embeds, cross, None, vision, h0 if config.corrupt == "question" else None)
        return Corrupted(embeds, cross, record_run(qstack, h0, cross), vision)

    def _corrupted_patches(self, config: TraceConfig, generator: torch.Generator) -> torch.Tensor:
        """The vision encoder's corrupted input (patch embeddings) [S, N, D] for the next draw of ``generator``."""
        vstack = self.session.vision
        start = self.session.pixels if config.corrupt == "pixels" else vstack.embed(self.session.pixels)
        corrupted_input = self.corrupt_input(config, start, generator)
        return vstack.embed(corrupted_input) if config.corrupt == "pixels" else corrupted_input

    def corrupted_patches(self, config: TraceConfig) -> torch.Tensor:
        """The seed's first draw of the vision encoder's corrupted input, without running the model on it."""
        self._check_memory(config)
        with torch.no_grad():
            return self._corrupted_patches(config, torch.Generator().manual_seed(int(config.seed)))

    def corrupted(self, config: TraceConfig) -> Corrupted:
        """The corrupted runs for ``config``'s corruption, samples and seed (cached): the first draw of the seed."""
        return self._corrupted.get_or_make(cache_key(config, "corrupted"),
                                           lambda: self.draw(config, torch.Generator().manual_seed(int(config.seed))))

    def _target_run(self, block: Any, config: TraceConfig, target: Target) -> tuple[Run, Any]:
        return self._corrupted_target.get_or_make(
            (block.name, cache_key(config, "decoder"), target),
            lambda: block.corrupted_run(self.session.context, self.corrupted(config), target))

    def clean_run(self, block: Any, target: Target) -> Run:
        """The clean run of ``block`` for ``target`` (cached when it depends on the target)."""
        with torch.no_grad():
            if not block.reads_target:
                return block.clean_run(self.session.context, target)
            return self._clean_target.get_or_make((block.name, target), lambda: block.clean_run(self.session.context, target))

    def runs(self, block: Any, config: TraceConfig, target: Target,
              corrupted: Corrupted | None = None) -> tuple[Run, Run, Any]:
        """Clean run, corrupted run and cross states of ``block``; ``corrupted=None`` means the cached first draw."""
        with torch.no_grad():
            clean = self.clean_run(block, target)
            if block.reads_target and corrupted is None:
                run, cross = self._target_run(block, config, target)
            else:
                run, cross = block.corrupted_run(self.session.context, corrupted or self.corrupted(config), target)
        return clean, run, cross

    def skip_draw(self, config: TraceConfig, generator: torch.Generator) -> None:
        """Advance ``generator`` past the low score's draw without running the model."""
        start = {"question": lambda: self.session.blocks.reader.first_states(self.session),
                 "image": lambda: self.session.clean.image_embeds, "pixels": lambda: self.session.pixels,
                 "patches": lambda: self.session.vision.embed(self.session.pixels),
                 "queries": lambda: clean_queries(self.session, "queries"),
                 "projected": lambda: clean_queries(self.session, "projected")}[str(config.corrupt)]
        with torch.no_grad():
            if config.corrupt == "question" and reads_prompt(self.session):
                corrupted_question(self, config, generator)
            else:
                self.corrupt_input(config, start(), generator)
