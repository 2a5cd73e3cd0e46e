"""Attribution-patching estimates of a causal trace: every cell from one forward and one backward pass.

    >>> from blip_trace_widgets import load_model, trace, demo_samples
    >>> bundle = load_model("demo")
    >>> image, question, _ = demo_samples()[0]
    >>> result = trace(bundle, image, question, method="estimate", samples=3)
    >>> result.is_estimate, result.scores.shape == (len(result.tokens), result.num_layers)
    (True, True)

Restoring a state ``a`` of the corrupted run to its clean value changes the score by about
``(a_clean - a_corrupt) · ∂score/∂a``, the gradient taken at the corrupted run (attribution
patching: Nanda 2023; Kramár et al. 2024). One forward and one backward pass per noise sample
give that gradient for every layer, position and kind of a block at once; a cell (a window of
layers, an image region) sums its states' terms. Each noise sample gets its own estimate, and
the result averages them as an exact trace does.

``order=2`` adds the second-order term ``δᵀHδ / 2`` of each cell (``H`` the Hessian of the score in the
cell's states, taken along the cell's own ``δ``): every cell runs through the engine with a backward pass
and a second backward pass through it. A cell whose second-order term is large against the map's total
effect is flagged: its first-order estimate is not to be trusted there.

``steps=k`` integrates the gradient along each cell's own straight path from its corrupted to
its clean states, at ``α = 0, 1/k, …, (k-1)/k`` (a left Riemann sum; ``k = 1`` is plain
attribution patching). By the gradient theorem the sum tends to the exact restored score as
``k`` grows. The point ``α = 0`` is shared by every cell; each further point runs every cell
through the patching engine with a backward pass, so ``steps=k`` costs about ``3 (k - 1)``
exact traces: it is for checking an estimate, not for speed.

Where the linear approximation fails (saturated softmaxes in attention or in the answer's
probability, large corruptions), the estimate can be far from exact: ``scripts/measure_estimates.py``
measures how far on the demo model, and docs/reference.md reports it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ..core.cache import LRU
from ..core.names import RELIABILITY_TOLERANCE, TINY_ABSOLUTE
from ..core.scoring import Scores, Target, score_rows
from ..models.attention import Cell
from ..models.chunks import chunks
from ..models.runs import ChunkEdits, Run, cell_pairs, staircase, start_layer
from . import directions, stages
from .blocks.base import Block, Context
from .config import TraceConfig, cache_key
from .qk_fix import attention_gradients, qk_correction


class Runs(Protocol):
    """What an estimate reads: the clean pass's context, a block's clean and corrupted runs (and what they attend to), and
    the corrupted patches of an image-side trace (a :class:`~.corrupted.CorruptedRuns`)."""

    @property
    def context(self) -> Context: ...

    def runs(self, block: Block, config: TraceConfig, target: Target) -> tuple[Any, Any, Any]: ...

    def corrupted_patches(self, config: TraceConfig) -> torch.Tensor: ...

    def corrupted(self, config: TraceConfig) -> Any: ...

#: A backward pass keeps every activation of its forward pass: chunks of cells are this much smaller.
BACKWARD_SHRINK = 4


@dataclass(frozen=True)
class Gradients:
    """The corrupted run of one block scored per noise sample, and for every kind the first-order term
    ``(clean - corrupted) · ∂score/∂state`` of every (layer, position): ``terms[kind]`` is [S, L, T],
    float64. The gradients themselves are not kept (for the vision encoder they would be larger than
    the corrupted runs)."""

    scores: torch.Tensor  # [S]
    terms: dict[str, torch.Tensor]


def _scores(runs: Runs, block: Block, final: torch.Tensor, target: Target, config: TraceConfig) -> torch.Tensor:
    """Per-row scores [S, C] of final states [S, C, T, D]."""
    logits = block.logits(runs.context, final, target, stages.of(config.corrupt).downstream_prompt(runs, block, config, None))
    s, c = logits.shape[:2]
    return score_rows(logits.reshape(s * c, *logits.shape[2:]), target, config.metric).view(s, c)


def _state_gradients(runs: Runs, block: Block, start: torch.Tensor, cross: Any, target: Target,
                     config: TraceConfig, dropped: int | None = None,
                     ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]], dict[str, list]]:
    """One forward and one backward pass of ``block`` from ``start`` [S, T, D], with a zero added to every state
    so that its gradient is the gradient with respect to that state (no parameter gradient is made or kept):
    the scores [S], and per kind the gradients and the states of every layer, [S, T, D] each. With ``dropped``,
    the backward pass reaches that layer's input only along its skip connections (GradDrop)."""
    stack = block.stack
    leaves: dict[str, list[torch.Tensor]] = {kind: [] for kind in stack.kinds}
    states: dict[str, list[torch.Tensor]] = {kind: [] for kind in stack.kinds}

    def edit(kind: str, x: torch.Tensor) -> torch.Tensor:
        states[kind].append(x[:, 0].detach())
        leaf = torch.zeros_like(x, requires_grad=True)
        leaves[kind].append(leaf)
        return x + leaf

    mask = stack.self_mask(start.shape[1], start.dtype, start.device)
    with torch.enable_grad():
        h = start[:, None]
        for j in range(len(stack)):
            h = stack.layer(j, h, cross[j], mask, edit, drop=j == dropped)
        scores = _scores(runs, block, h, target, config)[:, 0]
        grads = iter(torch.autograd.grad(scores.sum(), [leaf for kind in stack.kinds for leaf in leaves[kind]]))
    gradients = {kind: [next(grads)[:, 0] for _ in leaves[kind]] for kind in stack.kinds}
    return scores.detach(), gradients, states


