"""One forward pass of a block that ends in a vocabulary, with every layer's output state recorded.

    >>> from blip_trace_widgets import load_model, demo_samples
    >>> from blip_trace_widgets.lenses.reading import read
    >>> image, question, _ = demo_samples()[0]
    >>> r = read(load_model("demo"), image, question)
    >>> r.block, tuple(r.states.shape), r.labels
    ('answer_decoder', (4, 1, 128), ['[DEC]'])

A lens of every position and layer needs nothing else: the model runs once (its vision encoder, the reader and the
block, each once, with forward hooks recording each layer's output), and :func:`unembed` reads each state through
the block's own final norm and head, as the model computes its output from its last layer:

- BLIP's answer and caption decoders are post-LayerNorm BERT: a layer's output is already normalised, and the
  decoder's ``cls.predictions`` head (transform, LayerNorm, decoder) gives the logits.
- BLIP-2's and InstructBLIP's OPT or LLaMA language models are pre-norm: their final norm, then ``lm_head``.
- A Flan-T5 decoder: its ``final_layer_norm``, the ``d_model ** -0.5`` scaling when the head is tied to the
  embeddings (the configuration's ``scale_decoder_outputs``, as transformers computes it), then ``lm_head``.
- T5's encoder has no sound lens (see :data:`~.names.NO_VOCABULARY`): it is refused.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..core.errors import BlipTraceError
from ..core.inputs import ImageLike, to_rgb_image
from ..core.names import ANSWER_DECODER, BLOCK_LABELS, CAPTION_DECODER, LANGUAGE_MODEL, LM_DECODER
from ..models import anatomy
from ..models.heads import Head, head_of_model
from ..models.hooks import record_outputs
from ..models.loading import BlipBundle
from .names import LENS_BLOCKS, NO_VOCABULARY, QUERY_LABEL


@dataclass(frozen=True)
class Reading:
    """Every layer's output state of ``block`` at every position, from one forward pass."""

    block: str
    states: torch.Tensor  # [layers, positions, width]
    labels: list[str]  # one per position: q0, q1, ... for image queries, then the tokens
    token_ids: list[int]  # the input's token ids (image query positions: the image token)
    queries: int  # image-query positions at the start (BLIP-2's language model), else 0
    projected: torch.Tensor | None  # BLIP-2: the projected queries [queries, width], the language model's input


def check_bundle(bundle: Any) -> BlipBundle:
    if not isinstance(bundle, BlipBundle):
        raise BlipTraceError("pass the bundle returned by load_model(...), not a bare model")
    return bundle


def lens_block(bundle: BlipBundle, block: str | None) -> str:
    """``block``, or the model's default, when it ends in a vocabulary; a clear error otherwise."""
    task = head_of_model(bundle.model)
    blocks = LENS_BLOCKS.get(task.name, ())
    if not blocks:
        raise BlipTraceError(f"{task.a_model} ends in no vocabulary (it scores p(match)), so it has no lens: load a "
                             "question-answering or captioning model, such as load_model('demo')")
    if block is None:
        return blocks[0]
    if block in NO_VOCABULARY:
        raise BlipTraceError(NO_VOCABULARY[block])
    if block not in blocks:
        raise BlipTraceError(f"the {BLOCK_LABELS.get(block, block)} of {task.a_model} does not end in a vocabulary: "
                             f"lens block={blocks[0]!r}")
    return block


def layer_names(model: Any, block: str) -> list[str]:
    """The module whose output is each layer's state."""
    if block == LANGUAGE_MODEL:
        stack = anatomy.language_model_row(model).layers
        return [f"{stack}.{layer}" for layer in range(anatomy.num_layers(model, block))]
    return [anatomy.module_name(block, "hidden", layer) for layer in range(anatomy.num_layers(model, block))]


