"""The vocabulary: every block, kind, corruption stage, metric and default, with its label.

    >>> from blip_trace_widgets.core.names import BLOCKS, KIND_LABELS, kinds_of
    >>> BLOCKS  # doctest: +NORMALIZE_WHITESPACE
    ('question_encoder', 'answer_decoder', 'caption_decoder', 'itm_encoder', 'qformer', 'vision_encoder',
     'language_model', 'lm_encoder', 'lm_decoder')
    >>> kinds_of("vision_encoder")
    ('hidden', 'self_attn', 'mlp', 'attn_head')
    >>> KIND_LABELS["post_cross_attn"]
    'residual after cross-attention'

This module is the one home of names, labels and defaults. The command line's choices,
the widgets' options, the plots' labels and the checks in :class:`~.tracing.TraceConfig`
are all derived from the tables here; :mod:`~.anatomy` maps the same names to BLIP's
module paths. It imports nothing from the package.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Block = Literal["question_encoder", "answer_decoder", "caption_decoder", "itm_encoder", "vision_encoder", "qformer",
                "language_model", "lm_encoder", "lm_decoder"]
Head = Literal["vqa", "caption", "itm", "blip2", "instructblip", "blip2-t5", "instructblip-t5"]
Kind = Literal["hidden", "self_attn", "cross_attn", "mlp", "post_self_attn", "post_cross_attn", "self_attn_head",
               "cross_attn_head", "attn_head"]
Stage = Literal["image", "patches", "pixels", "question", "queries", "projected"]
Metric = Literal["prob", "logprob", "logit_diff", "itc"]
SeverAt = Literal["restored", "all"]
Method = Literal["exact", "estimate", "verified"]
Direction = Literal["denoise", "noise"]

HIDDEN: Kind = "hidden"
QUESTION_ENCODER: Block = "question_encoder"
ANSWER_DECODER: Block = "answer_decoder"
VISION_ENCODER: Block = "vision_encoder"
CAPTION_DECODER: Block = "caption_decoder"
ITM_ENCODER: Block = "itm_encoder"
#: BLIP-2's querying transformer (its learned queries cross-attend to the image) and its language model (OPT).
QFORMER: Block = "qformer"
LANGUAGE_MODEL: Block = "language_model"
#: A Flan-T5 language model's two halves: its encoder reads the projected queries and the prompt, its decoder
#: cross-attends to the encoder's output and says the answer.
LM_ENCODER: Block = "lm_encoder"
LM_DECODER: Block = "lm_decoder"
# What each block is (its label, kinds, whether its positions are the image's, its corruption stages) is its row of
# BLOCK_FACTS, below the kinds and stages; TEXT_BLOCKS, BLOCKS, BLOCK_LABELS and the like are read off those rows.

# ----- heads ------------------------------------------------------------------------------
#: BLIP's three heads: visual question answering, captioning, image-text matching.
VQA: Head = "vqa"
CAPTION: Head = "caption"
ITM: Head = "itm"
#: BLIP-2 with an OPT language model: questions answered (or, with no text, captions), as the model card prompts.
BLIP2: Head = "blip2"
#: InstructBLIP with an OPT language model: the question is the instruction, read by the Q-Former and the language
#: model alike, as the InstructBLIP model cards prompt.
INSTRUCTBLIP: Head = "instructblip"
#: The same with a Flan-T5 language model (an encoder and a decoder).
BLIP2_T5: Head = "blip2-t5"
INSTRUCTBLIP_T5: Head = "instructblip-t5"
HEADS: tuple[Head, ...] = (VQA, CAPTION, ITM, BLIP2, INSTRUCTBLIP, BLIP2_T5, INSTRUCTBLIP_T5)


#: Hub checkpoints of each head, and the bundled demo models (``load_model("demo-caption")``).
HUB_MODELS: dict[str, str] = {VQA: "Salesforce/blip-vqa-base", CAPTION: "Salesforce/blip-image-captioning-base",
                              ITM: "Salesforce/blip-itm-base-coco", BLIP2: "Salesforce/blip2-opt-2.7b",
                              BLIP2_T5: "Salesforce/blip2-flan-t5-xl", INSTRUCTBLIP_T5: "Salesforce/instructblip-flan-t5-xl"}
DEMO_MODELS: dict[str, str] = {"demo": VQA, "demo-caption": CAPTION, "demo-itm": ITM, "demo-blip2": BLIP2,
                                "demo-instructblip": INSTRUCTBLIP}

#: Kinds of the text transformers (post-LN BERT layers: h1 = LN(h + SA(h)), h2 = LN(h1 + XA(h1)),
#: h3 = LN(h2 + MLP(h2))). ``self_attn``, ``cross_attn`` and ``mlp`` are each sublayer's own output
#: before its residual add; ``post_self_attn`` and ``post_cross_attn`` are h1 and h2, the residual
#: stream after those sublayers (what the outputs of BLIP's ``.attention`` and ``.crossattention``
#: modules are, and what the paper's attention notebook restores); ``hidden`` is h3.
TEXT_KINDS: tuple[Kind, ...] = ("hidden", "self_attn", "cross_attn", "mlp", "post_self_attn", "post_cross_attn")
#: The kinds that compare like ROME's figure 1 (state, MLP, attention), shown side by side.
SUBLAYER_KINDS: tuple[Kind, ...] = ("hidden", "mlp", "self_attn", "cross_attn")
VISION_KINDS: tuple[Kind, ...] = ("hidden", "self_attn", "mlp")
#: Kinds of a pre-LN causal language model (OPT: h1 = h + SA(LN1(h)), h2 = h1 + MLP(LN2(h1))): as the ViT's; T5's
#: encoder has the same, its decoder cross-attention too (h2 = h1 + XA(LN(h1)), before the MLP).
DECODER_KINDS: tuple[Kind, ...] = ("hidden", "self_attn", "mlp")
T5_DECODER_KINDS: tuple[Kind, ...] = ("hidden", "self_attn", "cross_attn", "mlp")
#: Attention heads as cells: restoring head h sets its slice (dims h·d_head to (h+1)·d_head) of the attention
#: context, the input of the output projection (``attention.output.dense``, ``crossattention.output.dense``, the
#: ViT's ``self_attn.projection``): TransformerLens's ``z``. A head map's rows are heads, its columns layers.
TEXT_HEAD_KINDS: tuple[Kind, ...] = ("self_attn_head", "cross_attn_head")
VISION_HEAD_KINDS: tuple[Kind, ...] = ("attn_head",)
HEAD_KINDS: tuple[Kind, ...] = (*TEXT_HEAD_KINDS, *VISION_HEAD_KINDS)
#: The sublayer kind whose output a head kind's heads make, all heads together.
HEAD_SUBLAYER: dict[str, Kind] = {"self_attn_head": "self_attn", "cross_attn_head": "cross_attn",
                                  "attn_head": "self_attn"}
KINDS: tuple[Kind, ...] = (*TEXT_KINDS, *HEAD_KINDS)
#: Sublayers that severing can hold at their corrupted values.
SEVERABLE: tuple[Kind, ...] = ("self_attn", "cross_attn", "mlp")


@dataclass(frozen=True)
class KindInfo:
    """How a kind is named in figures and controls."""

    label: str  # in titles: "Restoring question encoder <label>"
    short: str  # in dropdowns
    colormap: str  # its heatmaps' colour map (ROME's: Purples for states, Greens for MLP, Reds for attention; never
    # blue, which every figure keeps for effects against the trace's direction: AGAINST_COLORMAP)


KIND_INFO: dict[str, KindInfo] = {
    "hidden": KindInfo("hidden states", "hidden states", "Purples"),
    "self_attn": KindInfo("self-attention outputs", "self-attention", "Reds"),
    "cross_attn": KindInfo("cross-attention outputs", "cross-attention", "YlOrBr"),
    "mlp": KindInfo("MLP outputs", "MLP", "Greens"),
    "post_self_attn": KindInfo("residual after self-attention", "h1 (after self-attention)", "Oranges"),
    "post_cross_attn": KindInfo("residual after cross-attention", "h2 (after cross-attention)", "RdPu"),
    "self_attn_head": KindInfo("self-attention heads", "self-attention heads", "Reds"),
    "cross_attn_head": KindInfo("cross-attention heads", "cross-attention heads", "YlOrBr"),
    "attn_head": KindInfo("attention heads", "attention heads", "Reds"),
}
KIND_LABELS: dict[str, str] = {kind: info.label for kind, info in KIND_INFO.items()}
KIND_SHORT_LABELS: dict[str, str] = {kind: info.short for kind, info in KIND_INFO.items()}
KIND_COLORMAPS: dict[str, str] = {kind: info.colormap for kind, info in KIND_INFO.items()}
#: One colour language across every figure: effects against the trace's direction (a restored cell that moves the
#: score away from the clean one) are blue, and no kind draws its effects in blue.
AGAINST_COLORMAP = "Blues"

#: Where a corruption acts: the vision encoder's output (the paper's choice), the patch embeddings
#: before the vision encoder, the pixels, or the question's token embeddings (ROME's original).
STAGES: tuple[Stage, ...] = ("image", "patches", "pixels", "question", "queries", "projected")
#: The stages after the Q-Former: its output queries, and the same projected to the language model's width.
QUERY_STAGES: tuple[Stage, ...] = ("queries", "projected")
STAGE_LABELS: dict[str, str] = {
    "image": "image embeddings (vision encoder output)",
    "patches": "patch embeddings",
    "pixels": "pixels",
    "question": "question tokens",
    "queries": "Q-Former output queries (what BLIP-2's language model reads, before its projection)",
    "projected": "projected queries (the language model's image tokens)",
}


# ----- blocks -----------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockFacts:
    """What a block is: the package asks these questions of a block (``facts(name).image_side``, or of a traced
    block itself, ``block.image_side``), never by comparing its name."""

    name: Block
    label: str  # in titles and dropdowns
    kinds: tuple[Kind, ...]  # what a trace restores in it: its position kinds, then its head kinds
    #: Its positions are the image's (CLS and the patches), not tokens: a map of it paints on the image, regions
    #: group them, a trace of it starts from the patch embeddings and reaches the score through the reader's text
    #: layers, and the explorer of text blocks leaves it to the vision explorer.
    image_side: bool = False
    #: A pre-LN language model after the Q-Former (OPT's decoder, T5's encoder and decoder).
    language_model: bool = False
    causal: bool = False  # its self-attention is causal (each position sees only those before it)
    text_cross: bool = False  # its cross-attention reads text (its encoder's output), not the image
    #: The stage its traces corrupt unless told, and the stages whose corruption restoring it can undo (an
    #: image-side block's: only those before it; a head narrows a text block's, as BLIP-2 its query stages).
    default_stage: Stage = "image"
    stages: tuple[Stage, ...] = STAGES

    @property
    def text(self) -> bool:
        """Whether it is one of BLIP's post-LN BERT text transformers (the Q-Former is one too)."""
        return not (self.image_side or self.language_model)


