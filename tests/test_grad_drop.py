"""GradDrop: a layer dropped from the backward pass, and the cells it flags as possibly cancelling."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from fast_subset import lengthy, lengthy_except
from tiny_blip import tiny_model, tiny_processor
from tolerance import assert_close

from blip_trace_widgets import BlipTraceError, GaussianNoise, TraceConfig, Tracer, load_model


@pytest.fixture(scope="module")
def tracer(image, question):
    return Tracer(load_model((tiny_model(seed=1).double(), tiny_processor()), device="cpu"), image, question)


@pytest.mark.parametrize("block", lengthy_except(["question_encoder", "answer_decoder", "vision_encoder"], "answer_decoder"))
def test_a_dropped_layer_keeps_its_values_and_passes_gradient_only_along_its_skips(tracer, block):
    """Forward: the same values, bitwise. Backward: the layer's input gets the gradient of the layer with every
    sublayer's output held constant, written here from the layer's own modules."""
    stack = tracer.blocks[block].stack
    config = TraceConfig(block=block, samples=2)
    run = tracer.runs(tracer.blocks[block], config, tracer.target(config))[1]
    h = run.inputs[1][:, None].detach().clone().requires_grad_(True)  # the input of layer 1, [S, 1, T, D]
    cross = tracer.runs(tracer.blocks[block], config, tracer.target(config))[2][1]
    mask = stack.self_mask(h.shape[2], h.dtype, h.device)
    kept = {}

    def keep(kind, x):
        kept[kind] = x.detach()
        return x

    plain = stack.layer(1, h, cross, mask, keep)
    dropped = stack.layer(1, h, cross, mask, drop=True)
    assert torch.equal(plain, dropped)
    v = torch.randn(plain.shape, generator=torch.Generator().manual_seed(0), dtype=plain.dtype)
    (got,) = torch.autograd.grad((dropped * v).sum(), h)
    if block == "vision_encoder":  # pre-norm: h + sa + m
        skips = h + kept["self_attn"] + kept["mlp"]
    else:  # post-norm: LN3(m + LN2(ca + LN1(sa + h))), with the layer's own LayerNorms by transformers' names
        model = tracer.model
        own = (model.text_encoder if block == "question_encoder" else model.text_decoder.bert).encoder.layer[1]
        skips = own.output.LayerNorm(kept["mlp"] + own.crossattention.output.LayerNorm(
            kept["cross_attn"] + own.attention.output.LayerNorm(kept["self_attn"] + h)))
    (want,) = torch.autograd.grad((skips * v).sum(), h)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-12)
    (full,) = torch.autograd.grad((stack.layer(1, h, cross, mask) * v).sum(), h)
    assert float((full - got).abs().max()) > 1e-6  # dropping does take paths away


@pytest.mark.parametrize("block,kind", [("question_encoder", "hidden"), ("question_encoder", "mlp"),
                                        ("vision_encoder", "hidden")])
@lengthy
def test_flagged_cells_are_reported_and_a_verified_map_makes_them_exact(tracer, block, kind):
    regions = 2 if block == "vision_encoder" else None
    config = TraceConfig(block=block, kind=kind, samples=2, corruption=GaussianNoise(3.0), regions=regions)
    estimate = tracer.trace(config, method="estimate", grad_drop=True)
    plain = tracer.trace(config, method="estimate")
    np.testing.assert_array_equal(estimate.scores, plain.scores)  # a flag, not a new estimate
    assert estimate.config["grad_drop"] is True and estimate.unreliable_cells.shape == estimate.scores.shape
    verified = tracer.trace(config, method="verified", grad_drop=True)
    exact = tracer.trace(config)
    flagged = estimate.unreliable_cells
    assert not (verified.unreliable_cells & ~verified.exact_cells).any()  # nothing flagged is left estimated
    assert verified.exact_cells[flagged].all()
    assert_close(verified.scores[verified.exact_cells], exact.scores[verified.exact_cells])


def test_the_flag_names_cancelling_paths_where_the_estimate_is_small(tracer):
    """The gap is Σ_l |term with layer l dropped| / (L - 1) - |term|: at least -|term| / (L - 1) ... computed here
    from its parts, cell by cell."""
    from blip_trace_widgets.causal_trace.estimates import _cell_sums, cancellation  # noqa: PLC2701

    block = tracer.blocks["question_encoder"]
    config = TraceConfig(samples=2, corruption=GaussianNoise(3.0), method="estimate", grad_drop=True)
    target = tracer.target(config)
    cells = [((layer, p),) for layer in range(len(block.stack)) for p in range(len(tracer.question_ids))]
    plain = _cell_sums(tracer.estimator.gradients(block, config, target).terms["hidden"], cells)
    gaps = cancellation(tracer.corrupted_runs, block, cells, config, target, plain)
    assert gaps.shape == plain.shape and torch.isfinite(gaps).all()
    # a cell of the last layer has one path to the score, through no sublayer of its block: dropping any layer
    # leaves its term as it is, so its gap is |term| (L / (L - 1) - 1)
    last = [i for i, cell in enumerate(cells) if cell[0][0] == len(block.stack) - 1]
    layers = len(block.stack)
    np.testing.assert_allclose(gaps[:, last].numpy(), (plain[:, last].abs() * (layers / (layers - 1) - 1)).numpy(),
                               rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("fields,message", [
    ({"grad_drop": True}, "method='estimate' or 'verified'"),
    ({"grad_drop": True, "method": "estimate", "window": 3, "kind": "mlp"}, "window=1"),
    ({"grad_drop": True, "method": "estimate", "steps": 4}, "steps=1"),
    ({"grad_drop": 1, "method": "estimate"}, "True or False"),
])
def test_grad_drop_is_refused_where_it_does_not_apply(fields, message):
    with pytest.raises(BlipTraceError, match=message):
        TraceConfig(**fields)
