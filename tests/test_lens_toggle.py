"""The explorers' toggle between what a block's states carry (the causal map) and what they say (the lens), driven
from Python as tests/test_widgets.py drives the explorer: no browser."""
from __future__ import annotations

import html

import numpy as np
import pytest
import torch

from blip_trace_widgets import BlipTraceError, load_model, trace
from blip_trace_widgets.causal_trace import cost
from blip_trace_widgets.causal_trace.tracer import default_config
from blip_trace_widgets.core.names import ANSWER_DECODER, LANGUAGE_MODEL, QUESTION_ENCODER
from blip_trace_widgets.lenses import lens
from blip_trace_widgets.lenses.names import SHOWS_LABELS
from blip_trace_widgets.widgets import TraceExplorer
from blip_trace_widgets.widgets.lens import LensExplorer


def _explorer(bundle, sample, block, **kw):
    image, question, _ = sample
    return TraceExplorer(bundle, image, question, config=default_config(bundle, block=block), background=False,
                         mode="exact", noise_samples=4, **kw)


def _decoder_log_probs(bundle, image, question):
    """BLIP's answer decoder run on the model's own modules, each layer's [DEC] state through its cls head: log p
    [layers, vocabulary]."""
    model = bundle.model
    pixels = bundle.processor.image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embeds = model.vision_model(pixel_values=pixels)[0]
        states = model.text_encoder(input_ids=torch.tensor([bundle.tokenizer(question)["input_ids"]]),
                                    encoder_hidden_states=embeds)[0]
        out = model.text_decoder(input_ids=torch.tensor([[model.config.text_config.bos_token_id]]),
                                 encoder_hidden_states=states, output_hidden_states=True)
        layers = [model.text_decoder.cls(h)[0, 0] for h in out.hidden_states[1:]]
    return torch.log_softmax(torch.stack(layers), -1)


def test_the_toggle_switches_the_figure_and_is_a_setting(demo_bundle, demo_sample):
    explorer = _explorer(demo_bundle, demo_sample, ANSWER_DECODER)
    panel = explorer.lens_panel
    assert explorer.shows.value == "carries" and dict(explorer.shows.options) == {v: k for k, v in SHOWS_LABELS.items()}
    assert panel.layout.display == "none" and panel.carried.layout.display is None
    assert bytes(explorer.heatmap.value).startswith(b"\x89PNG") and panel.result is None  # no lens run yet
    explorer.shows.value = "says"
    assert panel.layout.display is None and panel.carried.layout.display == "none"
    assert bytes(panel.grid.value).startswith(b"\x89PNG") and panel.grid.value != explorer.heatmap.value
    assert panel.result.block == ANSWER_DECODER and panel.note.value == ""
    explorer.shows.value = "carries"
    assert panel.layout.display == "none" and panel.carried.layout.display is None
    with pytest.raises(BlipTraceError, match="carries"):
        _explorer(demo_bundle, demo_sample, ANSWER_DECODER, shows="lens")


