"""Sweeps: table contents, resuming, sharding, aggregates with intervals, plots and the CLI."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from fast_subset import lengthy
from PIL import Image

from blip_trace_widgets import GaussianNoise, TraceConfig, Tracer
from blip_trace_widgets.causal_trace.averages import (
    average_effect,
    average_trace,
    bootstrap_interval,
    sample_effects,
    token_roles,
)
from blip_trace_widgets.core.names import kinds_of
from blip_trace_widgets.datasets.subsets import load_vqa_subset
from blip_trace_widgets.sweeps.plots import plot_average_heatmaps, plot_effect_by_layer, plot_subset_comparison
from blip_trace_widgets.sweeps.sweep import Shard, is_correct, load_sweep, result_from_row, sweep

CONFIGS = [TraceConfig(kind="hidden", samples=2), TraceConfig(kind="mlp", window=3, samples=2, seed=1)]


def _tiny_samples():
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    return [(images[0], "what color is the shape?", "red"), (images[1], "is there a circle?", "yes"),
            (images[2], "what shape is it?", None)]


@lengthy
def test_table_rows_equal_single_traces(tiny_bundle, tmp_path):
    samples = _tiny_samples()
    table = sweep(tiny_bundle, samples, configs=CONFIGS, out=tmp_path, progress=False)
    assert len(table) == len(samples) * len(CONFIGS)
    assert list(table["sample"]) == [0, 0, 1, 1, 2, 2] and list(table["config"]) == [0, 1] * 3
    for row in table.itertuples(index=False):
        image, question, expected = samples[row.sample]
        tracer = Tracer(tiny_bundle, image, question)
        expected_result = tracer.trace(CONFIGS[row.config])
        np.testing.assert_allclose(np.array([list(r) for r in row.scores]), expected_result.scores, rtol=1e-6, atol=1e-9)
        assert row.low_score == pytest.approx(expected_result.low_score)
        assert row.high_score == pytest.approx(expected_result.high_score)
        assert list(row.tokens) == expected_result.tokens and row.model_answer == tracer.model_answer
        assert row.correct == is_correct(tracer.model_answer, expected)
    assert table.loc[4, "correct"] is None or pd.isna(table.loc[4, "correct"])
    assert json.loads(table.loc[1, "corruption"]) == {"type": "gaussian", "scale": 3.0}
    assert result_from_row(table.iloc[1]).kind == "mlp"
    assert (tmp_path / "sweep.parquet").is_file() and load_sweep(tmp_path).equals(table)


@lengthy
def test_resume_skips_finished_samples(tiny_bundle, tmp_path):
    samples = _tiny_samples()
    first = sweep(tiny_bundle, samples, configs=CONFIGS, out=tmp_path, progress=False)
    parts = sorted((tmp_path / "parts").glob("*.parquet"))
    stamps = {p: p.stat().st_mtime_ns for p in parts}
    parts[1].unlink()
    (tmp_path / "sweep.parquet").unlink()
    time.sleep(0.01)
    again = sweep(tiny_bundle, samples, configs=CONFIGS, out=tmp_path, progress=False)
    pd.testing.assert_frame_equal(first, again)
    assert parts[0].stat().st_mtime_ns == stamps[parts[0]] and parts[2].stat().st_mtime_ns == stamps[parts[2]]
    assert parts[1].is_file()


@lengthy
def test_a_different_sweep_in_the_same_folder_is_refused(tiny_bundle, tmp_path):
    samples = _tiny_samples()[:1]
    sweep(tiny_bundle, samples, configs=CONFIGS[:1], out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different sweep"):
        sweep(tiny_bundle, samples, configs=CONFIGS, out=tmp_path, progress=False)
    table = sweep(tiny_bundle, samples, configs=CONFIGS, out=tmp_path, progress=False, overwrite=True)
    assert len(table) == 2


@lengthy
def test_shards_are_disjoint_and_merge(tiny_bundle, tmp_path):
    samples = _tiny_samples()
    whole = sweep(tiny_bundle, samples, configs=CONFIGS[:1], out=tmp_path / "whole", progress=False)
    sweep(tiny_bundle, samples, configs=CONFIGS[:1], out=tmp_path / "split", progress=False, shard=Shard(1, 2))
    assert sorted(p.name for p in (tmp_path / "split" / "parts").iterdir()) == ["sample-0000001.parquet"]
    merged = sweep(tiny_bundle, samples, configs=CONFIGS[:1], out=tmp_path / "split", progress=False, shard=Shard(0, 2))
    pd.testing.assert_frame_equal(whole, merged)
    with pytest.raises(ValueError, match="shard index"):
        Shard(2, 2)


@lengthy
def test_sweep_rejects_bad_arguments(tiny_bundle, tmp_path):
    samples = _tiny_samples()
    with pytest.raises(ValueError, match="answer='model'"):
        sweep(tiny_bundle, samples, configs=[TraceConfig(answer="red")], out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="configs is empty"):
        sweep(tiny_bundle, samples, configs=[], out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="load_model"):
        sweep(object(), samples, configs=CONFIGS, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="no expected answer"):
        sweep(tiny_bundle, samples, configs=CONFIGS, out=tmp_path / "x", progress=False, scored="expected")


# ----- aggregates ------------------------------------------------------------------------------

def _synthetic_table():
    """Two samples of different lengths with known scores."""
    rows = []
    for sample, (tokens, base, correct) in enumerate([
        (["[CLS]", "what", "color", "is", "the", "bus", "?", "[SEP]"], 0.2, True),
        (["[CLS]", "what", "is", "the", "dog", "[SEP]"], 0.4, False),
    ]):
        scores = np.full((len(tokens), 3), base)
        scores[-1] = [base, base + 0.1, base + 0.3]
        rows.append({"sample": sample, "config": 0, "block": "question_encoder", "kind": "hidden", "window": 1,
                     "corruption": "{}", "tokens": tokens, "scores": scores.tolist(), "low_score": base, "high_score": base + 0.4,
                     "correct": correct, "num_layers": 3})
    return pd.DataFrame(rows)


def test_token_roles_and_custom_object_rule():
    tokens = ["[CLS]", "how", "many", "dogs", "are", "there", "[SEP]"]
    assert token_roles(tokens) == ["first", "question words", "question words", "object", "question words",
                                   "question words", "last"]
    assert token_roles(tokens, object_rule=lambda t: [t.index("many")])[2] == "object"
    with pytest.raises(ValueError, match="position 9"):
        token_roles(tokens, object_rule=lambda t: [9])


@lengthy
def test_average_effect_forms_and_correct_only():
    table = _synthetic_table()
    rome = average_effect(table, form="rome").set_index(["role", "layer"])
    assert rome.loc[("last", 2), "mean"] == pytest.approx(0.3) and rome.loc[("last", 1), "n"] == 2
    assert rome.loc[("object", 0), "mean"] == pytest.approx(0.0)
    norm = average_effect(table, form="normalized").set_index(["role", "layer"])
    assert norm.loc[("last", 2), "mean"] == pytest.approx(0.75)
    only = average_effect(table, form="normalized", correct_only=True).set_index(["role", "layer"])
    assert only.loc[("last", 1), "n"] == 1 and only.loc[("last", 1), "mean"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="form"):
        average_effect(table, form="paper")


def test_bootstrap_interval_brackets_the_mean():
    values = np.random.default_rng(0).normal(1.0, 0.5, 200)
    low, high = bootstrap_interval(values)
    assert low < values.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * values.std(ddof=1) / np.sqrt(200), rel=0.2)
    assert bootstrap_interval(np.array([2.0])) == (2.0, 2.0)


def test_average_trace_by_role_and_by_position():
    table = _synthetic_table()
    by_role = average_trace(table)
    assert by_role.tokens == ["first", "question words", "object", "last"]
    np.testing.assert_allclose(by_role.scores[-1], [0.0, 0.25, 0.75])
    with pytest.raises(ValueError, match="words=7"):
        average_trace(table, by="position")
    same = average_trace(table[table["sample"] == 0], by="position")
    assert same.tokens[0] == "[CLS]" and same.scores.shape == (8, 3)


@pytest.mark.slow  # an explorer or command-line round trip: the full suite runs it
def test_sweep_plots(tiny_bundle, tmp_path):
    table = sweep(tiny_bundle, _tiny_samples(), configs=CONFIGS, out=tmp_path, progress=False)
    heatmaps = plot_average_heatmaps(table)
    assert len(heatmaps.axes) == 2 * 2  # a heatmap and its colour bar per configuration
    assert heatmaps._repr_png_()[:4] == b"\x89PNG"  # a notebook shows the figure itself
    lines = plot_effect_by_layer(table)
    assert len(lines.axes) == len(set(sample_effects(table)["role"]))
    assert len(lines.axes[0].get_lines()) >= 2
    compare = plot_subset_comparison({"a": table, "b": table}, kind="mlp")
    assert compare.axes[-1].get_legend() is not None
    with pytest.raises(ValueError, match="no 'cross_attn'"):
        plot_subset_comparison({"a": table}, kind="cross_attn")


# ----- command line and processes ----------------------------------------------------------------

def _cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "blip_trace_widgets", "sweep", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


SWEEP_ARGS = ["--dataset", "easy-vqa-color", "--kinds", "hidden,mlp", "--samples", "4"]


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_uninterrupted_table(tmp_path):
    limit = ["--limit", "12"]
    # one thread each: the runs overlap, and the CLI would otherwise give each the cores the other leaves free,
    # so they would sum in different orders
    one = {"env": {**os.environ, "OMP_NUM_THREADS": "1"}}
    whole = _cli(*SWEEP_ARGS, *limit, "--out", str(tmp_path / "whole"), **one)
    killed = _cli(*SWEEP_ARGS, *limit, "--out", str(tmp_path / "killed"), **one)
    parts = tmp_path / "killed" / "parts"
    deadline = time.monotonic() + 300
    while len(list(parts.glob("*.parquet"))) < 3 and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    done_before = len(list(parts.glob("*.parquet")))
    assert 3 <= done_before < 12 and not (tmp_path / "killed" / "sweep.parquet").exists()
    resumed = _cli(*SWEEP_ARGS, *limit, "--out", str(tmp_path / "killed"), **one)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    whole.communicate(timeout=600)
    assert whole.returncode == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "whole" / "sweep.parquet"),
                                  pd.read_parquet(tmp_path / "killed" / "sweep.parquet"), check_exact=False, rtol=1e-6)
    for name in ("average_effect.csv", "average_heatmaps.png", "effect_by_layer.png"):
        assert (tmp_path / "killed" / name).is_file()


@pytest.mark.slow
def test_accelerate_two_processes_match_one(tmp_path):
    limit = ["--limit", "6"]
    # each launched process computes on one thread (the cores are split between them); the single run does
    # too, so both sum in nearly the same order: float32 agreement, 1e-5 relative (2 threads against 1 differ
    # by about 2e-5, as reductions are split differently)
    single = _cli(*SWEEP_ARGS, *limit, "--out", str(tmp_path / "one"), env={**os.environ, "OMP_NUM_THREADS": "1"})
    single.communicate(timeout=600)
    assert single.returncode == 0
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = {**os.environ, "MASTER_PORT": "29533"}
    two = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
                          "-m", "blip_trace_widgets", "sweep", *SWEEP_ARGS, *limit, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "process 1/2" in two.stderr and "process 2/2" in two.stderr
    one, two = (pd.read_parquet(tmp_path / name / "sweep.parquet") for name in ("one", "two"))
    arrays = ["scores", "stderr", "tokens", "roles"]
    pd.testing.assert_frame_equal(one.drop(columns=arrays), two.drop(columns=arrays), check_exact=False,
                                  rtol=1e-5, atol=1e-7)
    for column in arrays:
        for a, b in zip(one[column], two[column]):
            if column in ("scores", "stderr"):
                np.testing.assert_allclose(np.stack(list(a)), np.stack(list(b)), rtol=1e-5, atol=1e-7)
            else:
                assert list(a) == list(b)


@pytest.mark.slow
def test_cli_sweep_bad_kind_is_one_line(tmp_path):
    run = _cli("--dataset", "easy-vqa-color", "--kinds", "hidden,attention", "--out", str(tmp_path))
    out, err = run.communicate(timeout=120)
    assert run.returncode == 2 and err.strip().count("\n") == 0 and "unknown kind 'attention'" in err


@pytest.mark.slow
def test_cli_sweep_missing_csv_offline(tmp_path):
    env = {**os.environ, "BLIP_TRACE_CACHE": str(tmp_path / "empty-cache"),
           "BLIP_TRACE_PAPER_DATA_URL": "http://127.0.0.1:9/"}
    run = _cli("--dataset", "coco-qa-location", "--limit", "2", "--out", str(tmp_path / "o"), env=env)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 2 and err.strip().count("\n") == 0
    assert "location_coco_qa.csv" in err and "--csv" in err and "empty-cache" in err


@lengthy
def test_image_side_sweep_averages_per_region(tiny_bundle, tmp_path, image):
    config = TraceConfig(block="vision_encoder", regions=2, samples=2)
    table = sweep(tiny_bundle, _tiny_samples()[:2], configs=[config], out=tmp_path, progress=False)
    assert list(table["roles"].iloc[0]) == ["[CLS]", "r0c0", "r0c1", "r1c0", "r1c1"]
    average = average_trace(table)
    assert average.tokens == ["[CLS]", "r0c0", "r0c1", "r1c0", "r1c1"]
    expected = np.mean([(np.array([list(r) for r in row.scores]) - row.low_score) / (row.high_score - row.low_score)
                        for row in table.itertuples()], axis=0)
    np.testing.assert_allclose(average.scores, expected)
    assert average.plot_on_image(image, layer=0)._repr_png_()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="plot_on_image"):
        plot_effect_by_layer(table)


@pytest.mark.slow
def test_cli_image_side_sweep(tmp_path):
    run = _cli("--dataset", "easy-vqa-shape", "--limit", "3", "--block", "vision_encoder", "--regions", "2",
               "--samples", "2", "--out", str(tmp_path))
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    table = pd.read_parquet(tmp_path / "sweep.parquet")
    assert set(table["kind"]) == {"hidden", "self_attn", "mlp"} and set(table["block"]) == {"vision_encoder"}
    assert (tmp_path / "average_heatmaps.png").is_file() and not (tmp_path / "effect_by_layer.png").exists()
    summary = pd.read_csv(tmp_path / "average_effect.csv")
    assert set(summary["role"]) == {"[CLS]", "r0c0", "r0c1", "r1c0", "r1c1"}
    estimate = _cli("--dataset", "easy-vqa-shape", "--limit", "3", "--method", "estimate", "--samples", "2",
                    "--out", str(tmp_path / "estimate"))
    _, err = estimate.communicate(timeout=300)
    assert estimate.returncode == 0, err
    rows = pd.read_parquet(tmp_path / "estimate" / "sweep.parquet")
    positional = [k for k in kinds_of("question_encoder") if not k.endswith("_head")]  # head kinds only when asked
    assert set(rows["method"]) == {"estimate"} and len(rows) == 3 * len(positional)
    assert result_from_row(rows.iloc[0]).is_estimate
    titles = [ax.get_title(loc="left") for ax in plot_average_heatmaps(rows).axes if ax.get_title(loc="left")]
    assert titles and all(t.startswith("ESTIMATE (attribution patching, 1 step)") for t in titles)
    bad = _cli("--dataset", "easy-vqa-shape", "--regions", "2", "--out", str(tmp_path / "x"))
    _, err = bad.communicate(timeout=120)
    assert bad.returncode == 2 and "--block vision_encoder" in err


# ----- a folder that holds other questions, damaged parts, orphans (nothing silently wrong) ------------------

def _quick(bundle, questions, out, **kw):

    config = TraceConfig(kind="hidden", samples=2, corruption=GaussianNoise(10.0))
    return sweep(bundle, questions, configs=[config], out=out, progress=False, **kw)


@lengthy
def test_another_question_set_in_a_finished_folder_is_refused(demo_bundle, tmp_path):
    colour = load_vqa_subset("easy-vqa-color", limit=3)
    shape = load_vqa_subset("easy-vqa-shape", limit=3)
    _quick(demo_bundle, colour, tmp_path)
    with pytest.raises(ValueError, match="another question at position 0.*--overwrite"):
        _quick(demo_bundle, shape, tmp_path)
    table = _quick(demo_bundle, shape, tmp_path, overwrite=True)
    assert list(table["question"]) == [q.question for q in shape]


@lengthy
def test_a_smaller_limit_into_a_larger_folder_writes_only_its_questions(demo_bundle, tmp_path):
    questions = load_vqa_subset("easy-vqa-color", limit=6)
    _quick(demo_bundle, questions, tmp_path)
    table = _quick(demo_bundle, questions[:3], tmp_path)
    assert len(table) == 3 and sorted(table["sample"]) == [0, 1, 2]


@pytest.mark.slow
def test_the_command_line_records_the_dataset_and_refuses_another_limit(tmp_path):
    first = _cli("--dataset", "easy-vqa-color", "--limit", "2", "--kinds", "hidden", "--samples", "2", "--out", str(tmp_path))
    first.communicate(timeout=600)
    assert first.returncode == 0
    assert json.loads((tmp_path / "sweep.json").read_text())["dataset"] == {"name": "easy-vqa-color", "limit": 2, "words": None}
    again = _cli("--dataset", "easy-vqa-color", "--limit", "3", "--kinds", "hidden", "--samples", "2", "--out", str(tmp_path))
    _, err = again.communicate(timeout=600)
    assert again.returncode == 2 and "differs in dataset" in err and "--overwrite" in err


@lengthy
def test_a_part_copied_over_another_is_caught(demo_bundle, tmp_path):
    questions = load_vqa_subset("easy-vqa-color", limit=3)
    _quick(demo_bundle, questions, tmp_path)
    parts = tmp_path / "parts"
    shutil.copy(parts / "sample-0000000.parquet", parts / "sample-0000001.parquet")
    with pytest.raises(ValueError, match="another question at position 1"):
        _quick(demo_bundle, questions, tmp_path)


@lengthy
def test_a_stray_part_is_not_merged(demo_bundle, tmp_path):
    questions = load_vqa_subset("easy-vqa-color", limit=2)
    _quick(demo_bundle, questions, tmp_path)
    shutil.copy(tmp_path / "parts" / "sample-0000000.parquet", tmp_path / "parts" / "sample-0000099.parquet")
    assert len(_quick(demo_bundle, questions, tmp_path)) == 2


@lengthy
def test_a_damaged_part_is_moved_aside_and_redone(demo_bundle, tmp_path):
    questions = load_vqa_subset("easy-vqa-color", limit=2)
    first = _quick(demo_bundle, questions, tmp_path)
    part = tmp_path / "parts" / "sample-0000001.parquet"
    part.write_bytes(part.read_bytes()[:100])
    (tmp_path / ".partial-abc").write_text("left by a kill")
    (tmp_path / "parts" / ".partial-def").write_text("left by a kill")
    with pytest.warns(UserWarning, match="damaged"):
        again = _quick(demo_bundle, questions, tmp_path)
    pd.testing.assert_frame_equal(first, again)
    assert (tmp_path / "damaged" / "sample-0000001.parquet").is_file()
    assert not list(tmp_path.glob(".partial-*")) and not list((tmp_path / "parts").glob(".partial-*"))


@lengthy
def test_a_damaged_manifest_is_named(demo_bundle, tmp_path):
    questions = load_vqa_subset("easy-vqa-color", limit=1)
    _quick(demo_bundle, questions, tmp_path)
    (tmp_path / "sweep.json").write_text("{not json")
    with pytest.raises(ValueError, match="sweep.json is damaged"):
        _quick(demo_bundle, questions, tmp_path)


@lengthy
def test_the_old_keywords_samples_and_answer_still_work_with_a_warning(tiny_bundle, image, question, tmp_path):
    items = [(image, question, "red")]
    config = TraceConfig(samples=1)
    with pytest.warns(DeprecationWarning, match="samples= is now items="):
        old = sweep(tiny_bundle, samples=items, configs=config, out=tmp_path / "a", progress=False)
    with pytest.warns(DeprecationWarning, match="answer= is now scored="):
        expected = sweep(tiny_bundle, items, configs=config, out=tmp_path / "b", progress=False, answer="expected")
    new = sweep(tiny_bundle, items, configs=config, out=tmp_path / "c", progress=False, scored="expected")
    assert list(old.scores[0][0]) != [] and list(expected.scores[0][0]) == list(new.scores[0][0])
    from blip_trace_widgets import BlipTraceError

    with pytest.raises(BlipTraceError, match="pass items= alone"):
        sweep(tiny_bundle, items, samples=items, configs=config, out=tmp_path / "d", progress=False)


@lengthy
def test_an_old_sweep_with_low_and_high_columns_still_loads_and_averages(tiny_bundle, image, question, tmp_path):
    from blip_trace_widgets import average_effect
    from blip_trace_widgets.sweeps.sweep import load_sweep, read_parts

    out = tmp_path / "old"
    new = sweep(tiny_bundle, [(image, question, "red")], configs=TraceConfig(samples=1), out=out, progress=False)
    assert {"low_score", "high_score"} <= set(new.columns) and not {"low", "high"} & set(new.columns)
    for path in [*(out / "parts").glob("*.parquet"), out / "sweep.parquet"]:  # as an earlier release wrote them
        pd.read_parquet(path).rename(columns={"low_score": "low", "high_score": "high"}).to_parquet(path, index=False)
    for table in (load_sweep(out), read_parts(out)):
        assert list(table.low_score) == list(new.low_score) and list(table.high_score) == list(new.high_score)
    old = pd.read_parquet(out / "sweep.parquet")
    assert "low" in old.columns
    pd.testing.assert_frame_equal(average_effect(old), average_effect(new))
