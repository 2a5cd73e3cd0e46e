"""Exact scores of cells: the corrupted run patched with each cell's clean states, run to the score.

    >>> from blip_trace_widgets import load_model, demo_samples, TraceConfig
    >>> from blip_trace_widgets.causal_trace.tracer import Tracer
    >>> image, question, _ = demo_samples()[0]
    >>> tracer = Tracer(load_model("demo"), image, question)
    >>> config = TraceConfig(samples=2)
    >>> block = tracer.blocks[config.block]
    >>> scores = tracer.scorers["exact"].score(block, [((0, 1),)], config, tracer.target(config))
    >>> scores.mean.shape, bool(scores.exact[0])
    ((1,), True)

Every scorer (:class:`ExactScorer`, :class:`VerifiedScorer` here and :class:`~.estimates.Estimator`) has one
method, ``score(block, cells, config, target, progress)``, returning :class:`~.scoring.Scores`; the tracer
picks one by ``config.method``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Final, Protocol

import numpy as np
import torch

from ..core.errors import BlipTraceError
from ..core.scoring import Scores, Target, score_rows
from ..models.attention import Cell
from ..models.chunks import chunks
from ..models.runs import ChunkEdits, staircase, start_layer
from . import directions, stages
from .blocks.base import Block, Corrupted
from .config import TraceConfig
from .corrupted import CorruptedRuns
from .estimates import Estimator

Advance = Callable[[int], None]  # told how many more cells are done


class Scorer(Protocol):
    """What the tracer asks of a scorer."""

    def score(self, block: Block, cells: Sequence[Cell], config: TraceConfig, target: Target,
              progress: Advance | None = None) -> Scores: ...


def _check_cells(block: Block, cells: Sequence[Cell], positions: int) -> None:
    layers = len(block.stack)
    for cell in cells:
        for layer, pos in cell:
            if not (0 <= layer < layers and 0 <= pos < positions):
                raise BlipTraceError(
                    f"cell entry (layer={layer}, position={pos}) is outside {layers} layers x {positions} positions")


class ExactScorer:
    """Patched runs for every cell: one draw shared by every cell, or (``fresh_noise``) a draw per cell."""

    def __init__(self, runs: CorruptedRuns) -> None:
        self.runs = runs

    def score(self, block: Block, cells: Sequence[Cell], config: TraceConfig, target: Target,
              progress: Advance | None = None) -> Scores:
        exact = np.ones(len(cells), bool)
        if not config.fresh_noise:
            mean, stderr, draws = self.patched(block, cells, config, target, None, progress)
            return Scores(mean, stderr, exact, draws)
        generator = torch.Generator().manual_seed(int(config.seed))
        self.runs.skip_draw(config, generator)  # the low score's draw comes first, as in the paper
        mean, stderr = np.empty(len(cells)), np.empty(len(cells))
        for i, cell in enumerate(cells):
            m, e, _ = self.patched(block, [cell], config, target, self.runs.draw(config, generator), progress)
            mean[i], stderr[i] = m[0], e[0]
        return Scores(mean, stderr, exact)

    @torch.no_grad()
    def patched(self, block: Block, cells: Sequence[Cell], config: TraceConfig, target: Target,
                corrupted: Corrupted | None, progress: Advance | None = None, *, donor: Corrupted | None = None,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean and standard error over noise samples of each cell's score, and each sample's score [samples,
        cells], against one corrupted draw (``None``: the seed's first, cached).

        ``donor`` (restoring only): another corrupted draw of as many samples, whose states each sample's cells
        restore from the same sample of, instead of the clean run's: a placebo map, every effect null by
        construction (what a significance test must not flag)."""
        clean_pass = self.runs.context
        clean_run, corrupted_run, cross = self.runs.runs(block, config, target, corrupted)
        _check_cells(block, cells, int(clean_run.kinds[config.kind][0].shape[1]))  # positions, or head units
        direction = directions.of(config.direction)
        base, patched, severed, clean_cross = direction.patched(clean_run, corrupted_run, config.kind, config.sever)
        if donor is not None:
            if not direction.restores:
                raise BlipTraceError("a donor draw replaces the clean states that restoring patches in: use it with "
                                     "direction='denoise'")
            given = self.runs.runs(block, config, target, donor)[1]
            if int(given.inputs[0].shape[0]) != int(corrupted_run.inputs[0].shape[0]):
                raise BlipTraceError(f"the donor draw has {int(given.inputs[0].shape[0])} samples and the corrupted "
                                     f"one {int(corrupted_run.inputs[0].shape[0])}: draw both with the same samples")
            patched = list(given.kinds[config.kind])  # [samples, ...] per layer: sample s from sample s
        if clean_cross:
            cross = block.clean_cross(clean_pass, target)
        prompt = stages.of(config.corrupt).downstream_prompt(self.runs, block, config, corrupted)
        n_layers, samples = len(block.stack), int(config.samples)
        order = sorted(range(len(cells)), key=lambda i: start_layer(cells[i], config.kind, n_layers))
        mean, stderr, draws = np.empty(len(cells)), np.empty(len(cells)), np.empty((samples, len(cells)))
        rows = block.rows_per_chunk(clean_pass, config, target)
        for chunk in chunks(order, max(1, rows // samples)):
            chunk_cells = [cells[i] for i in chunk]
            edits = ChunkEdits.build(config.kind, patched, chunk_cells, clean_pass.device, sever=config.sever,
                                      severed=severed, sever_at=config.sever_at)
            logits = block.logits(clean_pass, staircase(block.stack, base, cross, chunk_cells, edits), target,
                                  prompt)
            s, c = logits.shape[:2]
            scores = score_rows(logits.reshape(s * c, *logits.shape[2:]), target, config.metric).view(s, c).double()
            draws[:, chunk] = scores.cpu().numpy()
            mean[chunk] = scores.mean(0).cpu().numpy()
            stderr[chunk] = (scores.std(0) / np.sqrt(s)).cpu().numpy() if s > 1 else np.nan
            self.runs.clean_pass.stats["engine_chunks"] += 1
            if progress is not None:
                progress(len(chunk))
        return mean, stderr, draws


#: The direction whose one-step estimate picks a verified map's cells, in either direction: the clean run's
#: first-order terms (what noising each state would take away). Restoring into a corrupted run that has lost the
#: answer, its gradients are flat where the cells that bring the answer back lie; the clean run's are not. On 70
#: demo maps (hidden states and MLP, 50 easy-VQA questions, 30-sample references) the clean side's top 10 held the
#: reference's top significant cell in 97% of maps, the corrupted run's in 83%.
RANKED_BY: Final = "noise"


class VerifiedScorer:
    """The estimate of every cell, then the exact score of the ``config.verify`` cells that the clean run's one-step
    estimate (:data:`RANKED_BY`) puts furthest from the clean score (either way), and with ``order=2`` or
    ``grad_drop`` of every flagged cell, over the same noise draw."""

    def __init__(self, exact: ExactScorer, estimator: Estimator,
                 unreliable: Callable[[TraceConfig], np.ndarray]) -> None:
        self.exact = exact
        self.estimator = estimator
        self.unreliable = unreliable

    def pick(self, block: Block, cells: Sequence[Cell], config: TraceConfig, target: Target,
             progress: Advance | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The estimate's mean and standard error of every cell, and the indices of the cells to make exact."""
        ranking = replace(config, direction=RANKED_BY, order=1, grad_drop=False, qk_fix=False, steps=1)
        ranked, _, _, _ = self.estimator.score(block, cells, ranking, target)  # first: flags follow the shown one
        base = float(self.estimator.gradients(block, ranking, target).scores.mean())  # the clean score
        mean, stderr, _, _ = self.estimator.score(block, cells, config, target, progress)
        picked = np.argsort(-np.nan_to_num(np.abs(ranked - base), nan=-1.0), kind="stable")[: int(config.verify)]
        if config.flags_cells:  # every flagged cell is made exact too
            picked = np.union1d(picked, np.flatnonzero(self.unreliable(config)))
        return mean, stderr, picked

    def score(self, block: Block, cells: Sequence[Cell], config: TraceConfig, target: Target,
              progress: Advance | None = None) -> Scores:
        mean, stderr, picked = self.pick(block, cells, config, target, progress)
        exact_mean, exact_stderr, exact_draws = self.exact.patched(block, [cells[i] for i in picked], config, target,
                                                                   None)
        mean[picked], stderr[picked] = exact_mean, exact_stderr
        draws = np.full((exact_draws.shape[0], len(cells)), np.nan)  # estimated cells are not tested
        draws[:, picked] = exact_draws
        marked = np.zeros(len(cells), bool)
        marked[picked] = True
        return Scores(mean, stderr, marked, draws)
