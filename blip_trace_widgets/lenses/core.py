"""Lenses: what each state of a block that ends in a vocabulary already says (the logit lens and the tuned lens).

    >>> from blip_trace_widgets import load_model, demo_samples
    >>> from blip_trace_widgets.lenses import lens
    >>> image, question, _ = demo_samples()[0]
    >>> result = lens(load_model("demo"), image, question)
    >>> result.answer, result.shape, result.top_token()[0][-1]
    ('red', (1, 4), 'red')

A lens of every position and every layer costs one forward pass of the model, with each layer's output recorded
by forward hooks (:func:`~.reading.read`); each state is then read through the block's own final norm and head
(:func:`~.reading.unembed`), so the last layer's logit lens is the model's own output distribution. The tuned lens
puts a trained affine translator (:class:`~.tuned.TunedLens`) before that head. For BLIP-2's language model the
image queries' positions (q0, q1, ...) are lensed too: what each projected query "says" at each layer.
:func:`query_words` reads the projected queries against the language model's input embeddings instead.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from ..core.errors import BlipTraceError
from ..core.inputs import ImageLike
from ..core.names import LANGUAGE_MODEL, LM_DECODER
from ..models import anatomy
from ..models.heads import head_of_model
from ..models.loading import BlipBundle
from .names import DEFAULT_TOP, LENS_KINDS, LOGIT, MAX_TOP, TUNED
from .reading import Reading, check_bundle, read, unembed
from .result import LensResult
from .tuned import TunedLens, shipped_lens

#: The question a BLIP-2 prompt carries when only the image's queries are asked about (BLIP-2's queries do not read it).
QUERY_QUESTION = "what is the color of the shape?"


def check_top(top: Any, vocabulary: int) -> int:
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or not 1 <= int(top) <= MAX_TOP:
        raise BlipTraceError(f"top={top!r}: pass a whole number of tokens from 1 to {MAX_TOP}")
    return min(int(top), vocabulary)


def check_kind(kind: Any) -> str:
    if kind not in LENS_KINDS:
        raise BlipTraceError(f"unknown lens kind {kind!r}: use one of {', '.join(LENS_KINDS)}")
    return str(kind)


def lens_log_probs(bundle: BlipBundle, reading: Reading, kind: str = LOGIT,
                   tuned: TunedLens | None = None) -> torch.Tensor:
    """log p over the vocabulary of every (layer, position) of ``reading``: [layers, positions, vocabulary], float32."""
    states = reading.states
    if check_kind(kind) == TUNED:
        tuned = tuned if tuned is not None else shipped_lens(bundle, reading.block)
        states = tuned.transform(states)
    with torch.no_grad():
        logits = unembed(bundle.model, reading.block)(states)
    return torch.log_softmax(logits.float(), dim=-1)


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """Tokens as their vocabulary spells them (byte-level BPE's leading "Ġ" shown as a space)."""
    return [str(t).replace("Ġ", " ").replace("▁", " ") for t in tokenizer.convert_ids_to_tokens(ids)]


def answer_id(bundle: BlipBundle, answer: str | None, final: torch.Tensor) -> int:
    """The first token of ``answer`` as the model would say it, or the model's own greedy next token."""
    if answer is None:
        return int(final[-1].argmax())
    return int(head_of_model(bundle.model).answer_tokens(bundle.tokenizer, answer)[0])


def summarise(bundle: BlipBundle, reading: Reading, logp: torch.Tensor, *, kind: str, text: str, top: int,
              answer: str | None, config: dict[str, Any] | None = None) -> LensResult:
    """A :class:`LensResult` of log-probabilities [layers, positions, vocabulary]."""
    top = check_top(top, logp.shape[-1])
    logp = logp.cpu()
    final = logp[-1]  # [positions, vocabulary]: the model's own output
    target = answer_id(bundle, answer, final)
    kl = (final.exp()[None] * (final[None] - logp)).sum(-1).clamp_min(0)  # KL(final || layer) [layers, positions]
    probs, ids = logp.exp().topk(top, dim=-1)  # [layers, positions, top]
    answer_logp = logp[..., target]
    rank = (logp > answer_logp[..., None]).sum(-1) + 1
    words = token_texts(bundle.tokenizer, ids.flatten().tolist())
    layers, positions = logp.shape[:2]
    tops = [[words[(layer * positions + p) * top:(layer * positions + p + 1) * top] for layer in range(layers)]
            for p in range(positions)]
    return LensResult(model=bundle.name, block=reading.block, kind=kind, text=text,
                      answer=token_texts(bundle.tokenizer, [target])[0].strip(), labels=list(reading.labels),
                      top_tokens=tops, top_probs=probs.permute(1, 0, 2).numpy().astype(float),
                      answer_prob=answer_logp.exp().T.numpy().astype(float), answer_rank=rank.T.numpy().astype(int),
                      kl=kl.T.numpy().astype(float), queries=reading.queries, config=dict(config or {}))


def lens(bundle: BlipBundle, image: ImageLike, text: str, block: str | None = None, kind: str = LOGIT,
         top: int = DEFAULT_TOP, answer: str | None = None, tuned: TunedLens | None = None) -> LensResult:
    """The lens of every position x layer of ``block`` on (image, text), from one forward pass.

    ``block``: the answer decoder (VQA), the caption decoder (captioning: ``text`` is the prompt), BLIP-2's or
    InstructBLIP's language model (OPT or LLaMA; the image queries are positions q0, q1, ...) or a Flan-T5 decoder;
    by default the model's own. ``kind``: ``"logit"`` or ``"tuned"`` (the shipped translators of a demo model, or
    ``tuned=`` one from :func:`~.tuned.train_tuned_lens`). ``answer``: the answer whose probability and rank are
    followed (its first token, as the model would say it); by default the model's own greedy next token at the
    last position. The lens reads the states the model computes on its prompt (it does not teacher-force an
    answer)."""
    bundle = check_bundle(bundle)
    kind = check_kind(kind)
    reading = read(bundle, image, text, block)
    logp = lens_log_probs(bundle, reading, kind, tuned)
    return summarise(bundle, reading, logp, kind=kind, text=text, top=top, answer=answer)


def _input_embeddings(model: Any, block: str) -> torch.Tensor:
    if block == LM_DECODER:
        return anatomy.t5_parts(model)["tokens"].weight  # type: ignore[no-any-return]
    return anatomy.language_model_parts(model)["tokens"].weight  # type: ignore[no-any-return]


def query_words(bundle: BlipBundle, image: ImageLike, top: int = DEFAULT_TOP, question: str | None = None) -> pd.DataFrame:
    """BLIP-2's Q-Former output queries through ``language_projection`` against the language model's input embedding
    matrix: each query's ``top`` nearest tokens by cosine similarity (a queries x top table: columns ``word1``...
    and ``cosine1``...). InstructBLIP's queries read the instruction: pass ``question``."""
    bundle = check_bundle(bundle)
    task = head_of_model(bundle.model)
    if task.decoder not in (LANGUAGE_MODEL, LM_DECODER):
        raise BlipTraceError(f"{task.a_model} has no Q-Former queries: load a BLIP-2 or InstructBLIP model, such as "
                             "load_model('demo-blip2')")
    if question is None and task.reads_instruction:
        raise BlipTraceError("InstructBLIP's queries read the instruction: pass question='...'")
    reading = read(bundle, image, question or QUERY_QUESTION, task.decoder)
    assert reading.projected is not None
    embeddings = _input_embeddings(bundle.model, task.decoder).float()
    with torch.no_grad():
        cosine = torch.nn.functional.normalize(reading.projected.float(), dim=-1) @ \
            torch.nn.functional.normalize(embeddings, dim=-1).T
    top = check_top(top, cosine.shape[-1])
    values, ids = cosine.topk(top, dim=-1)
    words = token_texts(bundle.tokenizer, ids.flatten().tolist())
    table: dict[str, list[Any]] = {}
    for k in range(top):
        table[f"word{k + 1}"] = [words[q * top + k] for q in range(len(ids))]
    for k in range(top):
        table[f"cosine{k + 1}"] = values[:, k].tolist()
    return pd.DataFrame(table, index=pd.Index([f"q{q}" for q in range(len(ids))], name="query"))
