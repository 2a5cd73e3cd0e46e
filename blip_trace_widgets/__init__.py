"""blip-trace-widgets: live causal tracing of BLIP: visual question answering, captioning, image-text matching.

    >>> from blip_trace_widgets import load_model, trace, demo_samples
    >>> bundle = load_model("demo")
    >>> image, question, answer = demo_samples()[0]
    >>> result = trace(bundle, image, question, samples=3)
    >>> result.block, result.kind
    ('question_encoder', 'hidden')

Every public name is importable from here; each is loaded on first use, so
``import blip_trace_widgets`` itself stays fast (it does not import torch).
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.3.0"

#: Public name -> the module that defines it.
_PUBLIC: dict[str, str] = {
    "BlipBundle": "loading", "load_model": "loading",
    "Blur": "corruption", "GaussianNoise": "corruption", "Grey": "corruption", "ImageSwap": "corruption",
    "PairSwap": "corruption",
    "WordSwap": "corruption", "MultiplicativeNoise": "corruption", "Scale": "corruption", "UniformNoise": "corruption",
    "Box": "regions", "Mask": "regions", "Outside": "regions", "same_size_elsewhere": "regions",
    "BlipTraceError": "errors",
    "TraceResult": "results",
    "TraceConfig": "tracing", "Tracer": "tracing", "trace": "tracing", "default_config": "tracing",
    "CaptionTrace": "captioning", "trace_caption": "tracing",
    "PROCEDURES": "procedures", "procedure_config": "procedures",
    "estimate_sigma": "noise_level",
    "demo_samples": "data", "shape_box": "data", "easy_vqa_captions": "data", "easy_vqa_pairs": "data",
    "PairSample": "data", "hf_pairs": "subsets", "question_pairs": "subsets",
    "load_vqa_subset": "subsets", "open_image": "subsets",
    "sweep": "sweep", "load_sweep": "sweep",
    "average_effect": "aggregate", "average_trace": "aggregate", "bootstrap_interval": "aggregate",
    "top_heads": "aggregate",
    "plot_traces": "plotting", "plot_on_image": "plotting",
    "plot_average_heatmaps": "sweep_plots", "plot_effect_by_layer": "sweep_plots",
    "plot_subset_comparison": "sweep_plots",
    "TraceExplorer": "widgets", "VisionTraceExplorer": "widgets",
    "Edges": "edges", "knockout": "knockout", "Knockout": "knockout", "KnockoutConfig": "knockout",
    "KnockoutResult": "knockout_result", "knockout_sweep": "knockout_sweep", "knockout_average": "knockout_sweep",
    "KnockoutExplorer": "widgets",
    "trace_cost": "cost",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'blip_trace_widgets' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


class _Package(types.ModuleType):
    """This package, where importing a submodule named like a public function (``sweep``, ``knockout``,
    ``knockout_sweep``) never replaces the function: Python's import sets the submodule as an attribute of
    the package, and ``from blip_trace_widgets import sweep`` would then give the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _PUBLIC.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from .aggregate import average_effect, average_trace, bootstrap_interval, top_heads
    from .captioning import CaptionTrace
    from .corruption import Blur, GaussianNoise, Grey, ImageSwap, MultiplicativeNoise, PairSwap, Scale, UniformNoise, WordSwap
    from .cost import trace_cost
    from .data import PairSample, demo_samples, easy_vqa_captions, easy_vqa_pairs, shape_box
    from .edges import Edges
    from .errors import BlipTraceError
    from .knockout import Knockout, KnockoutConfig, knockout
    from .knockout_result import KnockoutResult
    from .knockout_sweep import knockout_average, knockout_sweep
    from .loading import BlipBundle, load_model
    from .noise_level import estimate_sigma
    from .plotting import plot_on_image, plot_traces
    from .procedures import PROCEDURES, procedure_config
    from .regions import Box, Mask, Outside, same_size_elsewhere
    from .results import TraceResult
    from .subsets import hf_pairs, load_vqa_subset, open_image, question_pairs
    from .sweep import load_sweep, sweep
    from .sweep_plots import plot_average_heatmaps, plot_effect_by_layer, plot_subset_comparison
    from .tracing import TraceConfig, Tracer, default_config, trace, trace_caption
    from .widgets import KnockoutExplorer, TraceExplorer, VisionTraceExplorer
