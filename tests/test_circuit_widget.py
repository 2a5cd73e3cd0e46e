"""CircuitExplorer: the slider measures the circuit it draws; the method and corruption rescore, kept per choice."""
from __future__ import annotations

import pytest

from blip_trace_widgets.datasets.easy_vqa import easy_vqa_pairs
from blip_trace_widgets.models.loading import load_model


@pytest.mark.slow
def test_the_explorer_follows_its_controls():
    from blip_trace_widgets.widgets.circuit import NOISE, PAIR, CircuitExplorer

    pair = easy_vqa_pairs("color", limit=1)[0]
    explorer = CircuitExplorer(load_model("demo"), pair.image, pair.question, method="eap", samples=2,
                               counterfactual=pair.counterfactual_image)
    first = explorer.figure.value
    assert explorer.k.max == len(explorer.result.edges) and explorer.faithfulness.edges == 50
    explorer.k.value = 300
    assert explorer.faithfulness.edges == 300 and explorer.figure.value != first
    assert "300 of 3417 edges" in explorer.status.value
    explorer.corruption.value = PAIR
    assert explorer.result.corruption["name"] == "image_swap" and explorer.result.samples == 1
    explorer.method.value = "eap-ig"
    assert explorer.result.method == "eap-ig" and len(explorer._cache) == 3  # noqa: SLF001
    explorer.corruption.value = NOISE
    assert explorer.result.samples == 2 and len(explorer._cache) == 4  # noqa: SLF001
    assert explorer.error.value == ""
