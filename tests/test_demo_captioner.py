"""The bundled demo captioner and image-text matcher: standard folders, small, and as accurate as their cards say."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from fast_subset import lengthy
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from blip_trace_widgets.core.portable import saved_keys
from blip_trace_widgets.models.loading import DEMO_DIRS, dtype_argument

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"demo-caption": BlipForConditionalGeneration, "demo-itm": BlipForImageTextRetrieval}


def test_the_package_model_data_stays_within_40_mb():
    total = sum(p.stat().st_size for folder in DEMO_DIRS.values() for p in folder.rglob("*") if p.is_file())
    assert total <= 40 * 2**20, f"{total / 2**20:.1f} MB"


@pytest.mark.parametrize("name", FOLDERS)
@lengthy
def test_folders_are_standard_and_readable_by_transformers_4(name):
    folder = DEMO_DIRS[name]
    assert {"config.json", "model.safetensors", "README.md", "evaluation.json", "training_log.json"} <= {
        p.name for p in folder.iterdir()}
    model = FOLDERS[name].from_pretrained(folder, **dtype_argument(torch.float32))
    assert saved_keys(folder) == set(model.state_dict())  # every weight, tied ones too (4.x does not tie them)
    assert (folder / "preprocessor_config.json").is_file() and not (folder / "processor_config.json").exists()


def _evaluation():
    spec = importlib.util.spec_from_file_location("evaluate_demo_captioner", ROOT / "scripts" / "evaluate_demo_captioner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_accuracy_claims_still_hold():
    """Caption exact match and ITM accuracy on every captioned test image, with plain transformers, as the cards say."""
    from PIL import Image

    from blip_trace_widgets.datasets.easy_vqa import easy_vqa_captions

    evaluate = _evaluation()
    pairs = easy_vqa_captions("test")
    images = [Image.open(path).convert("RGB") for path, _ in pairs]
    caption = evaluate.caption_accuracy(DEMO_DIRS["demo-caption"], pairs, images, 128)
    itm = evaluate.itm_accuracy(DEMO_DIRS["demo-itm"], pairs, images, 128)
    claimed = {name: json.loads((DEMO_DIRS[name] / "evaluation.json").read_text()) for name in FOLDERS}
    assert caption["exact_match"] >= 0.95 and itm["accuracy"] >= 0.95
    assert caption["exact_match"] == pytest.approx(claimed["demo-caption"]["exact_match"], abs=1e-9)
    assert itm["accuracy"] == pytest.approx(claimed["demo-itm"]["accuracy"], abs=1e-9)
    assert itm["itc_retrieval_top1"] == pytest.approx(claimed["demo-itm"]["itc_retrieval_top1"], abs=1e-9)
    card = (DEMO_DIRS["demo-caption"] / "README.md").read_text()
    assert f"exact match {100 * caption['exact_match']:.1f}%" in card
    assert f"ITM accuracy {100 * itm['accuracy']:.1f}%" in (DEMO_DIRS["demo-itm"] / "README.md").read_text()
