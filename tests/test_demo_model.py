"""The bundled demo model: a standard HF folder that loads offline and answers easy-VQA."""
from __future__ import annotations

from fast_subset import lengthy
from transformers import BlipForQuestionAnswering, BlipProcessor

from blip_trace_widgets import demo_samples, trace
from blip_trace_widgets.causal_trace.tracer import Tracer
from blip_trace_widgets.datasets.easy_vqa import question_type
from blip_trace_widgets.models.loading import DEMO_MODEL_DIR


@lengthy
def test_folder_is_standard_and_small():
    names = {p.name for p in DEMO_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= names
    assert sum(p.stat().st_size for p in DEMO_MODEL_DIR.iterdir()) <= 20 * 2**20
    model = BlipForQuestionAnswering.from_pretrained(DEMO_MODEL_DIR)
    processor = BlipProcessor.from_pretrained(DEMO_MODEL_DIR)
    assert model.config.text_config.num_hidden_layers >= 4
    assert processor.image_processor.size["height"] == model.config.vision_config.image_size


@lengthy
def test_folder_is_readable_by_transformers_4():
    """Every weight stored (4.x does not tie the decoder's output matrix); the image processor where 4.x reads it."""
    from blip_trace_widgets.core.portable import saved_keys

    model = BlipForQuestionAnswering.from_pretrained(DEMO_MODEL_DIR)
    assert saved_keys(DEMO_MODEL_DIR) == set(model.state_dict())
    assert (DEMO_MODEL_DIR / "preprocessor_config.json").is_file()
    assert not (DEMO_MODEL_DIR / "processor_config.json").exists()


def test_tokens_round_trip(demo_bundle):
    tok = demo_bundle.tokenizer
    ids = tok("Does the image not contain a gray shape?")["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "does", "the", "image", "not", "contain", "a", "gray",
                                              "shape", "?", "[SEP]"]
    assert tok.decode(ids, skip_special_tokens=True).replace(" ?", "?") == "does the image not contain a gray shape?"


def test_demo_samples_spread_across_types():
    samples = demo_samples(per_type=3)
    assert len(samples) == 9
    assert {question_type(s.answer) for s in samples} == {"color", "shape", "yes/no"}
    assert all(s.image.size == (64, 64) and s.image.mode == "RGB" for s in samples)


@lengthy
def test_answers_easy_vqa_questions(demo_bundle):
    samples = demo_samples(per_type=4)
    answers = [Tracer(demo_bundle, s.image, s.question).model_answer for s in samples]
    right = [a == s.answer for a, s in zip(answers, samples)]
    assert sum(right) >= len(samples) - 1, list(zip(answers, [s.answer for s in samples]))


def test_trace_on_demo_model_has_signal(demo_bundle, demo_sample):
    image, question, _ = demo_sample
    from blip_trace_widgets import GaussianNoise
    result = trace(demo_bundle, image, question, samples=5, corruption=GaussianNoise(demo_bundle.noise_scale))
    assert result.high_score > 0.5
    assert result.high_score - result.low_score > 0.2, "the corruption should hurt the answer"
    assert result.scores.max() > result.low_score + 0.5 * (result.high_score - result.low_score)
