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

from . import relocated

__version__ = "0.3.0"

#: Public name -> the module that defines it.
_PUBLIC: dict[str, str] = {
    "BlipBundle": "models.loading", "load_model": "models.loading",
    "Blur": "corruptions.kinds", "GaussianNoise": "corruptions.kinds", "Grey": "corruptions.kinds",
    "ImageSwap": "corruptions.kinds", "PairSwap": "corruptions.kinds", "WordSwap": "corruptions.kinds",
    "MultiplicativeNoise": "corruptions.kinds", "Scale": "corruptions.kinds", "UniformNoise": "corruptions.kinds",
    "Box": "core.regions", "Mask": "core.regions", "Outside": "core.regions", "same_size_elsewhere": "core.regions",
    "BlipTraceError": "core.errors",
    "TraceResult": "causal_trace.results",
    "TraceConfig": "causal_trace.tracer", "Tracer": "causal_trace.tracer", "trace": "causal_trace.tracer",
    "default_config": "causal_trace.tracer", "trace_caption": "causal_trace.tracer",
    "CaptionTrace": "causal_trace.captioning",
    "PROCEDURES": "causal_trace.procedures", "procedure_config": "causal_trace.procedures",
    "estimate_sigma": "causal_trace.noise_level",
    "demo_samples": "datasets.easy_vqa", "shape_box": "datasets.easy_vqa", "easy_vqa_captions": "datasets.easy_vqa",
    "easy_vqa_pairs": "datasets.easy_vqa", "PairSample": "datasets.easy_vqa",
    "hf_pairs": "datasets.subsets", "question_pairs": "datasets.subsets", "load_vqa_subset": "datasets.subsets",
    "open_image": "datasets.subsets",
    "sweep": "sweeps.sweep", "load_sweep": "sweeps.sweep",
    "average_effect": "causal_trace.averages", "average_trace": "causal_trace.averages",
    "bootstrap_interval": "causal_trace.averages", "top_heads": "causal_trace.averages",
    "plot_traces": "causal_trace.plots", "plot_on_image": "causal_trace.plots",
    "plot_average_heatmaps": "sweeps.plots", "plot_effect_by_layer": "sweeps.plots",
    "plot_subset_comparison": "sweeps.plots",
    "TraceExplorer": "widgets", "VisionTraceExplorer": "widgets", "KnockoutExplorer": "widgets",
    "Edges": "attention_knockout.edges",
    "knockout": "attention_knockout.knockout", "Knockout": "attention_knockout.knockout",
    "KnockoutConfig": "attention_knockout.knockout",
    "KnockoutResult": "attention_knockout.result",
    "knockout_sweep": "attention_knockout.sweep", "knockout_average": "attention_knockout.sweep",
    "trace_cost": "causal_trace.cost",
    **{name: "lenses" for name in ("lens", "LensResult", "TunedLens", "train_tuned_lens", "query_words",
                                   "lens_sweep", "lens_average")},
    "LensExplorer": "widgets.lens", "CircuitExplorer": "widgets.circuit",
    **{name: "circuits" for name in ("circuit_graph", "path_patch", "edge_scores", "EdgeResult", "circuit",
                                     "faithfulness", "faithfulness_curve", "plot_circuit", "edge_sweep",
                                     "EdgeAverage", "universal_heads", "dataset_faithfulness")},
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
        if isinstance(value, types.ModuleType) and name in _PUBLIC:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
relocated.install()


if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from .attention_knockout.edges import Edges
    from .attention_knockout.knockout import Knockout, KnockoutConfig, knockout
    from .attention_knockout.result import KnockoutResult
    from .attention_knockout.sweep import knockout_average, knockout_sweep
    from .causal_trace.averages import average_effect, average_trace, bootstrap_interval, top_heads
    from .causal_trace.captioning import CaptionTrace
    from .causal_trace.cost import trace_cost
    from .causal_trace.noise_level import estimate_sigma
    from .causal_trace.plots import plot_on_image, plot_traces
    from .causal_trace.procedures import PROCEDURES, procedure_config
    from .causal_trace.results import TraceResult
    from .causal_trace.tracer import TraceConfig, Tracer, default_config, trace, trace_caption
    from .circuits import (
        EdgeAverage,
        EdgeResult,
        circuit,
        circuit_graph,
        dataset_faithfulness,
        edge_scores,
        edge_sweep,
        faithfulness,
        faithfulness_curve,
        path_patch,
        plot_circuit,
        universal_heads,
    )
    from .core.errors import BlipTraceError
    from .core.regions import Box, Mask, Outside, same_size_elsewhere
    from .corruptions.kinds import (
        Blur,
        GaussianNoise,
        Grey,
        ImageSwap,
        MultiplicativeNoise,
        PairSwap,
        Scale,
        UniformNoise,
        WordSwap,
    )
    from .datasets.easy_vqa import PairSample, demo_samples, easy_vqa_captions, easy_vqa_pairs, shape_box
    from .datasets.subsets import hf_pairs, load_vqa_subset, open_image, question_pairs
    from .lenses import LensResult, TunedLens, lens, lens_average, lens_sweep, query_words, train_tuned_lens
    from .models.loading import BlipBundle, load_model
    from .sweeps.plots import plot_average_heatmaps, plot_effect_by_layer, plot_subset_comparison
    from .sweeps.sweep import load_sweep, sweep
    from .widgets import KnockoutExplorer, TraceExplorer, VisionTraceExplorer
    from .widgets.circuit import CircuitExplorer
    from .widgets.lens import LensExplorer
