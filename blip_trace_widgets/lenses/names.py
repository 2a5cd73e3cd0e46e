"""Every name, label and default of the lenses, in one place.

    >>> from blip_trace_widgets.lenses.names import LENS_KINDS, LENS_LABELS
    >>> LENS_KINDS, LENS_LABELS["tuned"]
    (('logit', 'tuned'), 'tuned lens')
"""
from __future__ import annotations

from ..core.names import (
    ANSWER_DECODER,
    BLIP2,
    BLIP2_T5,
    CAPTION,
    CAPTION_DECODER,
    INSTRUCTBLIP,
    INSTRUCTBLIP_T5,
    LANGUAGE_MODEL,
    LM_DECODER,
    LM_ENCODER,
    VQA,
)

LOGIT = "logit"
TUNED = "tuned"
#: The lens kinds: the logit lens (each state through the model's own final norm and head) and the tuned lens (each
#: state through a trained affine translator first).
LENS_KINDS: tuple[str, ...] = (LOGIT, TUNED)
LENS_LABELS: dict[str, str] = {LOGIT: "logit lens", TUNED: "tuned lens"}
#: Top tokens kept per cell by default, and the most a result keeps.
DEFAULT_TOP = 5
MAX_TOP = 50
#: Top tokens a selected cell shows in the explorer.
CELL_TOP = 10
#: Blocks that end in a vocabulary, per head; the first is the default.
LENS_BLOCKS: dict[str, tuple[str, ...]] = {
    VQA: (ANSWER_DECODER,),
    CAPTION: (CAPTION_DECODER,),
    BLIP2: (LANGUAGE_MODEL,),
    INSTRUCTBLIP: (LANGUAGE_MODEL,),
    BLIP2_T5: (LM_DECODER,),
    INSTRUCTBLIP_T5: (LM_DECODER,),
}
#: A block with no vocabulary of its own that a user may still ask a lens of, and why it has none.
NO_VOCABULARY: dict[str, str] = {
    LM_ENCODER: ("T5's encoder ends in no vocabulary: its states are read by the decoder's cross-attention, never by "
                 "the LM head, and they live in another basis than the decoder's residual stream (the encoder has its "
                 "own final norm), so no sound lens reads them; lens the decoder instead, block='lm_decoder'"),
}
#: How an image query's position is labelled in a lens: q0, q1, ...
QUERY_LABEL = "q{}"
#: Colour map of p(answer) in the lens grid.
LENS_COLORMAP = "Purples"
#: The translators shipped for the bundled demo models: one file per (demo, block).
TRANSLATOR_FILE = "{model}.{block}.safetensors"
#: Tuned-lens training defaults (Belrose et al. 2023 train with SGD, Nesterov momentum; here Adam suits the small
#: demo models' few hundred states).
TRAIN_STEPS = 300
TRAIN_LR = 1e-3
#: Demo questions that train a tuned lens by default (easy-VQA's train split), and held out to measure it (test).
TRAIN_ITEMS = 256
#: The explorers' toggle between a block's states as the causal map sees them (what restoring each one brings back:
#: "what it carries") and as the lens reads them (what each one already says), on the same positions x layers.
CARRIES = "carries"
SAYS = "says"
SHOWS: tuple[str, ...] = (CARRIES, SAYS)
SHOWS_LABELS: dict[str, str] = {CARRIES: "what it carries", SAYS: "what it says"}