def unembed(model: Any, block: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The block's own way from a last-layer state [..., D] to logits [..., V], as the model computes its output."""
    if block in (ANSWER_DECODER, CAPTION_DECODER):
        return anatomy.answer_head(model)  # type: ignore[no-any-return]
    if block == LANGUAGE_MODEL:
        parts = anatomy.language_model_parts(model)
        norm, head = parts["final_norm"], parts["head"]
        return lambda h: head(norm(h))
    if block == LM_DECODER:
        parts = anatomy.t5_parts(model)
        config = anatomy.text_config(model)
        scaled = getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", False))
        scale = float(config.d_model) ** -0.5 if scaled else 1.0
        norm, head = parts["decoder_norm"], parts["head"]
        return lambda h: head(norm(h) * scale)
    raise BlipTraceError(NO_VOCABULARY.get(block, f"the {BLOCK_LABELS.get(block, block)} ends in no vocabulary"))


def pixel_values(bundle: BlipBundle, image: ImageLike) -> torch.Tensor:
    pixels = bundle.processor.image_processor(to_rgb_image(image), return_tensors="pt")["pixel_values"]
    return pixels.to(device=bundle.device, dtype=bundle.dtype)


def _ids(bundle: BlipBundle, task: Head, text: str) -> list[int]:
    model = bundle.model
    return task.encode(bundle.tokenizer, text, task.position_limit(model), task.start_token(model))[1]


def _run_blip(bundle: BlipBundle, task: Head, pixels: torch.Tensor, text: str) -> list[int]:
    """BLIP's VQA or captioning model, as its ``generate()`` runs it up to the decoder's first prediction."""
    model, device = bundle.model, bundle.device
    image = model.vision_model(pixel_values=pixels)[0]
    image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=device)
    if task.name == "caption":
        ids = _ids(bundle, task, text)
        model.text_decoder(input_ids=torch.tensor([ids], device=device), encoder_hidden_states=image,
                           encoder_attention_mask=image_mask)
        return ids
    question = torch.tensor([_ids(bundle, task, text)], device=device)
    states = model.text_encoder(input_ids=question, encoder_hidden_states=image, encoder_attention_mask=image_mask)[0]
    start = [task.start_token(model)]
    model.text_decoder(input_ids=torch.tensor([start], device=device), encoder_hidden_states=states,
                       encoder_attention_mask=torch.ones(states.shape[:-1], dtype=torch.long, device=device))
    return start


def image_token(model: Any) -> int:
    token = getattr(model.config, "image_token_index", None)
    if token is None:
        token = getattr(model.config, "image_token_id", None)
    if token is None:
        raise BlipTraceError("this BLIP-2 model's configuration names no image token (image_token_index): save it "
                             "with a transformers release that expands the queries in the prompt (4.47 or later)")
    return int(token)


def _run_blip2(bundle: BlipBundle, task: Head, pixels: torch.Tensor, text: str) -> list[int]:
    """BLIP-2's or InstructBLIP's whole forward pass: queries, then the prompt (a T5 decoder: from its start)."""
    model, device = bundle.model, bundle.device
    queries = int(model.config.num_query_tokens)
    ids = [image_token(model)] * queries + _ids(bundle, task, text)
    inputs: dict[str, Any] = {"pixel_values": pixels, "input_ids": torch.tensor([ids], device=device)}
    instruction = task.instruction(bundle, text)
    if instruction:
        inputs["qformer_input_ids"] = torch.tensor([list(instruction)], device=device)
    if task.decoder == LM_DECODER:
        start = [task.start_token(model)]
        inputs["decoder_input_ids"] = torch.tensor([start], device=device)
        model(**inputs)
        return start
    model(**inputs)
    return ids


def read(bundle: BlipBundle, image: ImageLike, text: str, block: str | None = None) -> Reading:
    """The states of every layer of ``block`` (default: the model's block that ends in a vocabulary) at every position
    of one forward pass on (image, text)."""
    bundle = check_bundle(bundle)
    block = lens_block(bundle, block)
    model = bundle.model
    task = head_of_model(model)
    names = layer_names(model, block)
    blip2 = block in (LANGUAGE_MODEL, LM_DECODER)
    extra = [anatomy.LANGUAGE_PROJECTION] if blip2 else []
    pixels = pixel_values(bundle, image)
    with torch.no_grad(), record_outputs(model, names + extra) as seen:
        ids = (_run_blip2 if blip2 else _run_blip)(bundle, task, pixels, text)
    states = torch.stack([seen[name][0] for name in names])
    queries = int(model.config.num_query_tokens) if block == LANGUAGE_MODEL else 0
    tokens = bundle.tokenizer.convert_ids_to_tokens(ids[queries:])
    labels = [QUERY_LABEL.format(q) for q in range(queries)] + [str(t) for t in tokens]
    projected = seen[anatomy.LANGUAGE_PROJECTION][0] if blip2 else None
    return Reading(block, states, labels, [int(i) for i in ids], queries, projected)
