"""Patched runs, many per batch: the recorded clean run, cells and their windows, the staircase that starts
each row from the corrupted run at its first restored layer, and knockout's cut staircase.

    >>> from blip_trace_widgets.models.runs import grid_cells
    >>> grid_cells(2, 3, 1)[:2]
    [((0, 0),), ((1, 0),)]

A *cell* is a set of (layer, position) pairs whose ``kind`` output is set to its clean value in every
corrupted row; a heatmap is a grid of cells. Every cell x noise sample is one batch row, in chunks sized from a
memory budget (:mod:`.chunks`); the corrupted run is computed once, and a cell whose first restored layer is
``l`` starts from that run's state at layer ``l`` (for ``hidden``, at ``l + 1``): the prefix is never
recomputed; cross-attention keys and values are computed once per noise sample, and cells are folded into the
query axis, so all cells of a sample share one key/value tensor.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.errors import BlipTraceError
from ..core.names import SEVER_AT
from .attention import Cell, Cuts, Edit, Stack


@dataclass
class Run:
    """A recorded pass over one stack: layer inputs (``inputs[L]`` is the output) and kind outputs.

    Every tensor is [S, T, D], S = 1 for the clean run.
    """

    inputs: list[torch.Tensor]
    kinds: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    @property
    def output(self) -> torch.Tensor:
        return self.inputs[-1]


def record_run(stack: Stack, h0: torch.Tensor, cross: Sequence[Any]) -> Run:
    """Run ``stack`` on ``h0`` [S, T, D] without patches, keeping every state a trace restores."""
    mask = stack.self_mask(h0.shape[1], h0.dtype, h0.device)
    run = Run(inputs=[h0], kinds={kind: [] for kind in stack.kinds})

    def keep(kind: str, x: torch.Tensor) -> torch.Tensor:
        run.kinds[kind].append(x[:, 0])
        return x

    h = h0[:, None]
    for j in range(len(stack)):
        h = stack.layer(j, h, cross[j], mask, keep)
        run.inputs.append(h[:, 0])
    return run


def shared_cross(stack: Any, states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer cross K/V of ``states`` [S, N, D'], shaped [S, 1, H, N, D/H] for sharing."""
    out: list[Any] = []
    for j in range(len(stack)):
        kv = stack.cross_kv(j, states)
        out.append(None if kv is None else (kv[0][:, None], kv[1][:, None]))
    return out


def window_layers(layer: int, window: int, num_layers: int) -> range:
    """ROME's window: ``window`` consecutive layers centred on ``layer``, clipped at the ends."""
    return range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2)))


def grid_cells(positions: int, num_layers: int, window: int) -> list[Cell]:
    """The cells of a heatmap, position-major: cell (p, l) restores ``window`` layers around l at p."""
    return group_cells([[p] for p in range(positions)], num_layers, window)


def group_cells(groups: Sequence[Sequence[int]], num_layers: int, window: int) -> list[Cell]:
    """Cells that restore each group of positions together (an image region), group-major."""
    return [
        tuple((j, p) for j in window_layers(layer, window, num_layers) for p in group)
        for group in groups
        for layer in range(num_layers)
    ]


