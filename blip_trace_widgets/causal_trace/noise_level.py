"""The noise level's σ: per image (the default), or one σ for a model, estimated over a set of inputs as ROME does.

    >>> from blip_trace_widgets import load_model, demo_samples, GaussianNoise
    >>> from blip_trace_widgets.causal_trace.noise_level import estimate_sigma
    >>> bundle = load_model("demo")
    >>> sigma = estimate_sigma(bundle, demo_samples()[:4])
    >>> GaussianNoise(3.0, sigma=sigma).sigma == sigma > 0
    True

ROME's σ is one number per model: the standard deviation of every value of the token
embeddings of its dataset's subjects (``collect_embedding_std``), and its noise is 3σ.
By default :class:`~.corruption.GaussianNoise` here uses the σ of the input it corrupts,
for this one image (or question); ``estimate_sigma`` gives ROME's kind instead, over the
images (or questions) you pass, at the stage the noise will act on.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..core.errors import BlipTraceError
from ..core.names import STAGES


def estimate_sigma(bundle: Any, samples: Iterable[Any], *, stage: str = "image", limit: int = 200) -> float:
    """The standard deviation of every value of the clean ``stage`` input over ``samples`` (at most ``limit``).

    ``samples`` are (image, question[, answer]) tuples or :class:`~.data.VQASample`; ``stage`` is
    where the noise will act: ``"image"`` (vision encoder output), ``"patches"``, ``"pixels"``,
    ``"question"`` (token embeddings), or BLIP-2's ``"queries"`` (the Q-Former's output queries) and
    ``"projected"`` (the same at the language model's width).
    """
    from ..datasets.easy_vqa import text_of
    from ..datasets.subsets import as_samples, open_image
    from . import stages
    from .clean import CleanPass

    if stage not in stages.BY_NAME:
        raise BlipTraceError(f"unknown stage {stage!r}: use one of {', '.join(STAGES)}")
    values = []
    for count, item in enumerate(as_samples(samples)):
        if count >= limit:
            break
        clean_pass = CleanPass(bundle, open_image(item.image), text_of(bundle.head, item))
        with torch.no_grad():
            values.append(stages.of(stage).clean_input(clean_pass).float().flatten())
    if not values:
        raise BlipTraceError("estimate_sigma needs at least one (image, question) sample")
    return float(torch.cat(values).std())
