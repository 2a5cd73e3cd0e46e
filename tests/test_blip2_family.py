"""BLIP-2 and InstructBLIP with each language model family (OPT, Flan-T5, LLaMA) answer as ``generate()`` does and
restore to their clean score, under transformers 5 and (in ``test_transformers4.py``'s run) 4.40.

The two differ where this test must: 4.40's processors put no image placeholders in ``input_ids`` (the model
prepends the queries itself) and its ``generate()`` returns a decoder-only model's start token before the new tokens;
5.x takes the placeholders and returns the prompt before them. transformers 4.40 keeps LLaMA's rotary embedding in
every layer's attention, 5.x once in the model: ``anatomy`` reads either.
"""
from __future__ import annotations

import pytest
import torch
import transformers
from fast_subset import lengthy
from tiny_blip import BLIP2_VOCAB, VOCAB, make_tokenizer, tiny_blip2, tiny_blip2_t5, tiny_instructblip
from tolerance import within_rounding
from transformers import Blip2Processor, BlipImageProcessor, InstructBlipProcessor

from blip_trace_widgets import TraceConfig, Tracer, load_model

QUESTION = "what color is the shape?"
QUERIES = 4
MAJOR = int(transformers.__version__.split(".")[0])
#: name: (make the model, InstructBLIP?, a language-model block)
MODELS = {
    "blip2": (lambda: tiny_blip2(seed=3), False, "language_model"),
    "instructblip": (lambda: tiny_instructblip(seed=5), True, "language_model"),
    "instructblip-vicuna": (lambda: tiny_instructblip(seed=1, language="llama"), True, "language_model"),
    "blip2-t5": (lambda: tiny_blip2_t5(seed=1), False, "lm_encoder"),
    "instructblip-t5": (lambda: tiny_blip2_t5(seed=0, instruct=True), True, "lm_decoder"),
}


def _processor(instruct: bool):
    images = BlipImageProcessor(size={"height": 32, "width": 32})
    extra = {"num_query_tokens": QUERIES} if MAJOR >= 5 else {}
    if instruct:
        return InstructBlipProcessor(image_processor=images, tokenizer=make_tokenizer(BLIP2_VOCAB),
                                     qformer_tokenizer=make_tokenizer(VOCAB), **extra)
    return Blip2Processor(image_processor=images, tokenizer=make_tokenizer(BLIP2_VOCAB), **extra)


@pytest.mark.parametrize("name", list(MODELS))
@lengthy
def test_each_language_model_answers_as_generate_does_and_restores_to_clean(name, image):
    make, instruct, block = MODELS[name]
    model = make()
    model.config.text_config.architectures = [type(model.language_model).__name__]  # 4.40's generate() reads it
    processor = _processor(instruct)
    tracer = Tracer(load_model((model, processor), device="cpu"), image, QUESTION)
    encoder_decoder = bool(model.config.text_config.is_encoder_decoder)
    prompt = list(tracer.question_ids)
    ids = torch.tensor([[BLIP2_VOCAB["<image>"]] * QUERIES * (MAJOR >= 5) + prompt])
    inputs = processor(images=image, text=QUESTION, return_tensors="pt")
    extra = {"qformer_input_ids": inputs["qformer_input_ids"]} if instruct else {}
    out = model.generate(pixel_values=inputs["pixel_values"], input_ids=ids, max_new_tokens=10, do_sample=False,
                         num_beams=1, **extra)[0].tolist()
    generated = out[ids.shape[1]:] if MAJOR >= 5 and not encoder_decoder else out[1:]  # after the prompt, or start
    stop = model.generation_config.eos_token_id
    generated = generated[:generated.index(stop)] if stop in generated else generated
    assert tracer.clean.greedy_ids == generated

    config = TraceConfig(block=block, kind="hidden", samples=2, corrupt="image")
    result = tracer.trace(config)
    last = len(tracer.blocks[block].stack) - 1
    everything = tuple((last, p) for p in range(len(result.tokens)))
    assert float(tracer.restore_marked([everything], config).mean[0]) == within_rounding(result.high_score)
