"""The explorers: ipywidgets controls that drive live causal-trace heatmaps and knockout plots.

    >>> from blip_trace_widgets import load_model
    >>> from blip_trace_widgets.widgets import TraceExplorer
    >>> explorer = TraceExplorer(load_model("demo"), background=False)   # demo samples in a gallery
    >>> explorer.result.kind
    'hidden'
    >>> captions = TraceExplorer(load_model("demo-caption"), background=False)
    >>> captions.word.options, captions.result.answer   # it starts at the first content word
    ((('0: a', 0), ('1: red', 1), ('2: triangle', 2)), 'red')

The explorers work with all three of BLIP's heads. For a captioner the text box holds the
prompt, the answer box shows the caption, a dropdown picks the caption word that is scored,
and a second box takes a caption of your own to score (teacher-forced). For an image-text
matcher the text box holds the text matched against the image, and p(match) is scored.

In a notebook, end a cell with ``explorer`` to show it. Only core ipywidgets are used
(no ipympl, no custom JavaScript): heatmaps are PNG bytes in ``Image`` widgets, which
render the same in JupyterLab, Notebook 7, VS Code and Colab, with ipywidgets 7.7 or 8.

The explorers call the tracing core (:class:`~blip_trace_widgets.causal_trace.tracer.Tracer`) and the
plotting module; they never touch the model. One ``Tracer`` per (image, question) keeps
the clean pass, the corrupted runs and every finished heatmap, so returning to a
configuration already seen is instant and only a new image or question recomputes the
clean pass.

The package: :mod:`.controls` (options, limits and the pure functions from control values to a
configuration), :mod:`.counterfactual` (noise, an image pair or a word swap, and the direction),
:mod:`.live` (what every explorer shares: gallery, cached tracers, background work, errors inside),
:mod:`.explorer` (:class:`TraceExplorer`), :mod:`.vision` (:class:`VisionTraceExplorer`) and
:mod:`.knockout` (:class:`KnockoutExplorer`); :mod:`.toggle` is the "what it carries / what it says" toggle that
:class:`TraceExplorer` and ``lens.LensExplorer`` share (the causal map, or the lens of the same cells).
"""
from .controls import check_gallery, controls_config, default_gallery, tooltip_of
from .counterfactual import Counterfactual
from .explorer import HeadPattern, TraceExplorer
from .knockout import KnockoutExplorer
from .live import TRACER_MEMORY, answer_html, cost_notice, png_width, tiny_warning
from .vision import VisionTraceExplorer

__all__ = ["Counterfactual", "HeadPattern", "KnockoutExplorer", "TRACER_MEMORY", "TraceExplorer", "VisionTraceExplorer",
           "answer_html", "check_gallery", "controls_config", "cost_notice", "default_gallery", "png_width",
           "tiny_warning", "tooltip_of"]