_TEXT_BLOCK_KINDS: tuple[Kind, ...] = (*TEXT_KINDS, *TEXT_HEAD_KINDS)
_LANGUAGE_KINDS: tuple[Kind, ...] = (*DECODER_KINDS, "self_attn_head")
#: Every block's facts, one row each (in the order of :data:`BLOCK_LABELS`).
BLOCK_FACTS: dict[str, BlockFacts] = {row.name: row for row in (
    BlockFacts(QUESTION_ENCODER, "question encoder", _TEXT_BLOCK_KINDS),
    BlockFacts(ANSWER_DECODER, "answer decoder", _TEXT_BLOCK_KINDS, causal=True, text_cross=True),
    BlockFacts(CAPTION_DECODER, "caption decoder", _TEXT_BLOCK_KINDS, causal=True),
    BlockFacts(ITM_ENCODER, "ITM encoder", _TEXT_BLOCK_KINDS),
    BlockFacts(VISION_ENCODER, "vision encoder", (*VISION_KINDS, *VISION_HEAD_KINDS), image_side=True,
               default_stage="patches", stages=("patches", "pixels")),
    BlockFacts(QFORMER, "Q-Former", _TEXT_BLOCK_KINDS),
    BlockFacts(LANGUAGE_MODEL, "language model", _LANGUAGE_KINDS, language_model=True, causal=True),
    BlockFacts(LM_ENCODER, "language model's encoder", _LANGUAGE_KINDS, language_model=True),
    BlockFacts(LM_DECODER, "language model's decoder", (*T5_DECODER_KINDS, *TEXT_HEAD_KINDS), language_model=True,
               causal=True, text_cross=True),
)}
#: BLIP's post-LN BERT text transformers, and BLIP-2's Q-Former, which is one too.
TEXT_BLOCKS: tuple[Block, ...] = tuple(row.name for row in BLOCK_FACTS.values() if row.text)
#: The blocks whose positions are the image's: the vision encoder.
IMAGE_BLOCKS: tuple[Block, ...] = tuple(row.name for row in BLOCK_FACTS.values() if row.image_side)
#: Pre-LN language models: OPT's decoder, T5's encoder and decoder.
LANGUAGE_BLOCKS: tuple[Block, ...] = tuple(row.name for row in BLOCK_FACTS.values() if row.language_model)
BLOCKS: tuple[Block, ...] = (*TEXT_BLOCKS, *IMAGE_BLOCKS, *LANGUAGE_BLOCKS)
BLOCK_LABELS: dict[str, str] = {name: row.label for name, row in BLOCK_FACTS.items()}
#: Decoders whose cross-attention reads text (their encoder's output), not the image.
TEXT_CROSS_BLOCKS: tuple[Block, ...] = tuple(row.name for row in BLOCK_FACTS.values() if row.text_cross)
#: Text blocks whose self-attention is causal (each position sees only those before it).
CAUSAL_BLOCKS: tuple[Block, ...] = tuple(row.name for row in BLOCK_FACTS.values() if row.causal)


