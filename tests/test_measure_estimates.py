"""scripts/measure_estimates.py: the exact map's own ceiling (another draw, a many-sample reference) is measured right."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from fast_subset import lengthy

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "measure_estimates.py"


@pytest.fixture(scope="module")
def measure():
    spec = importlib.util.spec_from_file_location("measure_estimates", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_map_agrees_with_itself_and_a_shuffled_one_does_not(measure):
    wanted = np.arange(12.0).reshape(4, 3)
    significant = wanted > 2
    same = measure._against(wanted, significant, wanted.copy(), "x")
    assert same == {"x_significant_spearman": pytest.approx(1.0), "x_reference_top": True,
                    "x_reference_top_in_top3": True}
    reversed_map = measure._against(wanted, significant, -wanted, "x")
    assert reversed_map["x_significant_spearman"] == pytest.approx(-1.0)
    assert not reversed_map["x_reference_top"] and not reversed_map["x_reference_top_in_top3"]
    few = measure._against(wanted, wanted > 9, wanted, "x")  # fewer than 4 significant cells: no correlation
    assert np.isnan(few["x_significant_spearman"])


@lengthy
def test_the_ceiling_uses_independent_draws_and_paired_effects(measure, demo_bundle, demo_sample):
    from blip_trace_widgets.causal_trace.tracer import Tracer, default_config

    image, question, _ = demo_sample
    tracer = Tracer(demo_bundle, image, question)
    config = default_config(demo_bundle, block="answer_decoder", kind="hidden", samples=2)
    exact = tracer.trace(config)
    row, wanted, significant = measure._ceiling(tracer, config, exact, 4)
    draws = [tracer.trace(config, seed=measure.REFERENCE_SEED + i, samples=1) for i in range(4)]
    effects = np.stack([d.scores - d.low_score for d in draws])
    np.testing.assert_allclose(wanted, effects.mean(0))
    np.testing.assert_array_equal(significant, np.abs(effects.mean(0)) > 2 * effects.std(0, ddof=1) / 2)
    again = tracer.trace(config, seed=config.seed + 1)
    assert not np.allclose(again.scores, exact.scores)  # another draw, not the same one
    assert row["significant_cells"] == int(significant.sum())
    assert row["reference_top_significant"] == bool(significant.flat[int(np.argmax(wanted))])
    assert -1 <= row["exact_again_spearman"] <= 1
