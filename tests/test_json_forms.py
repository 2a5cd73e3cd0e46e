"""Strict JSON forms are derived from the dataclass fields: a new field without a JSON form fails here."""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from blip_trace_widgets import TraceConfig, TraceResult
from blip_trace_widgets.causal_trace.results import JSON_FORMS
from blip_trace_widgets.core.names import DEFAULT_VERIFY


def test_every_result_field_has_a_json_form():
    saved = {f.name for f in dataclasses.fields(TraceResult) if f.init}
    assert saved == set(JSON_FORMS), f"give these TraceResult fields a JSON form: {saved ^ set(JSON_FORMS)}"


def test_every_config_field_is_written_by_its_rule():
    """Fields at their default are written unless their rule says "changed"; a changed one is always written."""
    plain = TraceConfig().to_json()
    for spec in dataclasses.fields(TraceConfig):
        assert "written" in spec.metadata, f"TraceConfig.{spec.name} has no JSON rule"
        assert (spec.name in plain) == (spec.metadata["written"] is None), spec.name
    changed = TraceConfig(kind="self_attn_head", position=(1, 2), direction="noise").to_json()
    assert {"position": [1, 2], "direction": "noise"}.items() <= changed.items()
    assert TraceConfig(method="estimate", grad_drop=True).to_json()["grad_drop"] is True
    assert TraceConfig(method="estimate", order=2).to_json()["order"] == 2
    assert TraceConfig(method="verified").to_json()["verify"] == DEFAULT_VERIFY and "verify" not in plain
    json.dumps(changed, allow_nan=False)


def test_a_result_round_trips_through_its_derived_json_form():
    result = TraceResult(scores=np.array([[0.1, np.nan], [0.3, 0.4]]), low_score=0.05, high_score=0.9, answer="red",
                         tokens=["a", "b"], block="question_encoder", kind="mlp", window=3,
                         config={"samples": 2}, stderr=np.full((2, 2), 0.01), draws=np.zeros((2, 2, 2)))
    text = result.to_json()
    json.loads(text)  # strict: NaN written as a marker, not as NaN
    back = TraceResult.from_json(text) if hasattr(TraceResult, "from_json") else TraceResult.from_dict(json.loads(text))
    assert back == result and back.draws is not None and back.draws.shape == (2, 2, 2)


def test_a_bare_config_traces_as_the_resolver_does(demo_bundle, demo_sample):
    """TraceConfig() names no corruption: a tracer fills in the model's default, as ``trace(kind=...)`` does (the
    demo model's folder says 10σ on the image embeddings), so both ways give the same map."""
    from blip_trace_widgets import Tracer

    tracer = Tracer(demo_bundle, demo_sample.image, demo_sample.question)
    bare = tracer.trace(TraceConfig(kind="mlp", window=1, samples=2))
    resolved = tracer.trace(kind="mlp", window=1, samples=2)
    assert bare.config["corruption"] == resolved.config["corruption"] == {"type": "gaussian", "scale": 10.0}
    assert np.array_equal(bare.scores, resolved.scores)
    assert TraceConfig().to_json()["corruption"] is None
