"""Shared fixtures: a tiny BLIP built from BlipConfig (random weights), an image and a question."""
from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):  # workers share the cores: one torch thread each, in subprocesses too
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

import numpy as np
import pytest
from PIL import Image
from tiny_blip import tiny_model, tiny_processor

from blip_trace_widgets import load_model

#: The package's examples that open an explorer: explorer round trips, run by the full suite (the fast subset leaves
#: them out, as it leaves out the tests marked slow for one).
EXPLORER_EXAMPLES = {"blip_trace_widgets.widgets", "blip_trace_widgets.widgets.explorer", "blip_trace_widgets.widgets.vision",
                     "blip_trace_widgets.widgets.lens", "blip_trace_widgets.widgets.knockout",
                     "blip_trace_widgets.widgets.circuit"}


def pytest_configure(config):
    config.addinivalue_line("markers", "lengthy: marked slow for its running time alone (tests/fast_subset.py)")


#: Files that take minutes (installs, notebooks, fresh interpreters, browsers), longest first (measured with
#: ``--durations``), run before the rest: with ``--dist loadfile`` each file runs whole on one worker, and a long file
#: handed out last keeps one worker busy while the other waits.
LONG_FILES = ("test_packaging.py", "test_notebooks.py", "test_explorer_exit.py", "test_widgets_ipywidgets7.py",
              "test_browser.py", "test_binder.py", "test_sweep.py", "test_cli.py")


def pytest_collection_modifyitems(items):
    for item in items:
        if type(item).__name__ == "DoctestItem" and item.name in EXPLORER_EXAMPLES:
            item.add_marker(pytest.mark.slow)
    rank = {name: index for index, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: each file keeps its order


@pytest.fixture(scope="session")
def tiny_bundle():
    return load_model((tiny_model(), tiny_processor()), device="cpu")


@pytest.fixture(scope="session")
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def question() -> str:
    return "what color is the shape?"


@pytest.fixture(scope="session")
def demo_bundle():
    return load_model("demo", device="cpu")


@pytest.fixture(scope="session")
def demo_sample():
    from blip_trace_widgets import demo_samples

    return demo_samples()[0]
