"""A trace's cost is said before it runs: counted from the engine's layout, warned about when large."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
from fast_subset import lengthy

from blip_trace_widgets import Tracer
from blip_trace_widgets.causal_trace.cost import WARN_SECONDS, trace_cost
from blip_trace_widgets.models.runs import start_layer


@lengthy
def test_the_count_is_the_engines_cells_layers_and_samples(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    tracer = Tracer(demo_bundle, image, question)
    for fields in ({"kind": "hidden", "samples": 4}, {"kind": "mlp", "window": 3, "samples": 7},
                   {"block": "vision_encoder", "samples": 2, "regions": 2}, {"kind": "cross_attn_head", "samples": 3}):
        config = tracer.trace(**fields).config
        cost = trace_cost(tracer, **fields)
        block = tracer.blocks[fields.get("block", "question_encoder")]
        from blip_trace_widgets.causal_trace.procedures import resolve_config

        resolved = resolve_config(demo_bundle, **fields)
        cells = block.layout(tracer.clean_pass, resolved, tracer.target(resolved)).cells
        layers = len(block.stack)
        assert cost.cells == len(cells) and cost.rows == len(cells) * fields["samples"], (fields, config)
        assert cost.layer_rows == fields["samples"] * sum(layers - start_layer(c, resolved.kind, layers) for c in cells)
        assert cost.seconds > 0 and cost.warning() is None


@lengthy
def test_a_large_trace_is_warned_about_with_what_makes_it_cheaper(demo_bundle, demo_sample, monkeypatch):
    image, question, _ = demo_sample
    tracer = Tracer(demo_bundle, image, question)
    big = trace_cost(tracer, block="vision_encoder", kind="mlp", window=3, samples=1000)
    assert big.seconds > WARN_SECONDS and big.heavy  # the demo's vision encoder at the sample cap: minutes
    assert "Fewer samples" in big.warning() and "1000 samples" in big.warning()
    small = trace_cost(tracer, samples=3)
    assert small.seconds < big.seconds / 100


@lengthy
def test_the_command_line_warns_before_a_large_trace(demo_sample, tmp_path, capsys, monkeypatch):
    from blip_trace_widgets.causal_trace import cost
    from blip_trace_widgets.cli import main

    monkeypatch.setattr(cost, "WARN_SECONDS", 0.0)
    image, question, _ = demo_sample
    image.save(tmp_path / "shape.png")
    assert main(["trace", "--image", str(tmp_path / "shape.png"), "--question", question, "--samples", "2",
                 "--out", str(tmp_path / "out")]) == 0
    assert "warning: this trace is large" in capsys.readouterr().err


@lengthy
def test_the_explorers_say_the_cost_and_the_time_left(demo_bundle, demo_sample, monkeypatch):
    from blip_trace_widgets import widgets
    from blip_trace_widgets.causal_trace import cost
    from blip_trace_widgets.widgets import live

    image, question, _ = demo_sample
    tracer = Tracer(demo_bundle, image, question)
    config = tracer.trace(samples=2).config
    from blip_trace_widgets.causal_trace.procedures import resolve_config

    resolved = resolve_config(demo_bundle, samples=2)
    assert widgets.cost_notice(tracer, resolved) == "<i>tracing…</i>"
    monkeypatch.setattr(cost, "WARN_SECONDS", 0.0)
    assert "this trace is large" in widgets.cost_notice(tracer, resolved), config
    clock = iter([0.0, 5.0, 10.0, 20.0, 25.0])
    monkeypatch.setattr("time.perf_counter", lambda: next(clock))
    view = SimpleNamespace(status=SimpleNamespace(value=""), progress=SimpleNamespace(max=1, value=0))
    report = live.reporter(view, threading.Event())
    report(1, 4)  # 5 s for 1 of 4 cells: 15 s left
    assert "1 of 4 cells, about 15 s left" in view.status.value
    report(2, 4)
    assert "about 10 s left" in view.status.value
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(live.Cancelled):
        live.reporter(view, cancelled)(1, 2)

