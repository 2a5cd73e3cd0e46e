"""samples="auto": maps drawn in rounds equal one batch, stop when stable or at the budget, and can be stopped."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from fast_subset import lengthy
from tiny_blip import tiny_model, tiny_processor
from tolerance import assert_close

from blip_trace_widgets import BlipTraceError, GaussianNoise, TraceConfig, Tracer, WordSwap, load_model, trace
from blip_trace_widgets.causal_trace.sharpen import AutoSampling, sharpen, status_text
from blip_trace_widgets.core.names import DEFAULT_VERIFY


@pytest.fixture(scope="module")
def tracer(image, question):
    return Tracer(load_model((tiny_model(seed=1), tiny_processor()), device="cpu"), image, question)


CONFIG = TraceConfig(kind="mlp", window=1, seed=7, corruption=GaussianNoise(2.0))


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@lengthy
def test_rounds_equal_one_batch_for_the_same_seed(tracer, direction):
    config = TraceConfig(kind="mlp", window=1, seed=7, corruption=GaussianNoise(2.0), direction=direction)
    seen = []
    rounds = sharpen(tracer, config, AutoSampling(round_samples=3, max_samples=9, stable_rounds=99),
                     on_round=seen.append)
    batch = tracer.trace(config, samples=9)
    assert [r.config["samples"] for r in seen] == [3, 6, 9] and rounds.config["auto"]["stopped"] == "budget"
    assert_close(rounds.scores, batch.scores)
    assert_close(rounds.draws, batch.draws)
    assert rounds.low_score == pytest.approx(batch.low_score, rel=1e-6)
    assert_close(seen[0].draws, batch.draws[:3])  # the first round is the first three samples of the batch


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_a_verified_map_sharpens_its_exact_cells_only(tracer, direction):
    """The estimate over the seed's first 10 draws picks the cells; the rounds draw those cells exactly, and they
    equal the exact map of as many samples there; the other cells stay the estimate's and are not tested."""
    config = TraceConfig(kind="mlp", window=1, seed=7, corruption=GaussianNoise(2.0), direction=direction,
                         method="verified", verify=4)
    result = sharpen(tracer, config, AutoSampling(round_samples=3, max_samples=12, stable_rounds=99))
    assert result.config["samples"] == 12 and result.config["auto"]["estimate_samples"] == 10
    once = tracer.trace(replace(config, samples=10))
    assert result.config["exact_cells"] == once.config["exact_cells"]  # the same estimate picked the same cells
    cells = np.array(result.config["exact_cells"])
    exact = tracer.trace(replace(config, method="exact", verify=DEFAULT_VERIFY, samples=12))
    rows, layers = cells[:, 0], cells[:, 1]
    assert_close(result.scores[rows, layers], exact.scores[rows, layers])
    tested = result.statistics().tested()
    assert tested.sum() == len(cells) and tested[rows, layers].all()
    assert (result.exact_cells == tested).all()
    estimate = tracer.trace(replace(config, method="estimate", verify=DEFAULT_VERIFY, samples=10))
    assert_close(result.scores[~tested], estimate.scores[~tested])


@lengthy
def test_a_stable_map_stops_before_its_budget(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    result = trace(demo_bundle, image, question, kind="hidden", samples=AutoSampling(round_samples=4, max_samples=40))
    auto = result.config["auto"]
    assert auto["stopped"] == "stable" and result.config["samples"] < 40 and auto["held"] == 2
    assert status_text(result).startswith(f"{result.config['samples']} samples · ")
    assert "top cell stable" in status_text(result) and "stopped: stable" in status_text(result)


@lengthy
def test_the_user_can_stop_it_and_seconds_bound_it(tracer):
    stopped = sharpen(tracer, CONFIG, AutoSampling(round_samples=2, max_samples=20), should_stop=lambda: True)
    assert stopped.config["samples"] == 2 and stopped.config["auto"]["stopped"] == "by the user"
    timed = sharpen(tracer, CONFIG, AutoSampling(round_samples=2, max_samples=20, max_seconds=1e-9))
    assert timed.config["auto"]["stopped"] == "seconds" and timed.config["samples"] == 2


@lengthy
def test_what_cannot_sharpen_is_traced_once(tracer):
    swapped = sharpen(tracer, TraceConfig(kind="hidden", corrupt="question", corruption=WordSwap({"color": "shape"})))
    assert swapped.config["samples"] == 1 and swapped.config["deterministic"]
    estimate = sharpen(tracer, TraceConfig(kind="hidden", method="estimate", samples=3))
    assert estimate.is_estimate and estimate.config["samples"] == 3


def test_bad_plans_are_refused(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    with pytest.raises(BlipTraceError, match='whole number or "auto"'):
        trace(demo_bundle, image, question, samples="many")
    with pytest.raises(BlipTraceError, match="round_samples"):
        AutoSampling(round_samples=1)
    with pytest.raises(BlipTraceError, match="max_samples"):
        AutoSampling(round_samples=4, max_samples=3)
    assert np.isfinite(AutoSampling().max_samples)


def test_an_empty_significant_set_must_hold_longer_before_the_map_stops():
    """Nothing significant yet holds still too: the map stops as stable only after ``empty_rounds`` rounds of it,
    and after ``stable_rounds`` once a cell is significant."""
    from types import SimpleNamespace

    from blip_trace_widgets.causal_trace.sharpen import _stopped

    def result(flagged: bool):
        significant = np.array([[flagged, False]])
        stats = SimpleNamespace(significant=lambda: significant, samples=8)
        return SimpleNamespace(statistics=lambda: stats)

    plan = AutoSampling(round_samples=4, max_samples=64, stable_rounds=2, empty_rounds=4)
    assert _stopped(result(True), plan, held=2, seconds=0.0, should_stop=None) == "stable"
    assert _stopped(result(False), plan, held=2, seconds=0.0, should_stop=None) is None
    assert _stopped(result(False), plan, held=4, seconds=0.0, should_stop=None) == "stable"
    with pytest.raises(BlipTraceError, match="empty_rounds"):
        AutoSampling(empty_rounds=0)
