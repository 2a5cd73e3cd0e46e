"""Every cell with its uncertainty: paired per-draw effects against the model's own forward pass, their standard
errors, p- and q-values against plain numpy written here, a placebo map that flags almost nothing, deterministic
corruptions run once, and figures that fade and count what is noise."""
from __future__ import annotations

import json
from contextlib import ExitStack

import numpy as np
import pytest
import torch
from fast_subset import lengthy
from test_engine_equivalence import ReferenceLoop, _replace, _tensor, path
from tiny_blip import tiny_model, tiny_processor
from tolerance import assert_close

from blip_trace_widgets import GaussianNoise, TraceConfig, Tracer, TraceResult, WordSwap, load_model
from blip_trace_widgets.causal_trace.plots import plot_trace
from blip_trace_widgets.core.significance import CellStatistics, bh_qvalues, stability, t_quantile, t_two_sided

#: Two-sided 5% critical values of Student's t (any statistics table).
T_TABLE = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 29: 2.045}


class PerDraw(ReferenceLoop):
    """The per-cell loop, each noise sample's score kept (not averaged)."""

    def score(self, logits):  # type: ignore[override]
        logprobs = torch.log_softmax(logits.float(), -1)
        total = sum(logprobs[:, k, t] for k, t in enumerate(self.answer_ids))
        return (total if self.config.metric == "logprob" else total.exp()).double().numpy()


class Placebo(PerDraw):
    """Each sample's cell takes its state from the same sample of another corrupted draw, not from the clean run."""

    other: dict

    def cell(self, restore):  # type: ignore[override]
        with ExitStack() as stack, torch.no_grad():
            for layer, pos in restore:
                name = path(self.config.block, self.config.kind, layer)

                def hook(m, i, o, other=self.other[name], pos=pos):
                    t = _tensor(o).clone()
                    t[:, pos] = other[:, pos]
                    return _replace(o, t)

                stack.callback(self.model.get_submodule(name).register_forward_hook(hook).remove)
            return self.score(self._forward(self.corrupted))


@pytest.fixture(scope="module")
def bundle():
    return load_model((tiny_model(seed=1), tiny_processor()), device="cpu")


def _bh(p):
    """Benjamini–Hochberg as the textbook writes it: q_(i) = min over j >= i of p_(j) m / j."""
    flat = p[np.isfinite(p)]
    m, order = flat.size, np.argsort(flat)
    q = np.empty(m)
    for rank, i in enumerate(order, start=1):
        q[i] = min(1.0, min(flat[order[j - 1]] * m / j for j in range(rank, m + 1)))
    out = np.full(p.shape, np.nan)
    out[np.isfinite(p)] = q
    return out


@pytest.mark.parametrize("kind", ["hidden", "mlp"])
@lengthy
def test_per_draw_effects_are_the_models_own_paired_differences(bundle, image, question, kind):
    config = TraceConfig(kind=kind, window=1, samples=5, seed=3, corruption=GaussianNoise(2.0), metric="prob")
    result = Tracer(bundle, image, question, max_batch_rows=7).trace(config)
    loop = PerDraw(bundle, image, question, config, result.config["answer_ids"])
    low = loop.cell([])
    rows, layers = result.scores.shape
    expected = np.moveaxis(np.array([[loop.cell([(layer, row)]) - low for layer in range(layers)]
                                     for row in range(rows)]), -1, 0)  # [draws, rows, layers]
    assert result.draws.shape == (5, rows, layers)
    assert_close(result.draws, expected)
    # the statistics, by plain numpy
    stats = result.statistics()
    assert_close(stats.mean, expected.mean(0))
    assert_close(result.effect_stderr, expected.std(0, ddof=1) / np.sqrt(5))
    assert_close(result.qvalues, _bh(result.pvalues), dtype=np.float64)
    frame = result.to_dataframe()
    assert {"effect", "effect_stderr", "effect_low", "effect_high", "p_value", "q_value", "significant"} <= set(frame)
    assert_close(frame.effect_stderr.to_numpy(), result.effect_stderr.ravel())


def test_t_values_and_quantiles_match_the_table():
    for df, t in T_TABLE.items():
        assert t_two_sided(t, df) == pytest.approx(0.05, abs=2e-4)
        assert t_quantile(0.95, df) == pytest.approx(t, abs=2e-3)
    assert t_two_sided(0.0, 5) == pytest.approx(1.0)


def test_q_values_are_benjamini_hochberg():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(6, 5)) ** 3
    p[1, 2] = np.nan  # untested: not counted
    assert_close(bh_qvalues(p), _bh(p), dtype=np.float64)