def facts(block: str) -> BlockFacts:
    """``block``'s row of :data:`BLOCK_FACTS`. A name that is no block's is a KeyError, a bug: a user's block is
    checked first (``TraceConfig``, ``anatomy.check_block``: a BlipTraceError that names the blocks).

        >>> facts("vision_encoder").image_side, facts("vision_encoder").default_stage, facts("qformer").image_side
        (True, 'patches', False)
    """
    return BLOCK_FACTS[block]


METRICS: tuple[Metric, ...] = ("prob", "logprob", "logit_diff", "itc")
METRIC_LABELS: dict[str, str] = {
    "prob": "p(answer)",
    "logprob": "log p(answer)",
    "logit_diff": "logit(answer) − logit(contrast)",
    "itc": "ITC cosine similarity",
    "effect": "indirect effect (score − low)",
    "normalized": "normalised indirect effect",
}

SEVER_AT: tuple[SeverAt, ...] = ("restored", "all")
SEVER_AT_LABELS: dict[str, str] = {
    "restored": "at the restored positions (ROME's)",
    "all": "at every position",
}

#: Cells a verified estimate computes exactly: the estimate's top ones. On the demo model the one-step estimate puts
#: the exact 30-sample map's top significant cell among its top 5 in 72% of hidden-state maps and among its top 10 in
#: 92% (25 easy-VQA maps), so 10 are verified.
DEFAULT_VERIFY = 10
METHODS: tuple[Method, ...] = ("exact", "estimate", "verified")
METHOD_LABELS: dict[str, str] = {
    "exact": "exact (one patched run per cell)",
    "estimate": "estimate (attribution patching)",
    "verified": (f"estimate, then the exact value of the top cells by the clean run's estimate (verify=k, default "
                 f"{DEFAULT_VERIFY})"),
}
#: Which way a cell is patched: clean states into the corrupted run (denoising: what is sufficient, ROME's), or
#: corrupted states into the clean run (noising: what is necessary).
DIRECTIONS: tuple[Direction, ...] = ("denoise", "noise")
DIRECTION_LABELS: dict[str, str] = {
    "denoise": "restoring clean states into the corrupted run (what suffices)",
    "noise": "patching corrupted states into the clean run (what is necessary)",
}
#: An order=2 estimate flags a cell whose second-order term exceeds this fraction of the map's total effect
#: (or of the metric's floor, when that is larger): its first-order value is not to be trusted.
RELIABILITY_TOLERANCE = 0.1
#: What an explorer shows when a control moves: the estimate at once, then the exact map; or one of them.
EXPLORER_MODES: dict[str, str] = {
    "verified": "estimate, top cells exact",
    "flagged": "estimate, top and flagged cells exact",
    "both": "estimate, then exact",
    "estimate": "estimate only",
    "exact": "exact only",
}
#: Integration steps an estimate may take: each beyond the first costs about three exact traces.
MAX_STEPS = 64

DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
ANSWER_MODES: tuple[str, ...] = ("model", "expected")

# ----- defaults ---------------------------------------------------------------------------
#: Gaussian noise in σ of what is corrupted: ROME's 3σ.
ROME_NOISE_SCALE = 3.0
#: The paper's multiplicative noise: each value times N(1, 5²).
PAPER_NOISE_STD = 5.0
DEFAULT_SAMPLES = 10
#: Below this total effect, as a fraction of the clean score, a heatmap is mostly noise.
TINY_EFFECT = 0.1
#: Below this total effect, in the metric's own units, a heatmap is noise whatever the clean score: a model
#: that would not say the scored text (p(answer) of 1e-4) moves it by float noise. Colour scales never span
#: less than this either, so that float noise is never drawn in full colour.
TINY_ABSOLUTE: dict[str, float] = {"prob": 0.01, "logprob": 0.05, "logit_diff": 0.1, "itc": 0.01}
#: A cell is drawn as a negative effect when it falls below the corrupted score by more than this many
#: standard errors over the noise samples, and by more than this fraction of the metric's floor.
NEGATIVE_STDERRS = 2.0
MAX_ANSWER_TOKENS = 10
#: Longest caption the clean pass generates (tokens after the prompt), as ``generate(max_new_tokens=20)``.
MAX_CAPTION_TOKENS = 20
#: BLIP-2's VQA prompt for OPT, as the BLIP-2 model card prompts ("Question: {} Answer:").
BLIP2_PROMPT = "Question: {} Answer:"
#: BLIP's captioning prompt: BLIP's captioners were fine-tuned with it (``prompt: "a picture of "`` in LAVIS's
#: ``blip_caption_base_coco.yaml``). Pass it as the text of a captioning trace; the demo captioner takes none.
CAPTION_PROMPT = "a picture of"


