"""How many batch rows fit a chunk: a trace's rows per chunk from its memory budget.

    >>> from blip_trace_widgets.models.chunks import chunks
    >>> chunks([0, 1, 2, 3, 4], 2)
    [[0, 1], [2, 3], [4]]
"""
from __future__ import annotations

from ..core.errors import BlipTraceError

DEFAULT_MEMORY_BUDGET = 128 << 20  # bytes of activations per chunk: faster than larger chunks on a CPU, and lean


def vision_rows_per_chunk(
    samples: int,
    patches: int,
    vision_hidden: int,
    vision_intermediate: int,
    vision_heads: int,
    tokens: int,
    text_hidden: int,
    text_intermediate: int,
    text_heads: int,
    element_size: int,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    max_batch_rows: int | None = None,
) -> int:
    """Rows (cell x sample) of an image-side trace that fit the memory budget: a ViT layer, then the text pass."""
    vit = patches * (8 * vision_hidden + 2 * vision_intermediate) + 2 * vision_heads * patches * patches
    text = tokens * (8 * text_hidden + 2 * text_intermediate) + 2 * patches * text_hidden + 2 * text_heads * tokens * patches
    per_row = (max(vit, text) + patches * vision_hidden) * element_size
    return _rows_within(per_row, samples, memory_budget, max_batch_rows)


def _rows_within(per_row: int, samples: int, memory_budget: int, max_batch_rows: int | None) -> int:
    """Rows of ``per_row`` bytes within the budget (at least one noise sample's worth), capped by max_batch_rows."""
    rows = max(samples, memory_budget // max(per_row, 1))
    if max_batch_rows is not None:
        if max_batch_rows < 1:
            raise BlipTraceError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        rows = min(rows, max_batch_rows)
    return max(1, rows)


def rows_per_chunk(
    samples: int,
    tokens: int,
    cross_tokens: int,
    hidden: int,
    intermediate: int,
    heads: int,
    vocab: int,
    decoder_tokens: int,
    element_size: int,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    max_batch_rows: int | None = None,
) -> int:
    """How many rows (cell x sample) fit the memory budget, counting one layer's peak activations."""
    per_row = (
        tokens * (8 * hidden + 2 * intermediate)
        + 2 * heads * tokens * cross_tokens
        + decoder_tokens * (8 * hidden + 2 * intermediate + 2 * heads * tokens + 2 * vocab)
        + 2 * tokens * hidden
    ) * element_size
    return _rows_within(per_row, samples, memory_budget, max_batch_rows)


def chunks(cells_order: list[int], cells_per_chunk: int) -> list[list[int]]:
    return [cells_order[i : i + cells_per_chunk] for i in range(0, len(cells_order), cells_per_chunk)]
