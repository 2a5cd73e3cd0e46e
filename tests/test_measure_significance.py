"""scripts/measure_significance.py: placebo maps are null by construction, and the script's figures are complete."""
from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fast_subset import lengthy

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "measure_significance.py"


@pytest.fixture(scope="module")
def measure():
    spec = importlib.util.spec_from_file_location("measure_significance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tracer(demo_bundle, demo_sample):
    from blip_trace_widgets.causal_trace.tracer import Tracer

    image, question, _ = demo_sample
    return Tracer(demo_bundle, image, question, corrupted_cache_size=4)


@lengthy
def test_a_donor_draw_replaces_the_clean_states_sample_by_sample(measure, tracer, demo_bundle):
    from blip_trace_widgets.causal_trace.tracer import default_config
    from blip_trace_widgets.core.errors import BlipTraceError

    config = default_config(demo_bundle, kind="mlp", samples=3)
    # Restoring a state from its own draw changes nothing: every placebo effect is zero (to float rounding: the
    # patched runs are batched apart from the corrupted score's).
    np.testing.assert_allclose(measure.placebo_draws(tracer, config, donor_seed=config.seed), np.zeros((3, 10, 4)),
                               atol=1e-6)
    # Another draw changes the scores, and sample by sample: each sample's restored state comes from the same
    # sample of the donor (a donor of one sample would patch that one into every sample).
    other = measure.placebo_draws(tracer, config)
    assert other.shape == (3, 10, 4) and np.abs(other).max() > 1e-3
    block, target = tracer.blocks[config.block], tracer.target(config)
    cells = block.layout(tracer.clean_pass.context, config, target).cells
    scorer = tracer.scorers["exact"]
    donor = tracer.corrupted_runs.corrupted(replace(config, seed=measure.PLACEBO_SEED))
    low = tracer.baseline_draws(config)[0]
    base = tracer.corrupted_runs.corrupted(config)
    for sample in range(3):  # sample s alone: its own corrupted draw, patched from the donor's sample s
        _, _, scores = scorer.patched(block, cells, replace(config, samples=1), target, _sample(base, sample),
                                      donor=_sample(donor, sample))
        np.testing.assert_allclose(scores[0] - low[sample], other[sample].ravel(), atol=1e-6)
    # Without a donor the same arithmetic gives the trace's own per-draw effects.
    _, _, scores = scorer.patched(block, cells, config, target, None)
    np.testing.assert_allclose((scores - low[:, None]).reshape(3, 10, 4), tracer.trace(config).draws, atol=1e-12)
    with pytest.raises(BlipTraceError, match="direction='denoise'"):
        scorer.patched(block, cells, replace(config, direction="noise"), target, None, donor=donor)
    with pytest.raises(BlipTraceError, match="same samples"):
        scorer.patched(block, cells, config, target, None,
                       donor=tracer.corrupted_runs.corrupted(replace(config, samples=2, seed=measure.PLACEBO_SEED)))


def _sample(value, s):
    """One noise sample of a corrupted draw (its tensors of one row per sample cut to row ``s``)."""
    import dataclasses

    import torch

    if isinstance(value, torch.Tensor):
        return value[s:s + 1] if value.shape[0] == 3 else value
    if isinstance(value, (list, tuple)):
        return type(value)(_sample(v, s) for v in value)
    if isinstance(value, dict):
        return {k: _sample(v, s) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: _sample(getattr(value, f.name), s)
                                             for f in dataclasses.fields(value) if f.init})
    return value


@lengthy
def test_the_script_writes_every_figure(measure, tmp_path, capsys):
    report = measure.main(["--per-type", "1", "--workers", "1", "--kinds", "hidden", "cross_attn", "--samples", "3",
                           "--reference-samples", "4", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "figures.json").read_text())
    assert saved["questions"] == 3 and saved["release"] and saved["command"].endswith(f"--out {tmp_path}")
    assert list(saved["groups"]) == ["all", "question encoder hidden, window 1", "question encoder cross_attn, window 1"]
    for figures in saved["groups"].values():
        assert set(figures) == set(report["groups"]["all"])
        for name in ("placebo_cells_flagged", "placebo_maps_clean", "replication_same_sign"):
            assert figures[name] is None or 0 <= figures[name] <= 1
    assert saved["groups"]["all"]["maps"] == 6 and set(saved["verdicts"]) == {
        "placebo_maps_clean", "replication_same_sign", "replication_reference_top", "verified", "auto"}
    import pandas as pd

    rows = pd.read_csv(tmp_path / "rows.csv")
    assert len(rows) == 6 and (rows["placebo_tested"] == rows["cells"]).all()  # every placebo cell is tested
    assert (rows["same_sign"] <= rows["flagged"]).all()
    assert ((rows["auto_jaccard"] >= 0) & (rows["auto_jaccard"] <= 1)).all() and (rows["auto_samples"] == 4).all()
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "summary.md").read_text() + "\n"
    assert "uptime" in printed and "| 6 | all |" in printed and printed.count("\n|---|") == 3


def test_the_jaccard_index_of_two_significant_sets(measure):
    a, b = np.array([[True, False], [True, True]]), np.array([[True, True], [False, True]])
    assert measure.jaccard(a, b) == 2 / 4 and measure.jaccard(a, a) == 1.0
    assert measure.jaccard(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0  # both say: nothing is real
    assert measure.jaccard(a, np.zeros((2, 2), bool)) == 0.0
