"""The explorer's counterfactual controls: noise, an image pair or a word swap, and the patching direction.

    >>> from blip_trace_widgets.widgets.counterfactual import Counterfactual
    >>> from blip_trace_widgets import TraceConfig
    >>> controls = Counterfactual(gallery=[])
    >>> controls.source.value = "swap"
    >>> controls.swapped.value = "what is the color of the circle?"
    >>> config = controls.apply(TraceConfig(samples=10), gallery_index=0)
    >>> type(config.corruption).__name__, config.corrupt, config.samples
    ('WordSwap', 'question', 1)

"image pair" swaps in a partner image from the gallery: by default the current item's own partner (a gallery
item's fourth element, as ``easy_vqa_pairs`` gives), else the next gallery image. "word swap" corrupts the
question's tokens with those of a counterfactual question of the same length. Both are one deterministic
sample. The direction toggle runs denoising (clean states restored into the corrupted run: what is sufficient)
or noising (corrupted states patched into the clean run: what is necessary).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import ipywidgets as W

from ..causal_trace.config import TraceConfig
from ..core.errors import BlipTraceError
from ..core.names import DIRECTION_LABELS, DIRECTIONS
from ..corruptions.kinds import ImageSwap, WordSwap

SOURCES = [("noise", "noise"), ("image pair", "pair"), ("word swap", "swap")]
OWN_PARTNER = -1


class Counterfactual(W.VBox):
    """What corrupts the input (noise, a partner image, a swapped question) and the direction of patching."""

    def __init__(self, gallery: list[tuple], sources: Sequence[str] = ("noise", "pair", "swap"),
                 text: str = "question") -> None:
        super().__init__()
        self.text = text  # what the model reads: a question, a captioner's prompt or a matcher's text
        style = {"description_width": "initial"}
        self.gallery = gallery
        self.source = W.ToggleButtons(options=[o for o in SOURCES if o[1] in sources], value="noise",
                                      description="corrupt with", style=style)
        self.partner = W.Dropdown(description="partner image", style=style, layout=W.Layout(width="340px"))
        self.swapped = W.Text(value="", description=f"counterfactual {text}", placeholder=f"the {text}, one word "
                              "changed", style=style, continuous_update=False, layout=W.Layout(width="420px"))
        self.direction = W.ToggleButtons(options=[(d, d) for d in DIRECTIONS], value="denoise",
                                         description="direction", style=style)
        self.direction.tooltips = [DIRECTION_LABELS[d] for d in DIRECTIONS]
        self.children = [W.HBox([self.source, self.direction]), self.partner, self.swapped]
        self.sync(0)

    @property
    def controls(self) -> list[W.Widget]:
        return [self.source, self.partner, self.swapped, self.direction]

    def sync(self, gallery_index: int) -> None:
        """Partner choices for the gallery item shown, and which controls show for the source."""
        own = len(self.gallery[gallery_index]) > 3 if 0 <= gallery_index < len(self.gallery) else False
        options = ([("its pair's partner", OWN_PARTNER)] if own else []) + [
            (f"{i + 1}: {item[1]}", i) for i, item in enumerate(self.gallery) if i != gallery_index]
        if list(self.partner.options) != options:
            self.partner.options = options or [("(no other image)", None)]
            self.partner.value = options[0][1] if options else None
        self.partner.layout.display = None if self.source.value == "pair" else "none"
        self.swapped.layout.display = None if self.source.value == "swap" else "none"

    def partner_image(self, gallery_index: int) -> Any:
        picked = self.partner.value
        if picked is None:
            raise BlipTraceError("an image pair needs a second image: add one to the gallery, or pass "
                                 "gallery=[(image, question, answer, counterfactual image), ...]")
        return self.gallery[gallery_index][3] if picked == OWN_PARTNER else self.gallery[picked][0]

    def apply(self, config: TraceConfig, gallery_index: int) -> TraceConfig:
        """``config`` with this source's corruption (one sample for a counterfactual) and direction."""
        config = replace(config, direction=self.direction.value)
        if self.source.value == "pair":
            return replace(config, corruption=ImageSwap(self.partner_image(gallery_index)), samples=1)
        if self.source.value == "swap":
            question = self.swapped.value.strip()
            if not question:
                raise BlipTraceError(f"type the counterfactual {self.text}: the {self.text} with a word changed, "
                                     "as many tokens long")
            return replace(config, corruption=WordSwap(question=question), corrupt="question", samples=1)
        return config