# ----- attention knockout -------------------------------------------------------------------
Attention = Literal["cross", "self"]
#: The attentions a knockout cuts: a text block's cross-attention (to the image, or the answer decoder's to the
#: question) and its self-attention.
ATTENTIONS: tuple[Attention, ...] = ("cross", "self")
ATTENTION_LABELS: dict[str, str] = {"cross": "cross-attention", "self": "self-attention"}
#: Layers a knockout cuts around each layer: Zhang et al.'s script (``current_window=9``) cuts 9 layers of
#: LLaVA-1.5 (32 layers in the 7B model, 40 in the 13B: 28% and 23%); 3 of BLIP's 12 text layers is 25%.
KNOCKOUT_WINDOW = 3
#: The image's first token, the ViT's [CLS], as a knockout's keys.
IMAGE_CLS = "cls"
#: In BLIP-2's language model, the image is its first positions (the projected queries): keys "image" cut them.
IMAGE_QUERIES = "image"
#: The blocks whose attention a knockout cuts: BLIP's text blocks and the Q-Former, and BLIP-2's language model.
KNOCKOUT_BLOCKS: tuple[Block, ...] = (*TEXT_BLOCKS, *LANGUAGE_BLOCKS)
#: ``sweep --pairs question``: a question set's images paired where the same question has different answers, looking
#: at this many questions per pair wanted (``--limit``).
QUESTION_PAIRS = "question"
QUESTIONS_PER_PAIR = 20
#: A knockout's queries "each": one edge group per token (the token x layer map).
EACH_TOKEN = "each"
#: Below this relative change of p (and :data:`TINY_ABSOLUTE`'s 0.01 in p), a knockout line is drawn as no effect.
TINY_CHANGE = 0.01

def window_for(kind: str, window: int) -> int:
    """The window a control's value means for ``kind``: hidden states are restored one layer at a time
    (as in ROME's figures); sublayer kinds take the window."""
    return 1 if kind == HIDDEN else int(window)


def kinds_of(block: str) -> tuple[Kind, ...]:
    """The kinds that ``block`` offers: its position kinds, then its head kinds (a name that is no block's: a text
    block's)."""
    row = BLOCK_FACTS.get(block)
    return row.kinds if row is not None else _TEXT_BLOCK_KINDS


def is_head_kind(kind: str) -> bool:
    """Whether ``kind``'s cells are attention heads (rows: heads) rather than positions."""
    return kind in HEAD_KINDS