def cell_pairs(cells: Sequence[Cell], device: torch.device, *, every_layer: bool) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the (cell index, position) pairs as two index tensors.

    ``every_layer``: key -1 holds each cell's positions once, for edits that apply at every layer.
    """
    pairs: dict[int, tuple[list[int], list[int]]] = {}
    for ci, cell in enumerate(cells):
        if every_layer:
            for pos in sorted({pos for _, pos in cell}):
                pairs.setdefault(-1, ([], []))[0].append(ci)
                pairs[-1][1].append(pos)
        else:
            for layer, pos in cell:
                pairs.setdefault(layer, ([], []))[0].append(ci)
                pairs[layer][1].append(pos)
    return {layer: (torch.tensor(c, device=device), torch.tensor(p, device=device)) for layer, (c, p) in pairs.items()}


def _set(x: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor], values: torch.Tensor, first_cell: int) -> torch.Tensor:
    """``x`` [S, C', T, D] with ``values`` [T, D] or [S, T, D] written at the index pairs of cells from ``first_cell``."""
    cells, positions = index
    keep = (cells >= first_cell) & (cells < first_cell + x.shape[1])
    if not bool(keep.any()):
        return x
    cells, positions = cells[keep] - first_cell, positions[keep]
    x = x.clone()
    x[:, cells, positions] = values[..., positions, :]
    return x


@dataclass
class ChunkEdits:
    """Which (cell, position) pairs each layer restores, and which it severs, as index tensors.

    Severing holds the ``sever`` sublayer at its corrupted values at every layer: at the
    positions each cell restores (``sever_at="restored"``, ROME's frozen-MLP procedure),
    or at every position (``"all"``).
    """

    kind: str
    clean: list[torch.Tensor]  # per layer, [T, D]
    by_layer: dict[int, tuple[torch.Tensor, torch.Tensor]]
    sever: str | None = None
    severed: list[torch.Tensor] | None = None  # per layer, [S, T, D]
    sever_at: str = "restored"
    sever_index: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build(cls, kind: str, clean: list[torch.Tensor], cells: Sequence[Cell], device: torch.device,
              sever: str | None = None, severed: list[torch.Tensor] | None = None,
              sever_at: str = "restored") -> ChunkEdits:
        if sever_at not in SEVER_AT:
            raise BlipTraceError(f"unknown sever_at {sever_at!r}: use one of {', '.join(SEVER_AT)}")
        sever_index = cell_pairs(cells, device, every_layer=True).get(-1) if sever and sever_at == "restored" else None
        return cls(kind=kind, clean=clean, by_layer=cell_pairs(cells, device, every_layer=False), sever=sever,
                   severed=severed, sever_at=sever_at, sever_index=sever_index)

    def restore(self, j: int, x: torch.Tensor, first_cell: int = 0) -> torch.Tensor:
        """Set restored positions of layer j in ``x`` [S, C', T, D] (cells from ``first_cell``)."""
        if j not in self.by_layer:
            return x
        return _set(x, self.by_layer[j], self.clean[j], first_cell)

    def hold(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """The severed sublayer's output at layer j: its corrupted values where this edit severs."""
        assert self.severed is not None
        if self.sever_at == "all":
            return self.severed[j][:, None].expand_as(x)
        if self.sever_index is None:
            return x
        return _set(x, self.sever_index, self.severed[j], 0)

    def at(self, j: int) -> Edit:
        def edit(kind: str, x: torch.Tensor) -> torch.Tensor:
            if kind == self.sever:
                return self.hold(j, x)
            if kind == self.kind:
                return self.restore(j, x)
            return x

        edit.kinds = frozenset({self.kind, self.sever})  # type: ignore[attr-defined]
        return edit


def staircase(
    stack: Stack,
    corrupted: Run,
    cross: Sequence[tuple[torch.Tensor, torch.Tensor]],
    cells: Sequence[Cell],
    edits: ChunkEdits,
) -> torch.Tensor:
    """Final states [S, C, T, D] of ``cells``, each starting from the corrupted run where it first differs.

    ``cells`` must be sorted by :func:`start_layer`.
    """
    n_layers = len(stack)
    starts = [start_layer(cell, edits.kind, n_layers) for cell in cells]
    s, t, d = corrupted.inputs[0].shape
    mask = stack.self_mask(t, corrupted.inputs[0].dtype, corrupted.inputs[0].device)
    h: torch.Tensor | None = None
    joined = 0

    def join(j: int) -> None:
        nonlocal h, joined
        count = 0
        while joined + count < len(cells) and starts[joined + count] == j:
            count += 1
        if not count:
            return
        new = corrupted.inputs[j][:, None].expand(s, count, t, d)
        if edits.kind == "hidden" and j > 0:  # the skipped layer j-1 ends in the restore
            new = edits.restore(j - 1, new, first_cell=joined)
        h = new if h is None else torch.cat([h, new], dim=1)
        joined += count

    for j in range(starts[0], n_layers):
        join(j)
        assert h is not None
        h = stack.layer(j, h, cross[j], mask, edits.at(j))
    join(n_layers)
    assert h is not None and h.shape[1] == len(cells)
    return h


def cut_staircase(
    stack: Stack,
    clean: Run,
    cross: Sequence[Any],
    starts: Sequence[int],
    cuts_at: Callable[[int, int], Cuts],
) -> torch.Tensor:
    """Final states [S, R, T, D] of R knockout rows on the clean run [S, T, D]: row r follows the clean run up to
    layer ``starts[r]`` (sorted), so no row recomputes the layers before its first cut; ``cuts_at(j, rows)`` gives
    layer j's cuts for the first ``rows`` rows."""
    n_layers = len(stack)
    s, t, d = clean.inputs[0].shape
    mask = stack.self_mask(t, clean.inputs[0].dtype, clean.inputs[0].device)
    h: torch.Tensor | None = None
    joined = 0
    for j in range(starts[0], n_layers + 1):
        count = sum(1 for start in starts[joined:] if start == j)
        if count:
            new = clean.inputs[j][:, None].expand(s, count, t, d)
            h = new if h is None else torch.cat([h, new], dim=1)
            joined += count
        if j < n_layers:
            assert h is not None
            h = stack.layer(j, h, cross[j], mask, cuts=cuts_at(j, joined))
    assert h is not None and h.shape[1] == len(starts)
    return h


def start_layer(cell: Cell, kind: str, num_layers: int) -> int:
    """First layer whose input differs from the corrupted run (``num_layers`` for an empty cell)."""
    if not cell:
        return num_layers
    first = min(layer for layer, _ in cell)
    return first + 1 if kind == "hidden" else first
