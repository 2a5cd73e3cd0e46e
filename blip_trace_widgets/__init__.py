"""blip-trace-widgets: live causal tracing of BLIP visual question answering.

    >>> from blip_trace_widgets import load_model, trace, demo_samples
    >>> bundle = load_model("demo")
    >>> image, question, answer = demo_samples()[0]
    >>> result = trace(bundle, image, question, samples=3)
    >>> result.block, result.kind
    ('question_encoder', 'hidden')
"""
from .corruption import Blur, GaussianNoise, Grey, ImageSwap, MultiplicativeNoise, UniformNoise
from .data import demo_samples
from .loading import BlipBundle, load_model
from .regions import Box, Mask, Outside
from .results import TraceResult
from .subsets import load_vqa_subset
from .sweep import sweep
from .tracing import TraceConfig, Tracer, trace

__all__ = [
    "BlipBundle",
    "Blur",
    "Box",
    "Grey",
    "Mask",
    "Outside",
    "GaussianNoise",
    "ImageSwap",
    "MultiplicativeNoise",
    "TraceConfig",
    "TraceResult",
    "Tracer",
    "UniformNoise",
    "demo_samples",
    "load_model",
    "load_vqa_subset",
    "sweep",
    "trace",
]
__version__ = "0.2.0"