def test_the_lens_grid_is_lens_of_the_same_cells_and_a_cell_shows_its_causal_value(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    explorer = _explorer(demo_bundle, demo_sample, ANSWER_DECODER, shows="says")
    panel, result = explorer.lens_panel, explorer.result
    expected = lens(demo_bundle, image, question, block=ANSWER_DECODER, answer=result.answer)
    assert panel.result.labels == result.tokens and panel.result.layers == result.num_layers  # cell for cell
    np.testing.assert_array_equal(panel.result.answer_prob, expected.answer_prob)
    assert panel.result.top_tokens == expected.top_tokens
    reference = _decoder_log_probs(demo_bundle, image, question)  # the model's own modules, layer by layer
    answer_id = demo_bundle.tokenizer.convert_tokens_to_ids(result.answer)
    for layer in range(result.num_layers):
        assert abs(panel.result.answer_prob[0, layer] - float(reference[layer, answer_id].exp())) < 1e-5
    panel.layer.value = 1
    top = reference[1].exp().topk(10)
    tokens = panel.cell_tokens(0, 1)
    assert [t for t, _ in tokens] == demo_bundle.tokenizer.convert_ids_to_tokens(top.indices.tolist())
    cell = html.unescape(panel.cell.value)
    assert "layer 1" in cell and tokens[0][0] in cell and f"{result.scores[0, 1]:.3f}" in cell


@pytest.mark.slow
def test_the_compare_view_shows_each_kind_s_causal_value_beside_the_tokens(demo_bundle, demo_sample):
    explorer = _explorer(demo_bundle, demo_sample, ANSWER_DECODER, shows="says")
    panel = explorer.lens_panel
    panel.layer.value = 1
    explorer.view.value = "compare"  # one causal value per kind, beside the same tokens
    cell = html.unescape(panel.cell.value)
    assert all(f"{r.scores[0, 1]:.3f}" in cell for r in explorer.results.values())
    assert len(explorer.results) == 4 and "cross-attention" in cell


def test_a_block_without_a_vocabulary_is_refused_naming_the_block_that_has_one(demo_bundle, demo_sample):
    explorer = _explorer(demo_bundle, demo_sample, QUESTION_ENCODER, shows="says")
    panel = explorer.lens_panel
    note = html.unescape(panel.note.value)
    assert "question encoder ends in no vocabulary" in note and "answer decoder has one" in note
    assert explorer.block.value == QUESTION_ENCODER and explorer.result.block == QUESTION_ENCODER  # never switched
    assert panel.result is None and panel.grid.layout.display == "none" and explorer.error.value == ""


@pytest.mark.slow
def test_the_lens_follows_the_block_picked_and_refuses_a_head_map(demo_bundle, demo_sample):
    explorer = _explorer(demo_bundle, demo_sample, QUESTION_ENCODER, shows="says")
    panel = explorer.lens_panel
    explorer.block.value = ANSWER_DECODER  # the user picks it: the lens follows
    assert panel.note.value == "" and panel.result.block == ANSWER_DECODER
    explorer.kind.value = "cross_attn_head"  # a head map's rows are heads: said, not drawn
    assert "attention heads, not positions" in html.unescape(panel.note.value) and panel.result is None


def test_the_lens_explorer_s_causal_view_is_trace_s_map(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    explorer = LensExplorer(demo_bundle, image, question)
    assert explorer.shows.value == "says" and explorer.trace_result is None and explorer.map.layout.display == "none"
    explorer.shows.value = "carries"
    expected = trace(demo_bundle, image, question, block=ANSWER_DECODER)
    np.testing.assert_array_equal(explorer.trace_result.scores, expected.scores)
    assert explorer.trace_result.tokens == explorer.result.labels and explorer.grid.layout.display == "none"
    assert bytes(explorer.map.value).startswith(b"\x89PNG") and "cells x 10 samples" in explorer.cost.value
    cell = html.unescape(explorer.cell.value)
    assert f"{expected.scores[0, explorer.layer.value]:.3f}" in cell and "what it says" in cell


def test_a_long_causal_map_waits_for_its_button_with_its_cost_said(demo_bundle, demo_sample, monkeypatch):
    image, question, _ = demo_sample
    monkeypatch.setattr(cost, "WARN_SECONDS", 0.0)  # every map is "long" here
    explorer = LensExplorer(demo_bundle, image, question, shows="carries")
    assert explorer.trace_result is None and explorer.go.layout.display is None
    assert "this trace is large" in html.unescape(explorer.cost.value) and "about" in explorer.go.description
    explorer.go.click()
    assert explorer.trace_result is not None and explorer.go.layout.display == "none" and explorer.error.value == ""


@pytest.mark.slow
def test_blip2_s_language_model_lines_up_with_its_lens():
    from blip_trace_widgets import demo_samples

    bundle = load_model("demo-blip2")
    sample = demo_samples()[0]
    explorer = _explorer(bundle, sample, LANGUAGE_MODEL, shows="says")
    lensed, result = explorer.lens_panel.result, explorer.result
    assert lensed is not None and lensed.labels == result.tokens and lensed.labels[0] == "q0"
    expected = lens(bundle, sample[0], sample[1], block=LANGUAGE_MODEL, answer=result.answer)
    np.testing.assert_array_equal(lensed.answer_prob, expected.answer_prob)


def test_saving_while_the_lens_is_shown_saves_the_lens(demo_bundle, demo_sample, tmp_path):
    import json

    from blip_trace_widgets.lenses import LensResult

    explorer = _explorer(demo_bundle, demo_sample, ANSWER_DECODER, export_dir=tmp_path)
    saved_map = json.loads(explorer.export("json").read_text())
    assert "scores" in saved_map  # what it carries: the causal map's result
    explorer.shows.value = "says"
    loaded = LensResult.from_json(explorer.export("json").read_text())
    assert loaded.block == ANSWER_DECODER and loaded.labels == explorer.lens_panel.result.labels
    assert explorer.export("png").read_bytes() == bytes(explorer.lens_panel.grid.value)
    table = explorer.export("csv").read_text().splitlines()
    assert len(table) == 1 + len(loaded.labels) * loaded.layers
    explorer.block.value = QUESTION_ENCODER  # no lens here: saving says why, inside the widget
    assert explorer.export("json") is None and "no lens is shown to save" in explorer.error.value
