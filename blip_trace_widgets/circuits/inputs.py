"""The clean and corrupted inputs a circuit run reads: image embeddings, question ids, the decoder's ids, the answer.

    >>> from blip_trace_widgets import load_model, demo_samples
    >>> image, question, _ = demo_samples()[0]
    >>> pair = circuit_inputs(load_model("demo"), image, question, samples=2)
    >>> pair.answer_text, tuple(pair.corrupted_img.shape), pair.corruption["name"], pair.corruption["level"]
    ('red', (2, 65, 128), 'gaussian', 10.0)

The corruption is the package's noise on the image embeddings at the bundle's level (seeded; ``samples`` draws), a
counterfactual image (a PIL image or an :class:`~blip_trace_widgets.ImageSwap`: its embeddings, one draw), a
counterfactual question of as many tokens (a string, one draw), corrupted image embeddings given as a tensor
[S, N, D], or any callable ``(clean [1, N, D], samples, generator) -> [samples, N, D]``.

For BLIP-2 and InstructBLIP (OPT) ``question_ids`` are the language model's prompt (after the Q query rows),
``instruction_ids`` InstructBLIP's Q-Former instruction, and the answer's first token is scored at the prompt's last
position (``offset`` = Q + T − 1); the corruption acts on the image only (a counterfactual question is refused).
With a T5 language model the prompt is the encoder's (after the Q query rows), ``decoder_ids`` the decoder's start
token, and the answer's first token is scored at the decoder's position 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..causal_trace.clean import CleanPass
from ..core.errors import BlipTraceError
from ..core.names import ANSWER_DECODER, QUESTION_ENCODER
from ..corruptions.kinds import GaussianNoise, ImageSwap
from .graph import QUERY_SHAPES, QueryShape, T5Shape, shape_of
from .names import DEFAULT_SAMPLES, DEFAULT_SEED, METRICS


@dataclass(frozen=True)
class CircuitInputs:
    """One clean input and its corrupted counterpart(s)."""

    img: torch.Tensor  # [1, N, Dv] clean image embeddings
    question_ids: torch.Tensor  # [1, T]
    decoder_ids: torch.Tensor  # [1, Td]: the start token and the answer's earlier tokens
    answer: int  # the scored token
    answer_text: str
    corrupted_img: torch.Tensor  # [S, N, Dv]
    corrupted_question_ids: torch.Tensor  # [1, T] or [S, T]
    corruption: dict[str, Any] = field(default_factory=dict)  # name, level, samples, seed, deterministic

    @property
    def samples(self) -> int:
        return int(self.corrupted_img.shape[0])

    #: The decoder position that predicts the scored token (the first answer token: 0, after the start token).
    offset: int = 0
    #: What is scored: "logprob" (log p of the answer's first token) or "prob" (p).
    metric: str = "logprob"
    #: InstructBLIP's Q-Former instruction [1, T'] (the same in both runs); None for other models.
    instruction_ids: torch.Tensor | None = None


def circuit_inputs(bundle: Any, image: Any, question: str, *, corruption: Any = None, samples: int = DEFAULT_SAMPLES,
                   seed: int = DEFAULT_SEED, answer: str | None = None, metric: str = "logprob") -> CircuitInputs:
    """The clean pass of (image, question) and its corrupted input (see the module's docstring); ``metric``:
    "logprob" or "prob" of the answer's first token."""
    if metric not in METRICS:
        raise BlipTraceError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    if not isinstance(samples, int) or not 1 <= samples <= 1000:
        raise BlipTraceError(f"samples must be a whole number from 1 to 1000, got {samples!r}")
    reading = CleanPass(bundle, image, question)
    shape = shape_of(bundle.model)
    if isinstance(shape, QUERY_SHAPES):
        return _query_inputs(reading, corruption, samples, seed, answer, metric, READ_AT[type(shape)])
    if not {QUESTION_ENCODER, ANSWER_DECODER} <= set(reading.task.blocks):  # BLIP VQA's two text blocks
        raise BlipTraceError("circuits are built for BLIP VQA models, and for BLIP-2 and InstructBLIP with an OPT or "
                             "T5 language model: load one such as load_model('demo') or load_model('demo-blip2')")
    img = reading.clean.image_embeds
    ids = torch.tensor([list(reading.question_ids)], device=reading.device)
    text = answer if answer is not None else reading.model_answer
    tokens = reading.task.answer_tokens(bundle.tokenizer, text) if answer is not None else reading.clean.greedy_ids
    if not tokens:
        raise BlipTraceError("the model gives an empty answer to this question; pass answer='...' to score one")
    decoder = torch.tensor([[reading.bos_id]], device=reading.device)
    corrupted_img, corrupted_ids, info = _corrupt(reading, img, ids, corruption, samples, seed)
    return CircuitInputs(img, ids, decoder, int(tokens[0]), text, corrupted_img, corrupted_ids, info, metric=metric)


def _opt_reading(reading: CleanPass, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """OPT's: no decoder ids; the answer is read at the prompt's last position (row Q + T - 1)."""
    return ids[:, :0], int(reading.bundle.model.config.num_query_tokens) + ids.shape[1] - 1


def _t5_reading(reading: CleanPass, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """T5's: the decoder runs on its start token, and the answer is read at its position 0."""
    return torch.tensor([[reading.bos_id]], device=reading.device), 0


#: Per BLIP-2 / InstructBLIP graph shape: (decoder ids, position the answer is read at) of a prompt.
READ_AT: dict[type, Any] = {QueryShape: _opt_reading, T5Shape: _t5_reading}


def _query_inputs(reading: CleanPass, corruption: Any, samples: int, seed: int, answer: str | None,
                  metric: str, read_at: Any) -> CircuitInputs:
    """BLIP-2's or InstructBLIP's: the prompt's ids (after the Q queries in the language model), InstructBLIP's
    instruction, the answer's first token, scored where ``read_at`` says (OPT: the prompt's last position; T5: the
    decoder's first)."""
    if isinstance(corruption, str):
        raise BlipTraceError("BLIP-2 and InstructBLIP circuits corrupt the image only (the prompt is the same in both "
                             "runs): pass noise, another image or image embeddings as corruption")
    bundle = reading.bundle
    img = reading.clean.image_embeds
    ids = torch.tensor([list(reading.question_ids)], device=reading.device)
    text = answer if answer is not None else reading.model_answer
    tokens = reading.task.answer_tokens(bundle.tokenizer, text) if answer is not None else reading.clean.greedy_ids
    if not tokens:
        raise BlipTraceError("the model gives an empty answer to this question; pass answer='...' to score one")
    instruction = torch.tensor([list(reading.instruction_ids)], dtype=torch.long, device=reading.device)
    corrupted_img, _, info = _corrupt(reading, img, ids, corruption, samples, seed)
    decoder, offset = read_at(reading, ids)
    return CircuitInputs(img, ids, decoder, int(tokens[0]), text, corrupted_img, ids, info, offset=offset,
                         metric=metric, instruction_ids=instruction if instruction.shape[1] else None)


def _corrupt(reading: CleanPass, img: torch.Tensor, ids: torch.Tensor, corruption: Any, samples: int,
             seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    generator = torch.Generator().manual_seed(int(seed))
    if corruption is None:
        corruption = GaussianNoise(float(getattr(reading.bundle, "noise_scale", 3.0)))
    if isinstance(corruption, str):
        _, other = reading.task.encode(reading.bundle.tokenizer, corruption, reading.position_limit, reading.bos_id)
        if len(other) != ids.shape[1]:
            raise BlipTraceError(f"the counterfactual question has {len(other)} tokens and the question {ids.shape[1]}: "
                                 "use one of as many tokens (swap words one for one)")
        info = {"name": "question_swap", "level": None, "question": corruption, "samples": 1, "deterministic": True}
        return img, torch.tensor([other], device=ids.device), info
    if isinstance(corruption, torch.Tensor):
        if corruption.dim() != 3 or corruption.shape[1:] != img.shape[1:]:
            raise BlipTraceError(f"corrupted image embeddings must be [samples, {img.shape[1]}, {img.shape[2]}], "
                                 f"got {tuple(corruption.shape)}")
        info = {"name": "given", "level": None, "samples": int(corruption.shape[0]), "deterministic": False}
        return corruption.to(img), ids, info
    if not isinstance(corruption, ImageSwap) and hasattr(corruption, "size") and hasattr(corruption, "mode"):
        corruption = ImageSwap(corruption)
    if isinstance(corruption, ImageSwap):
        other_img = reading.embed_image(corruption.other_image)
        return other_img, ids, {"name": "image_swap", "level": None, "samples": 1, "deterministic": True}
    if not callable(corruption):
        raise BlipTraceError(f"corruption must be None (the bundle's noise), a noise such as GaussianNoise(3), an "
                             f"image, a counterfactual question or a tensor, got {type(corruption).__name__}")
    out = corruption(img, samples, generator)
    if not isinstance(out, torch.Tensor) or out.shape != (samples, *img.shape[1:]) or not bool(torch.isfinite(out).all()):
        raise BlipTraceError(f"the corruption must return finite image embeddings of shape {(samples, *img.shape[1:])}")
    named = getattr(corruption, "info", None)
    return out.to(img), ids, {"name": getattr(named, "name", type(corruption).__name__),
                              "level": getattr(corruption, "level", None), "samples": samples, "seed": int(seed),
                              "deterministic": bool(getattr(corruption, "deterministic", False))}
