"""Corrupted runs: the input corrupted as a TraceConfig says, and every state of the runs after it.

    >>> from blip_trace_widgets import load_model, demo_samples, TraceConfig
    >>> from blip_trace_widgets.causal_trace.clean import CleanPass
    >>> from blip_trace_widgets.causal_trace.corrupted import CorruptedRuns
    >>> from blip_trace_widgets.causal_trace.targets import Targets
    >>> image, question, _ = demo_samples()[0]
    >>> clean_pass = CleanPass(load_model("demo"), image, question)
    >>> runs = CorruptedRuns(clean_pass, Targets(clean_pass))
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
from ..core.roles import last_content_word
from ..core.scoring import Target
from ..corruptions.kinds import ImageSwap, WordSwap
from ..models import anatomy
from ..models.runs import Run
from . import stages
from .blocks.base import Context, Corrupted
from .clean import CleanPass
from .config import TraceConfig, cache_key
from .stages import prompt_embedding, reads_prompt
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


def chosen_positions(clean_pass: CleanPass, config: TraceConfig) -> list[int]:
    """The positions ``config.corrupt_tokens`` names in the text: every one when None."""
    count, text = len(clean_pass.question_ids), clean_pass.task.text
    if config.corrupt_tokens is None:
        return list(range(count))
    if isinstance(config.corrupt_tokens, str):  # "object"
        positions = last_content_word(clean_pass.bundle.tokenizer.convert_ids_to_tokens(clean_pass.question_ids))
        if not positions:
            raise BlipTraceError(f"the {text} has no content word to corrupt; pass corrupt_tokens=(positions...)")
        return positions
    for position in config.corrupt_tokens:
        if not 0 <= position < count:
            raise BlipTraceError(f"corrupt_tokens position {position} is outside the {text}'s {count} tokens")
    return list(config.corrupt_tokens)


def _swapped_among(clean_pass: CleanPass, config: TraceConfig, swapped: list[int]) -> list[int]:
    """The positions ``corrupt_tokens`` names, refused when they leave out every position a word swap changes
    (nothing would be swapped)."""
    chosen = chosen_positions(clean_pass, config)
    if not set(chosen) & set(swapped):
        tokens = clean_pass.bundle.tokenizer.convert_ids_to_tokens(clean_pass.question_ids)
        raise BlipTraceError(
            f"corrupt_tokens {chosen} ({', '.join(repr(tokens[p]) for p in chosen)}) leave out every position "
            f"the swap changes ({', '.join(f'{p}: {tokens[p]!r}' for p in swapped)}), so nothing would be swapped: "
            "drop corrupt_tokens (a swap corrupts the positions it changes) or name those positions")
    return chosen


class CorruptedRuns:
    """The corrupted runs of one (image, text)'s clean pass, in bounded caches."""

    def __init__(self, clean_pass: CleanPass, targets: Targets, corrupted_cache_size: int = 2) -> None:
        self.clean_pass = clean_pass
        self.targets = targets
        self._clean_target: LRU[Run] = LRU(8)
        self._corrupted: LRU[Corrupted] = LRU(corrupted_cache_size)
        self._corrupted_target: LRU[tuple[Run, Any]] = LRU(corrupted_cache_size)

    @property
    def context(self) -> Context:
        """What blocks read: the clean pass's frozen context."""
        return self.clean_pass.context

    def bound_swap(self, swap: WordSwap) -> WordSwap:
        """``swap`` bound to this question, the model's tokenizer and the token embeddings of the block that reads
        the question (the reader's; BLIP-2's language model's, its prompt)."""
        clean_pass = self.clean_pass
        stack, tokenizer = clean_pass.blocks.reader.stack, clean_pass.bundle.tokenizer
        embed = prompt_embedding(clean_pass) if reads_prompt(clean_pass) else lambda ids: stack.embed(clean_pass.ids(ids))
        return swap.bind(tokenizer, clean_pass.question, clean_pass.question_ids, embed,
                         lambda text: clean_pass.task.encode(tokenizer, text, clean_pass.position_limit, clean_pass.bos_id)[1],
                         what=clean_pass.task.text)

    def corrupt_positions(self, config: TraceConfig) -> list[int]:
        """Question positions a corrupt='question' trace corrupts (a word swap's: where the tokens differ, or those
        of them that ``corrupt_tokens`` names)."""
        if not isinstance(config.corruption, WordSwap):
            return chosen_positions(self.clean_pass, config)
        other = self.bound_swap(config.corruption).ids or ()
        swapped = [p for p, (a, b) in enumerate(zip(self.clean_pass.question_ids, other)) if a != b]
        return swapped if config.corrupt_tokens is None else _swapped_among(self.clean_pass, config, swapped)

    def corrupt_input(self, config: TraceConfig, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        corruption = stages.completed(config, self.clean_pass.bundle).corruption
        assert corruption is not None, "a completed configuration names its corruption"
        if isinstance(corruption, ImageSwap) and corruption.embeddings is None:  # the other image at this stage
            corruption = corruption.bind(stages.of(config.corrupt).other_image(self.clean_pass))
        if isinstance(corruption, WordSwap) and corruption.embeddings is None:
            corruption = self.bound_swap(corruption)
        samples = int(config.samples)
        out = corruption(clean, samples, generator)
        if not isinstance(out, torch.Tensor) or out.shape != (samples, *clean.shape[1:]):
            raise BlipTraceError(f"the corruption must return a tensor of shape {(samples, *clean.shape[1:])}, "
                                 f"got {getattr(out, 'shape', type(out).__name__)}")
        if not bool(torch.isfinite(out).all()):
            raise BlipTraceError("the corruption returned NaN or infinite values: lower its level, or fix the callable")
        return out.to(device=self.clean_pass.device, dtype=self.clean_pass.bundle.dtype)

    @torch.no_grad()
    def held(self) -> list[Any]:
        """What this object keeps: its cached runs."""
        return [cache.values() for cache in (self._clean_target, self._corrupted, self._corrupted_target)]

    def run_bytes(self, samples: int, vision: bool) -> int:
        """About how many bytes the corrupted runs of ``samples`` noise samples keep (every state a trace restores,
        and the image keys and values of every text layer)."""
        reader = self.clean_pass.blocks.reader
        text = anatomy.block_config(self.clean_pass.model, reader.name)
        image = anatomy.vision_config(self.clean_pass.model)
        tokens = int((image.image_size // image.patch_size) ** 2 + 1)
        layers = len(reader.stack)
        positions = reader.positions(self.clean_pass)
        question = (layers + 1) * positions * text.hidden_size * (1 + len(reader.stack.kinds))
        cross = layers * 2 * tokens * text.hidden_size + tokens * image.hidden_size
        vstack = self.clean_pass.vision
        vit = (len(vstack) + 1) * tokens * image.hidden_size * (1 + len(vstack.kinds)) if vision else 0
        return samples * (question + cross + vit) * self.clean_pass.bundle.dtype.itemsize

    def _check_memory(self, config: TraceConfig) -> None:
        """Refuse, before allocating anything, noise samples whose runs would not fit in the memory available."""
        vision = stages.of(config.corrupt).before_vision
        needed = self.run_bytes(int(config.samples), vision)
        free = available_memory()
        if free is not None and needed > 0.8 * free:
            per_sample = self.run_bytes(1, vision)
            raise BlipTraceError(
                f"{config.samples} noise samples need about {needed / 2**30:.1f} GiB for the corrupted runs, and "
                f"{free / 2**30:.1f} GiB are available: use at most {max(1, int(0.8 * free // per_sample))} samples")

    def draw(self, config: TraceConfig, generator: torch.Generator) -> Corrupted:
        """The corrupted runs for one draw of ``config.samples`` from ``generator``."""
        config = stages.completed(config, self.clean_pass.bundle)
        self._check_memory(config)
        self.targets.check_config(config)
        return stages.of(config.corrupt).draw(self, config, generator)

    def corrupted_patches(self, config: TraceConfig) -> torch.Tensor:
        """The seed's first draw of the vision encoder's corrupted input, without running the model on it."""
        config = stages.completed(config, self.clean_pass.bundle)
        self._check_memory(config)
        stage = stages.of(config.corrupt)
        if not isinstance(stage, stages.Patches):
            raise BlipTraceError(f"corrupt={config.corrupt!r} acts after the vision encoder: its input is not "
                                 "corrupted (use corrupt='patches' or 'pixels')")
        with torch.no_grad():
            clean = stage.clean_input(self.clean_pass)
            return stage.patches(self, self.corrupt_input(config, clean, torch.Generator().manual_seed(int(config.seed))))

    def corrupted(self, config: TraceConfig) -> Corrupted:
        """The corrupted runs for ``config``'s corruption, samples and seed (cached): the first draw of the seed."""
        config = stages.completed(config, self.clean_pass.bundle)
        return self._corrupted.get_or_make(cache_key(config, "corrupted"),
                                           lambda: self.draw(config, torch.Generator().manual_seed(int(config.seed))))

    def _target_run(self, block: Any, config: TraceConfig, target: Target) -> tuple[Run, Any]:
        return self._corrupted_target.get_or_make(
            (block.name, cache_key(config, "decoder"), target),
            lambda: block.corrupted_run(self.clean_pass.context, self.corrupted(config), target))

    def clean_run(self, block: Any, target: Target) -> Run:
        """The clean run of ``block`` for ``target`` (cached when it depends on the target)."""
        with torch.no_grad():
            if not block.runs_per_target:
                return block.clean_run(self.clean_pass.context, target)
            return self._clean_target.get_or_make((block.name, target), lambda: block.clean_run(self.clean_pass.context, target))

    def runs(self, block: Any, config: TraceConfig, target: Target,
              corrupted: Corrupted | None = None) -> tuple[Run, Run, Any]:
        """Clean run, corrupted run and cross states of ``block``; ``corrupted=None`` means the cached first draw."""
        with torch.no_grad():
            clean = self.clean_run(block, target)
            if block.runs_per_target and corrupted is None:
                run, cross = self._target_run(block, config, target)
            else:
                run, cross = block.corrupted_run(self.clean_pass.context, corrupted or self.corrupted(config), target)
        return clean, run, cross

    def skip_draw(self, config: TraceConfig, generator: torch.Generator) -> None:
        """Advance ``generator`` past the low score's draw without running the model."""
        config = stages.completed(config, self.clean_pass.bundle)
        with torch.no_grad():
            stages.of(config.corrupt).skip(self, config, generator)
