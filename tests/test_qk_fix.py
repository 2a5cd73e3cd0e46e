"""The QK fix: the next layer's attention recomputed exactly in an estimate (see blip_trace_widgets.causal_trace.qk_fix)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fast_subset import lengthy, lengthy_except
from tiny_blip import tiny_model, tiny_processor
from tolerance import within_rounding

from blip_trace_widgets import BlipTraceError, GaussianNoise, TraceConfig, Tracer, load_model
from blip_trace_widgets.causal_trace.qk_fix import qk_correction


def _attention_score(h, wq, wk, mask):
    """A score that reaches ``h`` [S, T, D] only through one attention softmax's queries and keys."""
    s, t, _ = h.shape
    q = (h @ wq).view(s, t, 2, -1).transpose(1, 2)
    k = (h @ wk).view(s, t, 2, -1).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask
    return q, k, scores, scores.softmax(-1)


@pytest.mark.parametrize("causal", [False, True])
def test_the_fix_is_exact_for_a_pure_query_and_key_change(causal):
    """score = Σ G ⊙ softmax(QKᵀ/√d): restoring one position's input changes only its query and key. Plain
    attribution patching is off there; plain + the correction equals the exact change, position by position."""
    g = torch.Generator().manual_seed(0)
    s, t, d = 3, 5, 8
    h = torch.randn(s, t, d, generator=g, dtype=torch.float64)
    delta = 2.0 * torch.randn(s, t, d, generator=g, dtype=torch.float64)  # large: the softmax is far from linear
    wq, wk = (torch.randn(d, d, generator=g, dtype=torch.float64) for _ in range(2))
    grad = torch.randn(s, 2, t, t, generator=g, dtype=torch.float64)
    mask = torch.full((t, t), -1e9, dtype=torch.float64).triu(1) if causal else torch.zeros(t, t, dtype=torch.float64)

    leaf = h.clone().requires_grad_(True)
    q, k, scores, weights = _attention_score(leaf, wq, wk, mask)
    scores.retain_grad()
    weights.retain_grad()
    (weights * grad).sum().backward()
    q2, k2, _, _ = _attention_score(h + delta, wq, wk, mask)
    correction = qk_correction(q.detach(), k.detach(), q2 - q.detach(), k2 - k.detach(), scores.detach(),
                               weights.detach(), scores.grad, weights.grad)
    for p in range(t):
        patched = h.clone()
        patched[:, p] = h[:, p] + delta[:, p]
        exact = ((_attention_score(patched, wq, wk, mask)[3] - weights.detach()) * grad).sum((1, 2, 3))
        plain = (delta[:, p] * leaf.grad[:, p]).sum(-1)
        np.testing.assert_allclose(plain + correction[:, p], exact, rtol=1e-10, atol=1e-12)
        assert float((plain - exact).abs().max()) > 1e-3  # the plain estimate really is off


@pytest.fixture(scope="module")
def tracer(image, question):
    return Tracer(load_model((tiny_model(seed=1).double(), tiny_processor()), device="cpu"), image, question)


#: The self-attention modules of each text block, by transformers' own names (not the package's anatomy table).
SELF_ATTENTION = {"question_encoder": lambda m: [layer.attention.self for layer in m.text_encoder.encoder.layer],
                  "answer_decoder": lambda m: [layer.attention.self for layer in m.text_decoder.bert.encoder.layer]}