@lengthy
def test_a_placebo_map_flags_almost_nothing(bundle, image, question):
    """Each cell "restores" the state of another corrupted draw of the same image instead of the clean one, so
    every effect is null by construction: at most 5% of cells may be flagged over several maps."""
    flagged = tested = 0
    for seed in range(4):
        config = TraceConfig(kind="hidden", samples=8, seed=seed, corruption=GaussianNoise(2.0), metric="prob")
        loop = Placebo(bundle, image, question, config, [bundle.tokenizer.convert_tokens_to_ids("red")])
        other = config.corruption(loop.clean_embeds, config.samples, torch.Generator().manual_seed(1000 + seed))
        loop.other = loop._record(other)  # each sample restores the same sample of an independent draw
        low = loop.cell([])
        layers = len(bundle.model.text_encoder.encoder.layer)
        positions = loop.question_ids.shape[1]
        draws = np.array([[loop.cell([(layer, pos)]) - low for layer in range(layers)] for pos in range(positions)])
        stats = CellStatistics.of_draws(np.moveaxis(draws, -1, 0))
        flagged += int(stats.significant().sum())
        tested += int(stats.tested().sum())
    assert tested >= 40 and flagged / tested <= 0.05


@lengthy
def test_a_deterministic_corruption_runs_once_and_says_so(bundle, image, question):
    tracer = Tracer(bundle, image, question)
    result = tracer.trace(TraceConfig(kind="hidden", samples=10, corrupt="question",
                                      corruption=WordSwap({"color": "shape"})))
    assert result.config["samples"] == 1 and result.config["samples_asked"] == 10 and result.config["deterministic"]
    assert result.draws.shape[0] == 1
    assert "deterministic corruption, one run" in result.significance_text()
    assert np.isnan(result.effect_stderr).sum() == 0 and (result.effect_stderr == 0).all()


@lengthy
def test_draws_round_trip_and_older_files_load(bundle, image, question, tmp_path):
    result = Tracer(bundle, image, question).trace(TraceConfig(kind="hidden", samples=4, seed=2))
    back = TraceResult.load(result.save(tmp_path / "r.json"))
    assert back == result and np.array_equal(back.draws, result.draws)
    np.testing.assert_array_equal(back.significant(), result.significant())
    data = json.loads(result.to_json())
    data.pop("draws")
    data["format"] = 2
    older = TraceResult.from_dict(data)
    assert older.draws is None
    assert older.statistics().samples == 4 and np.isfinite(older.effect_stderr).all()  # unpaired, from stderr


@lengthy
def test_figures_fade_what_is_noise_and_count_what_is_not(bundle, image, question):
    from matplotlib.collections import PatchCollection

    result = Tracer(bundle, image, question).trace(TraceConfig(kind="hidden", samples=6, seed=4,
                                                               corruption=GaussianNoise(2.0)))
    ax = plot_trace(result, tiny=None)
    hatched = [c for c in ax.collections if isinstance(c, PatchCollection)]
    noise = int((result.statistics().tested() & ~result.significant()).sum())
    assert sum(len(c.get_paths()) for c in hatched) == noise
    title = ax.get_title(loc="left").replace("\n", " ")
    count = int(result.significant().sum())
    assert (f"{count} of {result.scores.size} cells significant (q < 0.05, 6 samples)" in title
            or "no cell significant" in title)
    assert "resamples" in title


def test_stability_of_a_clear_top_and_of_noise():
    rng = np.random.default_rng(0)
    clear = rng.normal(0, 0.01, (10, 3, 4))
    clear[:, 1, 2] += 1.0
    assert stability(clear)["top"] == 1.0
    noise = rng.normal(0, 1, (10, 3, 4))
    assert stability(noise)["top"] < 0.9
    assert stability(-clear, sign=-1)["top"] == 1.0  # a negative total effect: the top is the most negative


@lengthy
def test_n_a_cells_are_nan_and_have_no_row(demo_sample):
    """A Q-Former's layers without cross-attention restore nothing: NaN in every derived map, no DataFrame row,
    never tested (they read 0.0 in normalized() and to_dataframe() before)."""
    image, question, _ = demo_sample
    result = Tracer(load_model("demo-blip2"), image, question).trace(block="qformer", kind="cross_attn", samples=3)
    absent = result.absent_cells
    assert absent.any() and not absent.all()
    assert np.isnan(result.normalized()[absent]).all() and np.isnan(result.indirect_effect()[absent]).all()
    assert np.isfinite(result.normalized()[~absent]).all()
    assert len(result.to_dataframe()) == int((~absent).sum())
    assert not result.statistics().tested()[absent].any()
    means = np.nanmean(result.normalized(), axis=0)  # per-layer means: n/a layers are NaN, not 0.0
    assert np.isnan(means[result.config["absent_layers"]]).all()


def test_a_vision_map_names_every_row_of_the_image():
    from blip_trace_widgets.causal_trace.plots import _row_ticks

    tokens = ["[CLS]"] + [f"r{r}c{c}" for r in range(8) for c in range(8)]
    result = TraceResult(np.zeros((65, 2)), 0.0, 1.0, "red", tokens, "vision_encoder", "hidden", 1,
                         config={"grid": {"regions_per_side": 8, "boxes": [None] * 65}})
    ticks, labels = _row_ticks(result)
    assert labels[0] == "[CLS]" and len(labels) == 9 and labels[4] == "row 3: c0–7" and ticks[4] == 1 + 3 * 8
