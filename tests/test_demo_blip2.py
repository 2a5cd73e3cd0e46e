"""The bundled demo BLIP-2: a standard folder that plain transformers loads, answers easy-VQA as its card says, and
traces with signal."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from fast_subset import lengthy
from transformers import Blip2ForConditionalGeneration, Blip2Processor

from blip_trace_widgets import GaussianNoise, Tracer, demo_samples, load_model
from blip_trace_widgets.models.loading import DEMO_DIRS

ROOT = Path(__file__).resolve().parents[1]
FOLDER = DEMO_DIRS["demo-blip2"]


@pytest.fixture(scope="module")
def bundle():
    return load_model("demo-blip2")


@lengthy
def test_the_folder_is_standard_and_plain_transformers_answers_with_it():
    assert {"config.json", "model.safetensors", "README.md", "evaluation.json", "training_log.json",
            "trace_defaults.json"} <= {p.name for p in FOLDER.iterdir()}
    model = Blip2ForConditionalGeneration.from_pretrained(FOLDER).eval()
    processor = Blip2Processor.from_pretrained(FOLDER)
    sample = demo_samples()[0]
    inputs = processor(images=sample.image, text=f"Question: {sample.question} Answer:", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    said = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert said == sample.answer
    assert model.config.num_query_tokens == 8 and model.config.text_config.model_type == "opt"


@lengthy
def test_the_package_answers_as_generate_does(bundle):
    model, processor = bundle.model, bundle.processor
    for sample in demo_samples(per_type=2):
        tracer = Tracer(bundle, sample.image, sample.question)
        inputs = processor(images=sample.image, text=f"Question: {sample.question} Answer:", return_tensors="pt")
        assert inputs["input_ids"][0, model.config.num_query_tokens:].tolist() == list(tracer.question_ids)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        generated = out[0, inputs["input_ids"].shape[1]:].tolist()
        eos = model.generation_config.eos_token_id
        assert tracer.clean.greedy_ids == (generated[: generated.index(eos)] if eos in generated else generated)


@lengthy
def test_a_trace_of_the_demo_has_signal_at_its_own_noise(bundle):
    sample = demo_samples()[0]
    tracer = Tracer(bundle, sample.image, sample.question)
    result = tracer.trace(block="qformer", samples=5, corruption=GaussianNoise(bundle.noise_scale), corrupt="image")
    assert result.high_score > 0.5 and result.high_score - result.low_score > 0.2


def _evaluation():
    spec = importlib.util.spec_from_file_location("evaluate_demo_blip2", ROOT / "scripts" / "evaluate_demo_blip2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_accuracy_claim_still_holds():
    """Exact match on every easy-VQA test question with plain transformers generate(), as the card says."""
    measured = _evaluation().evaluate(FOLDER)
    claimed = json.loads((FOLDER / "evaluation.json").read_text())
    assert measured["questions"] == claimed["questions"] == 9673
    assert measured["accuracy"] == pytest.approx(claimed["accuracy"], abs=1e-9)
    assert f"{100 * measured['accuracy']:.1f}%" in (FOLDER / "README.md").read_text()