def _terms(deltas: list[torch.Tensor], gradients: list[torch.Tensor]) -> torch.Tensor:
    """Per sample, layer and position, ``delta · gradient`` in float64: [S, L, T]."""
    return torch.stack([(d.double() * g.double()).sum(-1) for d, g in zip(deltas, gradients)], 1).cpu()


def corrupted_gradients(runs: Runs, block: Block, config: TraceConfig, target: Target) -> Gradients:
    """Denoising's first-order terms: the corrupted run's gradient times ``(clean - corrupted)`` per state.

    For the vision encoder this pass is the corrupted run itself (its states are kept as it goes), so the
    estimate costs no separate corrupted pass; the text blocks start from their cached corrupted runs."""
    if block.image_side:
        clean, start, cross = runs.context.clean_vision, runs.corrupted_patches(config), [None] * len(block.stack)
        corrupted: Any = None
    else:
        clean, corrupted, cross = runs.runs(block, config, target)
        start = corrupted.inputs[0]
    scores, gradients, states = _state_gradients(runs, block, start, cross, target, config)
    terms = {kind: _terms(_deltas(clean.kinds[kind], corrupted.kinds[kind] if corrupted is not None else states[kind]),
                          gradients[kind]) for kind in block.stack.kinds}
    return Gradients(scores.double().cpu(), terms)


def clean_gradients(runs: Runs, block: Block, config: TraceConfig, target: Target) -> Gradients:
    """Noising's first-order terms: one forward and one backward pass of the clean run give ∂score/∂state there,
    and each noise sample's ``(corrupted - clean) · ∂score/∂state`` is what patching that state in would change.
    ``scores`` are the clean score (the base a noising cell starts from), once per sample."""
    clean, corrupted, _ = runs.runs(block, config, target)
    cross = block.clean_cross(runs.context, target)  # what the clean run attends to ([None] per layer for the ViT)
    score, gradients, _ = _state_gradients(runs, block, clean.inputs[0], cross, target, config)
    terms = {kind: _terms([-d for d in _deltas(clean.kinds[kind], corrupted.kinds[kind])], gradients[kind])
             for kind in block.stack.kinds}
    samples = int(corrupted.inputs[0].shape[0])
    return Gradients(score.double().cpu().expand(samples), terms)


