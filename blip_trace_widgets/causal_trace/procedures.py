"""Named procedures: ROME's causal tracing and the paper's, as presets of :class:`~.tracing.TraceConfig`.

    >>> from blip_trace_widgets.causal_trace.procedures import procedure_config
    >>> config = procedure_config("paper")
    >>> config.corruption, config.samples, config.fresh_noise
    (MultiplicativeNoise(std=5.0, region=None), 1, True)
    >>> procedure_config("paper", kind="mlp", window=3).kind
    'mlp'

Each preset was checked against its source in this repository's history (see docs/reference.md's
table of procedures):

* ``"rome"``: Meng et al.'s ``experiments/causal_trace.py`` adapted to BLIP, at the noise
  level of ROME's notebooks (3σ, σ measured by ``collect_embedding_std``): 10 noise samples
  drawn once (a generator seeded alike for every cell) and shared by every cell, the mean
  of p(answer) over the samples. ROME corrupts the subject's token embeddings; for BLIP the
  image embeddings take their place (``corrupt="question"`` gives ROME's own choice).
* ``"paper"``: Palit et al.'s notebook (``Cleaned_Corrected_Causal_Intervention_Code_VL_models``):
  each value of the vision encoder's output (after ``post_layernorm``) multiplied by
  ``torch.normal(1, 5)``, one sample, drawn afresh for the low score and for every cell.
  The draws here come from one seeded generator, in the paper's order (low score first,
  then position by position, layer by layer), so a run reproduces.
* ``"paper_attention"``: the paper's attention notebook: the image embeddings scaled by
  0.7691 (nothing random), a window of 3 layers, restoring the outputs of BLIP's
  ``.attention`` module, h1 = LN(h + SA(h)) (``kind="post_self_attn"``; pass
  ``kind="post_cross_attn"`` for its ``.crossattention`` runs).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..core.errors import BlipTraceError
from ..core.names import DEFAULT_SAMPLES, PAPER_NOISE_STD, ROME_NOISE_SCALE
from ..corruptions.kinds import GaussianNoise, MultiplicativeNoise, Scale
from . import stages
from .config import TraceConfig


@dataclass(frozen=True)
class Procedure:
    """A named set of :class:`TraceConfig` defaults, with what it stands for."""

    name: str
    summary: str
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def config(self, **overrides: Any) -> TraceConfig:
        """A TraceConfig with this procedure's defaults, then ``overrides``."""
        names = [f.name for f in fields(TraceConfig)]
        unknown = set(overrides) - {*names, "target"}  # target: word's old name, still taken (with a warning)
        if unknown:
            raise BlipTraceError(f"unknown trace setting {', '.join(sorted(unknown))}: use the fields of TraceConfig "
                                 f"({', '.join(names)})")
        settings = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}
        tokens = settings.get("corrupt_tokens")
        if isinstance(tokens, list):
            settings["corrupt_tokens"] = tuple(tokens)
        return TraceConfig(**settings)


PROCEDURES: dict[str, Procedure] = {
    "rome": Procedure(
        "rome", "ROME's: Gaussian noise of 3σ, 10 samples drawn once and shared by every cell",
        {"corruption": GaussianNoise(ROME_NOISE_SCALE), "samples": DEFAULT_SAMPLES, "fresh_noise": False}),
    "paper": Procedure(
        "paper", "the paper's: image embeddings times N(1, 5²), 1 sample, a fresh draw for every cell",
        {"corruption": MultiplicativeNoise(PAPER_NOISE_STD), "samples": 1, "fresh_noise": True, "corrupt": "image"}),
    "paper_attention": Procedure(
        "paper_attention", "the paper's attention notebook: image embeddings times 0.7691, window 3, "
        "restoring h1 (the output of BLIP's attention module)",
        {"corruption": Scale(0.7691), "samples": 1, "window": 3, "kind": "post_self_attn", "corrupt": "image"}),
}


def procedure_config(name: str, **overrides: Any) -> TraceConfig:
    """The TraceConfig of procedure ``name`` with ``overrides`` (None leaves a default in place)."""
    if name not in PROCEDURES:
        raise BlipTraceError(f"unknown procedure {name!r}: use one of {', '.join(PROCEDURES)}")
    return PROCEDURES[name].config(**overrides)


def default_corruption(bundle: Any, stage: str) -> Callable[..., torch.Tensor]:
    """The Gaussian noise that ``trace()``'s callers start from: the model folder's ``noise_scale`` on the
    image embeddings (ROME's 3σ unless ``trace_defaults.json`` says otherwise), ROME's 3σ elsewhere.

    One function serves the explorers and the command line, so they agree.
    """
    return stages.of(stage).default_corruption(bundle)


def resolve_config(bundle: Any, procedure: str = "rome", **fields: Any) -> TraceConfig:
    """The one way a trace's settings are resolved, shared by ``trace()``, ``Tracer.trace``, the explorers and the
    command line: ``procedure``'s preset, then the bundle's defaults (its head's first block; for ROME's
    procedure, the model folder's noise level on the image embeddings, ROME's 3σ elsewhere), then ``fields``
    (a field passed as None keeps its default).

        >>> from blip_trace_widgets import load_model
        >>> resolve_config(load_model("demo")).corruption.level   # the demo model's trace_defaults.json: 10σ
        10.0
    """
    from ..core.names import facts
    from ..models.anatomy import check_block
    from ..models.heads import BY_NAME

    head = getattr(bundle, "head", None)
    if fields.get("block") is None and head in BY_NAME:
        fields["block"] = BY_NAME[head].default_block
    if procedure == "rome" and fields.get("corruption") is None:
        block = fields.get("block") or PROCEDURES["rome"].defaults.get("block") or TraceConfig.block
        stage = fields.get("corrupt") or facts(check_block(block)).default_stage
        fields["corruption"] = default_corruption(bundle, stage)
    return procedure_config(procedure, **fields)