def _own_attention(module, h, heads, causal):
    """Queries, keys, logits (mask included) and weights of one BLIP self-attention module on ``h`` [S, T, D],
    computed here from its own query and key layers."""
    s, t, d = h.shape
    q = module.query(h).view(s, t, heads, d // heads).transpose(1, 2)
    k = module.key(h).view(s, t, heads, d // heads).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if causal:
        logits = logits + torch.full((t, t), torch.finfo(h.dtype).min, dtype=h.dtype).triu(1)
    return q, k, logits, logits.softmax(-1)


@pytest.mark.parametrize("block", lengthy_except(["question_encoder", "answer_decoder"], "answer_decoder"))
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_the_correction_matches_a_loop_over_the_models_own_attention(tracer, block, direction):
    """Each cell's correction, recomputed one position at a time from the model's own attention modules (by
    transformers' names) on the patched input: the exact change of the weights times ∂score/∂weights, minus the
    logits' first-order change times ∂score/∂logits (the logits are bilinear, so that is their change less the
    Δq·Δk term)."""
    from blip_trace_widgets.causal_trace.estimates import qk_terms
    from blip_trace_widgets.causal_trace.qk_fix import attention_gradients
    from blip_trace_widgets.core.scoring import score_rows

    config = TraceConfig(block=block, samples=2, corruption=GaussianNoise(1.0), direction=direction,
                         method="estimate", qk_fix=True, metric="logprob")
    blk, target = tracer.blocks[block], tracer.target(config)
    terms = qk_terms(tracer.corrupted_runs, blk, config, target)
    clean, corrupted, cross = tracer.runs(blk, config, target)
    base, other = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    if direction == "noise":
        cross = blk.clean_cross(tracer.clean_pass, target)

    def score(final):
        logits = blk.logits(tracer.clean_pass, final, target)
        return score_rows(logits.reshape(-1, *logits.shape[2:]), target, "logprob")

    # ∂score/∂logits and ∂score/∂weights at the base run: the gradients the correction multiplies
    attention = attention_gradients(blk.stack, base.inputs[0].expand(2, -1, -1), cross, score)
    modules = SELF_ATTENTION[block](tracer.model)
    heads = tracer.model.config.text_config.num_attention_heads
    assert float(terms[:, -1].abs().max()) == 0.0  # the last layer feeds no attention of its block
    for layer in range(len(modules) - 1):
        h = base.kinds["hidden"][layer].expand(2, -1, -1)
        seen = attention[layer + 1]
        with torch.no_grad():
            q, k, logits, weights = _own_attention(modules[layer + 1], h, heads, block == "answer_decoder")
            np.testing.assert_allclose(weights.numpy(), seen.weights.numpy(), atol=1e-12)  # the same base run
            for p in range(h.shape[1]):
                patched = h.clone()
                patched[:, p] = other.kinds["hidden"][layer].expand(2, -1, -1)[:, p]
                q2, k2, logits2, weights2 = _own_attention(modules[layer + 1], patched, heads, block == "answer_decoder")
                both = ((q2[:, :, p] - q[:, :, p]) * (k2[:, :, p] - k[:, :, p])).sum(-1) / math.sqrt(q.shape[-1])
                first = (((logits2 - logits) * seen.grad_scores).sum((1, 2, 3))
                         - (both * seen.grad_scores[:, :, p, p]).sum(1))
                exact = ((weights2 - weights) * seen.grad_weights).sum((1, 2, 3))
                np.testing.assert_allclose(terms[:, layer, p].numpy(), (exact - first).numpy(), rtol=1e-6, atol=1e-9)


@lengthy
def test_fixed_estimates_tend_to_exact_and_verified_cells_are_exact(tracer):
    errors = []
    for scale in (0.03, 0.003):
        config = TraceConfig(samples=2, corruption=GaussianNoise(scale), metric="logprob")
        exact = tracer.trace(config)
        fixed = tracer.trace(config, method="estimate", qk_fix=True)
        effect = np.abs(exact.scores - exact.low_score).sum()
        errors.append(np.abs(fixed.scores - exact.scores).sum() / effect)
    assert errors[1] < 0.01 and errors[1] < errors[0] / 5, errors  # 0.034 and 0.0034 here: first-order error
    config = TraceConfig(samples=2, corruption=GaussianNoise(3.0), method="verified", qk_fix=True)
    verified = tracer.trace(config)
    exact = tracer.trace(config, method="exact", qk_fix=False)
    for row, layer in verified.config["exact_cells"]:
        assert verified.scores[row, layer] == within_rounding(exact.scores[row, layer])
    assert verified.config["qk_fix"] is True


@pytest.mark.parametrize("fields,message", [
    ({"qk_fix": True}, "use it with method='estimate' or 'verified'"),
    ({"qk_fix": True, "method": "estimate", "kind": "mlp"}, "kind='hidden'"),
    ({"qk_fix": True, "method": "estimate", "block": "vision_encoder"}, "outside the vision encoder"),
    ({"qk_fix": True, "method": "estimate", "steps": 2}, "steps=1"),
    ({"qk_fix": "yes", "method": "estimate"}, "True or False"),
])
def test_the_fix_is_refused_where_it_does_not_apply(fields, message):
    with pytest.raises(BlipTraceError, match=message):
        TraceConfig(**fields)


@lengthy
def test_the_command_line_offers_the_fix(tmp_path, demo_sample):
    import json

    from blip_trace_widgets import cli

    demo_sample.image.save(tmp_path / "image.png")
    base = ["trace", "--model", "demo", "--image", str(tmp_path / "image.png"), "--question", demo_sample.question,
            "--samples", "2", "--method", "estimate"]
    assert cli.main([*base, "--qk-fix", "--out", str(tmp_path / "fixed")]) == 0
    assert cli.main([*base, "--out", str(tmp_path / "plain")]) == 0
    [fixed], [plain] = ((tmp_path / name).glob("*.json") for name in ("fixed", "plain"))
    fixed, plain = json.loads(fixed.read_text()), json.loads(plain.read_text())
    assert fixed["config"]["qk_fix"] is True and "qk_fix" not in plain["config"]
    assert fixed["scores"] != plain["scores"] and fixed["low_score"] == plain["low_score"]
    assert cli.main([*base, "--qk-fix", "--kind", "mlp", "--out", str(tmp_path / "bad")]) == 2