def _deltas(clean: list[torch.Tensor], corrupted: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, the clean [1, T, D] minus the corrupted states [S, T, D]."""
    return [c[:1] - r for c, r in zip(clean, corrupted)]


def _base(runs: Runs, block: Block, config: TraceConfig, target: Target,
          ) -> tuple[Run, Any, list[torch.Tensor], list[torch.Tensor]]:
    """The run a trace patches into (the corrupted run when denoising, the clean run once per sample when
    noising), what it attends to, its states of ``config.kind`` per layer, and per layer the patched states minus
    those ([S, T, D]): each cell's path runs from the base states to the patched ones."""
    clean, run, cross = runs.runs(block, config, target)
    kind = config.kind
    base, states, paths, clean_cross = directions.of(config.direction).estimate_paths(
        clean, run, kind, _deltas(clean.kinds[kind], run.kinds[kind]))
    return base, (block.clean_cross(runs.context, target) if clean_cross else cross), states, paths


def cancellation(runs: Runs, block: Block, cells: Sequence[Cell], config: TraceConfig, target: Target,
                 plain: torch.Tensor) -> torch.Tensor:
    """GradDrop's sign of cancelling paths, per sample and cell [S, C]: the first-order term taken again with each
    layer's sublayers dropped from the backward pass in turn (one more forward and backward pass per layer),
    ``Σ_l |term_l| / (L - 1)`` (Kramár et al.'s AtP*, in ``koayon/atp_star``'s form), less ``|plain|``, the cell's
    own first-order term. Where a cell's paths cancel, dropping one of them shows the other: the gap is large while
    the estimate is small. Cells of one layer only (a window's states lie on each other's paths)."""
    run, cross, _, deltas = _base(runs, block, config, target)
    layers = len(block.stack)
    dropped = []
    for layer in range(layers):
        _, gradients, _ = _state_gradients(runs, block, run.inputs[0], cross, target, config, dropped=layer)
        dropped.append(_cell_sums(_terms(deltas, gradients[config.kind]), cells).abs())
    return torch.stack(dropped).sum(0) / max(layers - 1, 1) - plain.abs()


def qk_terms(runs: Runs, block: Block, config: TraceConfig, target: Target) -> torch.Tensor:
    """What the QK fix adds to each hidden state's first-order term (see :mod:`~.qk_fix`), per sample, layer and
    position: [S, L, T], float64 (zero at the last layer, whose states feed no attention of the block)."""
    run, cross, states, deltas = _base(runs, block, config, target)
    stack = block.stack
    attention = attention_gradients(stack, run.inputs[0], cross,
                                    lambda final: _scores(runs, block, final, target, config)[:, 0])
    out = torch.zeros(states[0].shape[0], len(stack), states[0].shape[1], dtype=torch.float64)
    with torch.no_grad():
        for layer in range(len(stack) - 1):
            q, k = stack.self_qk(layer + 1, states[layer])
            q2, k2 = stack.self_qk(layer + 1, states[layer] + deltas[layer])
            seen = attention[layer + 1]
            out[:, layer] = qk_correction(q, k, q2 - q, k2 - k, seen.scores, seen.weights, seen.grad_scores,
                                          seen.grad_weights).cpu()
    return out


def _cell_sums(terms: torch.Tensor, cells: Sequence[Cell]) -> torch.Tensor:
    """Per sample and cell, the sum of ``terms`` [S, L, T] over the cell's (layer, position) pairs: [S, C]."""
    index = [(ci, layer, pos) for ci, cell in enumerate(cells) for layer, pos in cell]
    out = torch.zeros(terms.shape[0], len(cells), dtype=terms.dtype)
    if index:
        c, layer, pos = (torch.tensor(v) for v in zip(*index))
        out.index_add_(1, c, terms[:, layer, pos])
    return out


@dataclass
class _PathEdits(ChunkEdits):
    """Sets each cell's states to the point ``alpha`` of the cell's path, ``base + alpha * delta`` (each cell its
    own alpha; the base is the corrupted run when denoising, the clean run when noising), adding a zero leaf there
    whose gradient is the gradient with respect to those states."""

    base: list[torch.Tensor] = field(default_factory=list)  # per layer, the base run's states, [S, T, D]
    deltas: list[torch.Tensor] = field(default_factory=list)  # per layer, patched minus base states, [S, T, D]
    alphas: torch.Tensor | None = None  # per cell of the chunk
    leaves: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # (layer, first cell, leaf)

    def restore(self, j: int, x: torch.Tensor, first_cell: int = 0) -> torch.Tensor:
        if j not in self.by_layer:
            return x
        assert self.alphas is not None
        cells, positions = self.by_layer[j]
        keep = (cells >= first_cell) & (cells < first_cell + x.shape[1])
        if bool(keep.any()):
            cells, positions = cells[keep], positions[keep]
            x = x.clone()
            x[:, cells - first_cell, positions] = (self.base[j][:, positions]
                                                   + self.alpha(cells, x) * self.deltas[j][:, positions])
        return self.leaf(j, first_cell, x)

    def alpha(self, cells: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The path point of each (sample, cell) pair at ``cells``, broadcastable to [S, K, D]."""
        assert self.alphas is not None
        return self.alphas[cells][None, :, None]

    def leaf(self, j: int, first_cell: int, x: torch.Tensor) -> torch.Tensor:
        """``x`` plus a zero leaf whose gradient is the gradient with respect to these states."""
        leaf = torch.zeros_like(x, requires_grad=True)
        self.leaves.append((j, first_cell, leaf))
        return x + leaf


def _layers(cell: Cell) -> int:
    return len({layer for layer, _ in cell})


def _path_terms(runs: Runs, block: Block, cells: Sequence[Cell], config: TraceConfig, target: Target,
                first_step: int) -> torch.Tensor:
    """Per sample and cell, the sum over the path points ``alpha = first_step/k, ..., (k-1)/k`` of
    ``delta · gradient`` there: [S, C]. Every (cell, point) pair is one row of the engine's batches.

    Each gradient is taken with the cell's other states held at their path values (free variables of the
    score): restoring a state overrides whatever an earlier state of the same cell sent through it, so a
    path through a later restored state must not be counted again."""
    run, cross, states, deltas = _base(runs, block, config, target)
    kind = config.kind
    steps, n_layers, samples = int(config.steps), len(block.stack), int(config.samples)
    pairs = [(ci, step / steps) for step in range(first_step, steps) for ci in range(len(cells))]
    order = sorted(range(len(pairs)), key=lambda i: start_layer(cells[pairs[i][0]], kind, n_layers))
    out = torch.zeros(samples, len(cells), dtype=torch.float64)
    rows = max(1, block.rows_per_chunk(runs.context, config, target) // (samples * BACKWARD_SHRINK))
    for chunk in chunks(order, rows):
        chunk_cells = [cells[pairs[i][0]] for i in chunk]
        alphas = torch.tensor([pairs[i][1] for i in chunk], dtype=deltas[0].dtype, device=runs.context.device)
        edits = _PathEdits(kind=kind, clean=[], by_layer=cell_pairs(chunk_cells, runs.context.device, every_layer=False),
                           base=states, deltas=deltas, alphas=alphas)
        with torch.enable_grad():
            final = staircase(block.stack, run, cross, chunk_cells, edits)
            scores = _scores(runs, block, final, target, config)
            grads = torch.autograd.grad(scores.sum(), [leaf for _, _, leaf in edits.leaves]) if edits.leaves else ()
        terms = torch.zeros(samples, len(chunk), dtype=torch.float64)
        for (j, first, leaf), grad in zip(edits.leaves, grads):
            cell_index, positions = edits.by_layer[j]
            keep = (cell_index >= first) & (cell_index < first + leaf.shape[1])
            c, p = cell_index[keep], positions[keep]
            values = (deltas[j][:, p].double() * grad[:, c - first, p].double()).sum(-1)
            terms.index_add_(1, c.cpu(), values.cpu())
        out.index_add_(1, torch.tensor([pairs[i][0] for i in chunk]), terms)
    return out


@dataclass
class _TaylorEdits(_PathEdits):
    """Sets each cell's states to ``base + alpha * delta``, one ``alpha`` per (noise sample, cell) ([S, C],
    zeros that require grad), so that the score's derivatives in ``alpha`` at 0 are the cell's first- and
    second-order terms (the cell's other states held, as every state of a cell is set). No leaves."""

    def alpha(self, cells: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        assert self.alphas is not None
        return self.alphas[:, cells, None].to(x.dtype)

    def leaf(self, j: int, first_cell: int, x: torch.Tensor) -> torch.Tensor:
        return x


def taylor_terms(runs: Runs, block: Block, cells: Sequence[Cell], config: TraceConfig,
                 target: Target) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and cell, the first-order term ``f'(0)`` and the second-order term ``f''(0) / 2`` of the score
    ``f(alpha)`` with the cell's states at ``base + alpha * delta`` ([S, C] each): one forward pass of every
    cell through the engine, a backward pass, and a second backward pass through it (a Hessian-vector product
    along each cell's own delta)."""
    run, cross, states, deltas = _base(runs, block, config, target)
    kind = config.kind
    n_layers, samples = len(block.stack), int(config.samples)
    order = sorted(range(len(cells)), key=lambda i: start_layer(cells[i], kind, n_layers))
    first_terms = torch.zeros(samples, len(cells), dtype=torch.float64)
    second_terms = torch.zeros(samples, len(cells), dtype=torch.float64)
    rows = max(1, block.rows_per_chunk(runs.context, config, target) // (samples * 2 * BACKWARD_SHRINK))
    for chunk in chunks(order, rows):
        chunk_cells = [cells[i] for i in chunk]
        alphas = torch.zeros(samples, len(chunk), dtype=torch.float64, device=runs.context.device, requires_grad=True)
        edits = _TaylorEdits(kind=kind, clean=[], by_layer=cell_pairs(chunk_cells, runs.context.device, every_layer=False),
                             base=states, deltas=deltas, alphas=alphas)
        with torch.enable_grad():
            scores = _scores(runs, block, staircase(block.stack, run, cross, chunk_cells, edits), target, config)
            (first,) = torch.autograd.grad(scores.sum(), [alphas], create_graph=True)
            second = (torch.autograd.grad(first.sum(), [alphas])[0] if first.requires_grad
                      else torch.zeros_like(first))  # a score linear in alpha has no second-order term
        index = torch.tensor(chunk)
        first_terms[:, index] = first.detach().double().cpu()
        second_terms[:, index] = 0.5 * second.double().cpu()
    return first_terms, second_terms


class Estimator:
    """Estimates for one :class:`~.tracing.Tracer`, keeping each block's gradient pass (every kind at once)."""

    def __init__(self, runs: Runs, cache_size: int = 2) -> None:
        self.source = runs
        self._gradients: LRU[Gradients] = LRU(cache_size)
        self._qk: LRU[torch.Tensor] = LRU(cache_size)
        #: The last order=2 estimate's second-order terms [S, C], for the reliability flag.
        self.second_order: torch.Tensor | None = None
        #: The last grad_drop estimate's GradDrop gaps [S, C] (see :func:`cancellation`), for the reliability flag.
        self.cancelling: torch.Tensor | None = None

    def held(self) -> list[Any]:
        return [*self._gradients.values(), *self._qk.values()]

    def gradients(self, block: Block, config: TraceConfig, target: Target) -> Gradients:
        """The first-order terms at the run a trace patches into: the corrupted run (denoising) or the clean
        run (noising); ``scores`` are that run's."""
        key = (block.name, cache_key(config, "decoder"), target, config.metric, config.direction)
        make = corrupted_gradients if directions.of(config.direction).restores else clean_gradients
        return self._gradients.get_or_make(key, lambda: make(self.source, block, config, target))

    def clear(self) -> None:
        """Forget the kept gradient passes."""
        self._gradients.clear()
        self._qk.clear()

    def qk_terms(self, block: Block, config: TraceConfig, target: Target) -> torch.Tensor:
        """Per sample, layer and position, what the QK fix adds to a hidden state's estimate (see :mod:`~.qk_fix`):
        [S, L, T], float64; kept per block and corruption as the gradient pass is."""
        key = (block.name, cache_key(config, "decoder"), target, config.metric, config.direction)
        return self._qk.get_or_make(key, lambda: qk_terms(self.source, block, config, target))

    def flagged(self, config: TraceConfig, low: float, high: float) -> np.ndarray:
        """Per cell of the last estimate with flags (``order=2`` or ``grad_drop``): whether its second-order term,
        or its GradDrop gap, averaged over the noise samples, exceeds RELIABILITY_TOLERANCE of the total effect
        ``high - low`` (or of the metric's floor when that is larger)."""
        assert config.flags_cells, "flagged() follows an estimate with order=2 or grad_drop"
        tolerance = RELIABILITY_TOLERANCE * max(abs(high - low), TINY_ABSOLUTE.get(config.metric, 0.0))
        signs = [self.second_order.mean(0).abs() if config.order == 2 and self.second_order is not None else None,
                 self.cancelling.mean(0) if config.grad_drop and self.cancelling is not None else None]
        present = [sign.numpy() > tolerance for sign in signs if sign is not None]
        assert present, "flagged() follows the estimate it flags"
        return np.logical_or.reduce(present)

    def score(self, block: Block, cells: Sequence[Cell], config: TraceConfig, target: Target,
              progress: Callable[[int], None] | None = None) -> Scores:
        """Mean and standard error over noise samples of each cell's estimated score; no cell is exact."""
        gradients = self.gradients(block, config, target)
        if config.order == 2:
            first, second = taylor_terms(self.source, block, cells, config, target)
            self.second_order = second
            return self._summary(gradients.scores[:, None] + first + second, cells, progress)
        total = torch.zeros(gradients.scores.shape[0], len(cells), dtype=torch.float64)
        # A cell of one layer (one state per position, or a region at one layer) needs no held gradient: no state
        # of the cell lies on another's path, so the shared pass's gradients are the held ones. A window's
        # layers do lie on each other's paths: every point of its path is run with the cell's states held.
        single = [i for i, cell in enumerate(cells) if _layers(cell) <= 1]
        windows = [i for i, cell in enumerate(cells) if _layers(cell) > 1]
        if single:
            terms = gradients.terms[config.kind]
            if config.qk_fix:
                terms = terms + self.qk_terms(block, config, target)
            part = _cell_sums(terms, [cells[i] for i in single])
            if config.grad_drop:
                self.cancelling = torch.zeros(part.shape[0], len(cells), dtype=torch.float64)
                self.cancelling[:, single] = cancellation(self.source, block, [cells[i] for i in single], config,
                                                          target, part)
            if config.steps > 1:
                part += _path_terms(self.source, block, [cells[i] for i in single], config, target, first_step=1)
            total[:, single] = part
        if windows:
            total[:, windows] = _path_terms(self.source, block, [cells[i] for i in windows], config, target,
                                            first_step=0)
        return self._summary(gradients.scores[:, None] + total / int(config.steps), cells, progress)

    @staticmethod
    def _summary(estimates: torch.Tensor, cells: Sequence[Cell], progress: Callable[[int], None] | None) -> Scores:
        """Mean and standard error over noise samples of per-sample estimates [S, C]."""
        if progress is not None:
            progress(len(cells))
        samples = estimates.shape[0]
        stderr = estimates.std(0) / np.sqrt(samples) if samples > 1 else torch.full((len(cells),), float("nan"))
        return Scores(estimates.mean(0).numpy(), stderr.double().numpy(), np.zeros(len(cells), bool))
