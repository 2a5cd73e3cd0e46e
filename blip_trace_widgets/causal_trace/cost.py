"""What a trace will cost, said before it runs: rows, layers, floating-point work and a rough time.

    >>> from blip_trace_widgets import load_model, demo_samples, Tracer
    >>> from blip_trace_widgets.causal_trace.cost import trace_cost
    >>> image, question, _ = demo_samples()[0]
    >>> cost = trace_cost(Tracer(load_model("demo"), image, question), samples=10)
    >>> cost.rows == cost.cells * 10, cost.seconds > 0
    (True, True)

The count comes from the engine's own layout: the cells a trace restores, the layers each runs (a cell starts
where it first differs from the corrupted run) and the noise samples; each row-layer is priced at the block's
tokens times a transformer layer's multiply-adds (4h² for the attention's projections, 2·h·i for the MLP, the
attention itself, and the cross-attention's reading of the image for text blocks). The time is that work
divided by this machine's measured matrix-multiply speed at the block's width (timed once, a few
milliseconds), times :data:`OVERHEAD`: a rough figure, said as one. :data:`WARN_SECONDS` is where the command
line, the explorers and :func:`~.tracing.trace` (a :class:`LongTraceWarning`, from :func:`warn_if_long`) warn
before starting, all in the words of :meth:`Cost.warning`.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import torch

from ..core.names import BLOCK_LABELS, LANGUAGE_BLOCKS, LM_DECODER, facts
from ..models import anatomy
from ..models.runs import start_layer

#: Measured time over matmul-only time for the engine's layers on a CPU (softmax, norms, copies, the scoring):
#: about 2 to 3 on the demo model's traces; rough.
OVERHEAD = 3.0
#: A trace estimated to take longer than this is warned about before it starts.
WARN_SECONDS = 30.0


@dataclass(frozen=True)
class Cost:
    """The size of one trace: cells x samples rows, the row-layers they run, their work and a rough time."""

    block: str
    cells: int
    samples: int
    layer_rows: int
    flops: float
    seconds: float

    @property
    def rows(self) -> int:
        return self.cells * self.samples

    @property
    def heavy(self) -> bool:
        return self.seconds > WARN_SECONDS

    def __add__(self, other: Cost) -> Cost:
        """Two traces of one block run one after the other (a caption's words)."""
        return Cost(self.block, self.cells + other.cells, self.samples, self.layer_rows + other.layer_rows,
                    self.flops + other.flops, self.seconds + other.seconds)

    def describe(self) -> str:
        return (f"{self.cells} cells x {self.samples} samples = {self.rows} rows through {self.layer_rows} row-layers "
                f"of the {BLOCK_LABELS.get(self.block, self.block)}: about {duration(self.seconds)} on this machine "
                "(a rough estimate)")

    def warning(self) -> str | None:
        """A warning naming what makes it cheaper, when the trace is heavy."""
        if not self.heavy:
            return None
        return (f"this trace is large: {self.describe()}. Fewer samples, a window of 1, regions (vision encoder) or "
                "method='estimate' make it faster")


class LongTraceWarning(UserWarning):
    """A trace priced at more than :data:`WARN_SECONDS` on this machine, said before it starts."""


def duration(seconds: float) -> str:
    """A rough time in words: "40 s", "9 min", "2.5 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def total_cost(tracer: Any, configs: Sequence[Any]) -> Cost:
    """The cost of tracing ``configs`` (one or more, of one block) one after the other on ``tracer``."""
    costs = [trace_cost(tracer, config) for config in configs]
    total = costs[0]
    for cost in costs[1:]:
        total = total + cost
    return total


def warn_if_long(tracer: Any, configs: Sequence[Any], *, stacklevel: int = 3) -> Cost:
    """The cost of tracing ``configs`` one after the other on ``tracer``; when it is over :data:`WARN_SECONDS`, a
    :class:`LongTraceWarning` in :meth:`Cost.warning`'s words (the time, and what makes it cheaper) first."""
    total = total_cost(tracer, configs)
    message = total.warning()
    if message:
        warnings.warn(message, LongTraceWarning, stacklevel=stacklevel)
    return total


@lru_cache(maxsize=16)
def matmul_speed(width: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """Multiply-adds per second of a [256, width] x [width, width] product here (best of 5)."""
    a = torch.randn(256, width, dtype=dtype, device=device)
    b = torch.randn(width, width, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        torch.matmul(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 256 * width * width / max(best, 1e-9)


def _layer_work(tracer: Any, block: str, tokens: int) -> tuple[float, int]:
    """Multiply-adds of one row through one layer of ``block``, and the block's width."""
    model = tracer.model
    if facts(block).image_side:
        config = anatomy.vision_config(model)
        h, i = config.hidden_size, config.intermediate_size
        return tokens * (4 * h * h + 2 * h * i) + 2 * tokens * tokens * h, h
    config = anatomy.block_config(model, block)
    h, i = config.hidden_size, anatomy.feed_forward_size(config)
    # what it cross-attends to: the image's embeddings (BLIP's text blocks, the Q-Former); a T5 decoder's encoder
    # output (about as long as its own input, the queries and the prompt); nothing (OPT, T5's encoder)
    image = tokens if block == LM_DECODER else 0 if block in LANGUAGE_BLOCKS else int(tracer.clean.image_embeds.shape[1])
    return tokens * (6 * h * h + 2 * h * i) + 2 * tokens * (tokens + image) * h, h


def trace_cost(tracer: Any, config: Any = None, **fields: Any) -> Cost:
    """The cost of ``tracer.trace(config)`` (or of a config resolved from ``fields``), before running it."""
    from .procedures import resolve_config

    config = config if config is not None else resolve_config(tracer.bundle, **fields)
    if getattr(config.corruption, "deterministic", False):  # traced with one draw (Tracer.plan)
        config = replace(config, samples=1)
    block = tracer.blocks[config.block]
    target = tracer.target(config)
    layout = block.layout(tracer.clean_pass.context, config, target)
    layers = len(block.stack)
    runs = sum(layers - start_layer(cell, config.kind, layers) for cell in layout.cells)
    samples = 1 if config.method in ("estimate", "verified") else int(config.samples)
    if block.image_side:
        tokens = int(tracer.clean.image_embeds.shape[1])
    else:
        tokens = len(block.labels(tracer.clean_pass.context, target))
    work, width = _layer_work(tracer, block.name, tokens)
    flops = float(runs) * samples * work
    if block.image_side and config.metric != "itc":  # each row then runs the reader's text layers
        reader = tracer.blocks.reader
        text_tokens = len(reader.labels(tracer.clean_pass.context, target))
        flops += float(len(layout.cells)) * samples * len(reader.stack) * _layer_work(tracer, reader.name, text_tokens)[0]
    if config.method in ("estimate", "verified"):  # a forward and a backward pass of every layer, whatever the cells
        flops = 3.0 * layers * int(config.samples) * work
        if config.method == "verified":  # then the top cells exact
            flops += float(runs) / max(len(layout.cells), 1) * int(config.verify) * int(config.samples) * work
    seconds = OVERHEAD * flops / matmul_speed(width, torch.float32, tracer.device.type)
    return Cost(block.name, len(layout.cells), samples, runs * samples, flops, seconds)
