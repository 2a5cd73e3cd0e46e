"""Where BLIP keeps things: the one table from (block, kind) to module names.

    >>> from blip_trace_widgets.models.anatomy import module_name
    >>> module_name("question_encoder", "mlp", 3)
    'text_encoder.encoder.layer.3.output.dense'

No other module of this package spells a BLIP module path. The engine asks this
module for the pieces it computes with; hooks and tests ask it for names.

Why these modules for the kinds: BLIP's text transformer is a post-LayerNorm BERT,
so a layer computes ``h1 = LN(h + SA(h))``, ``h2 = LN(h1 + XA(h1))`` and
``h3 = LN(h2 + MLP(h2))``.  The output of each sublayer's final ``dense`` is that
sublayer's own contribution, before the residual add and the LayerNorm mix it with
everything earlier.  That is what ROME restores for "attention" and "MLP" in a
pre-LN GPT, where a sublayer's output is added to the residual stream directly;
restoring ``h1`` or ``h2`` instead would also restore the residual stream and
blur the kinds into ``hidden``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..core.errors import BlipTraceError
from ..core.names import (
    ANSWER_DECODER,
    BLOCK_LABELS,
    BLOCKS,
    CAPTION_DECODER,
    ITM_ENCODER,
    KINDS,
    LANGUAGE_MODEL,
    LM_DECODER,
    LM_ENCODER,
    QFORMER,
    QUESTION_ENCODER,
    TEXT_BLOCKS,
    VISION_ENCODER,
    Block,
    Kind,
    kinds_of,
)
from .heads import BLOCKS_OF, head_of_model
from .heads import of as head_named

#: Layer stack of each block; ``{layer}`` is the layer index.
LAYERS: dict[str, str] = {
    QUESTION_ENCODER: "text_encoder.encoder.layer",
    ANSWER_DECODER: "text_decoder.bert.encoder.layer",
    CAPTION_DECODER: "text_decoder.bert.encoder.layer",  # BlipForConditionalGeneration's decoder
    ITM_ENCODER: "text_encoder.encoder.layer",  # BlipForImageTextRetrieval's text encoder
    VISION_ENCODER: "vision_model.encoder.layers",  # BLIP's ViT, and BLIP-2's (the same module names)
    QFORMER: "qformer.encoder.layer",  # Blip2ForConditionalGeneration's querying transformer
    LANGUAGE_MODEL: "language_model.model.decoder.layers",  # BLIP-2's OPT decoder
    LM_ENCODER: "language_model.encoder.block",  # a Flan-T5 language model's encoder
    LM_DECODER: "language_model.decoder.block",  # and its decoder
}

#: Where a text layer's sublayers are, per kind; the Q-Former's queries run their own feed-forward
#: (``intermediate_query``/``output_query``: the module that really runs at a query position).
TEXT_SUFFIXES: dict[str, str] = {
    "hidden": "",
    "self_attn": ".attention.output.dense",
    "cross_attn": ".crossattention.output.dense",
    "mlp": ".output.dense",
    "post_self_attn": ".attention",  # h1 = LN(h + SA(h)): the output of BLIP's attention module
    "post_cross_attn": ".crossattention",  # h2 = LN(h1 + XA(h1))
}
BLOCK_SUFFIXES: dict[str, dict[str, str]] = {
    **{block: TEXT_SUFFIXES for block in TEXT_BLOCKS},
    QFORMER: {**TEXT_SUFFIXES, "mlp": ".output_query.dense"},
    # The ViT is pre-LN: h1 = h + SA(LN1(h)), h2 = h1 + MLP(LN2(h1)); .self_attn and .mlp
    # output exactly what each sublayer adds to the residual stream.
    VISION_ENCODER: {"hidden": "", "self_attn": ".self_attn", "mlp": ".mlp"},
    # OPT is pre-LN too: out_proj and fc2 output what each sublayer adds to the residual stream.
    LANGUAGE_MODEL: {"hidden": "", "self_attn": ".self_attn.out_proj", "mlp": ".fc2"},
    # T5 is pre-LN (RMSNorm): the attention's ``o`` and the feed-forward's DenseReluDense output what each adds.
    LM_ENCODER: {"hidden": "", "self_attn": ".layer.0.SelfAttention.o", "mlp": ".layer.1.DenseReluDense"},
    LM_DECODER: {"hidden": "", "self_attn": ".layer.0.SelfAttention.o", "cross_attn": ".layer.1.EncDecAttention.o",
                 "mlp": ".layer.2.DenseReluDense"},
}

#: The table: (block, kind) -> module whose output is restored.
MODULES: dict[tuple[str, str], str] = {
    (block, kind): LAYERS[block] + ".{layer}" + suffix
    for block, suffixes in BLOCK_SUFFIXES.items()
    for kind, suffix in suffixes.items()
}

EMBEDDINGS: dict[str, str] = {
    QUESTION_ENCODER: "text_encoder.embeddings",
    ANSWER_DECODER: "text_decoder.bert.embeddings",
    CAPTION_DECODER: "text_decoder.bert.embeddings",
    ITM_ENCODER: "text_encoder.embeddings",
}
VISION_MODULE = "vision_model"  # the vision encoder module (BLIP's and BLIP-2's)
VISION_EMBEDDINGS = "vision_model.embeddings"  # patch embeddings + CLS + positions: [B, 1 + g*g, D]
VISION_POST_NORM = "vision_model.post_layernorm"
ANSWER_HEAD = "text_decoder.cls.predictions"  # the language-model head of the VQA and caption decoders
ITM_HEAD = "itm_head"  # Linear(D, 2) on the ITM encoder's first state: (no match, match)
TEXT_ENCODER = "text_encoder"  # the ITM model's text encoder, run without the image for ITC
QUERY_TOKENS = "query_tokens"  # BLIP-2's learned queries [1, Q, D]
#: The LayerNorm the Q-Former's input passes before its first layer, per architecture (its ``model_type``): BLIP-2's
#: queries; InstructBLIP's queries and instruction, embedded together.
QFORMER_NORMS: dict[str, str] = {"blip-2": "qformer.layernorm", "instructblip": "qformer.embeddings.layernorm"}
#: InstructBLIP's instruction embeddings in the Q-Former: (tokens, learned positions), added before the LayerNorm.
INSTRUCTION_EMBEDDINGS = ("qformer.embeddings.word_embeddings", "qformer.embeddings.position_embeddings")
LANGUAGE_PROJECTION = "language_projection"  # Q-Former output -> the language model's width
VISION_PROJECTION = "vision_proj"
TEXT_PROJECTION = "text_proj"

#: Pieces of one text layer, relative to the layer, that the engine computes with.
TEXT_LAYER_PARTS: dict[str, str] = {
    "self_query": "attention.self.query",
    "self_key": "attention.self.key",
    "self_value": "attention.self.value",
    "self_out": "attention.output.dense",
    "self_norm": "attention.output.LayerNorm",
    "cross_query": "crossattention.self.query",
    "cross_key": "crossattention.self.key",
    "cross_value": "crossattention.self.value",
    "cross_out": "crossattention.output.dense",
    "cross_norm": "crossattention.output.LayerNorm",
    "mlp_in": "intermediate.dense",
    "mlp_act": "intermediate.intermediate_act_fn",
    "mlp_out": "output.dense",
    "mlp_norm": "output.LayerNorm",
}
#: The Q-Former's layer: as BLIP's, but the queries' feed-forward, and cross-attention only every
#: ``cross_attention_frequency`` layers (the cross parts are None where a layer has none).
QFORMER_LAYER_PARTS: dict[str, str] = {
    **{role: path.replace(".self.", ".attention.") for role, path in TEXT_LAYER_PARTS.items()},
    "mlp_in": "intermediate_query.dense",
    "mlp_act": "intermediate_query.intermediate_act_fn",
    "mlp_out": "output_query.dense",
    "mlp_norm": "output_query.LayerNorm",
    # InstructBLIP's instruction tokens run the layer's other feed-forward (present, unused, in BLIP-2's layers)
    "text_mlp_in": "intermediate.dense",
    "text_mlp_act": "intermediate.intermediate_act_fn",
    "text_mlp_out": "output.dense",
    "text_mlp_norm": "output.LayerNorm",
}
TEXT_MLP_PARTS = ("text_mlp_in", "text_mlp_act", "text_mlp_out", "text_mlp_norm")
CROSS_PARTS = ("cross_query", "cross_key", "cross_value", "cross_out", "cross_norm")

#: Pieces of one OPT decoder layer (pre-LN, causal), relative to the layer.
DECODER_LAYER_PARTS: dict[str, str] = {
    "norm1": "self_attn_layer_norm",
    "query": "self_attn.q_proj",
    "key": "self_attn.k_proj",
    "value": "self_attn.v_proj",
    "attn_out": "self_attn.out_proj",
    "norm2": "final_layer_norm",
    "fc1": "fc1",
    "act": "activation_fn",
    "fc2": "fc2",
}
#: Pieces of one LLaMA (Vicuna) decoder layer (pre-RMSNorm, causal, rotary positions, gated MLP), relative to it.
LLAMA_LAYER_PARTS: dict[str, str] = {
    "norm1": "input_layernorm",
    "query": "self_attn.q_proj",
    "key": "self_attn.k_proj",
    "value": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "norm2": "post_attention_layernorm",
    "mlp": "mlp",
}


@dataclass(frozen=True)
class LanguageModelRow:
    """Where one family of decoder-only language models keeps things, inside BLIP-2 or InstructBLIP."""

    layers: str
    parts: dict[str, str]  # each layer's pieces, relative to it
    suffixes: dict[str, str]  # per kind, the module restored, relative to a layer
    tokens: str
    final_norm: str
    positions: str | None = None  # learned positions (OPT's); None: rotary (LLaMA's), at ``rotary``
    rotary: str | None = None
    head: str = "language_model.lm_head"


#: Where transformers 4.x keeps LLaMA's rotary embedding, relative to a layer (5.x keeps one at ``rotary``).
LEGACY_ROTARY = "self_attn.rotary_emb"
#: One row per decoder-only language model, by its configuration's ``model_type``.
LANGUAGE_MODELS: dict[str, LanguageModelRow] = {
    "opt": LanguageModelRow("language_model.model.decoder.layers", DECODER_LAYER_PARTS,
                            {"hidden": "", "self_attn": ".self_attn.out_proj", "mlp": ".fc2"},
                            "language_model.model.decoder.embed_tokens", "language_model.model.decoder.final_layer_norm",
                            positions="language_model.model.decoder.embed_positions"),
    "llama": LanguageModelRow("language_model.model.layers", LLAMA_LAYER_PARTS,
                              {"hidden": "", "self_attn": ".self_attn.o_proj", "mlp": ".mlp"},
                              "language_model.model.embed_tokens", "language_model.model.norm",
                              rotary="language_model.model.rotary_emb"),
}

#: Pieces of one T5 layer (pre-RMSNorm; unscaled attention with a relative position bias), relative to the layer:
#: the encoder's, and the decoder's, whose cross-attention sits between its self-attention and feed-forward.
T5_LAYER_PARTS: dict[str, dict[str, str]] = {
    LM_ENCODER: {"norm1": "layer.0.layer_norm", "query": "layer.0.SelfAttention.q", "key": "layer.0.SelfAttention.k",
                 "value": "layer.0.SelfAttention.v", "attn_out": "layer.0.SelfAttention.o",
                 "norm2": "layer.1.layer_norm", "mlp": "layer.1.DenseReluDense"},
    LM_DECODER: {"norm1": "layer.0.layer_norm", "query": "layer.0.SelfAttention.q", "key": "layer.0.SelfAttention.k",
                 "value": "layer.0.SelfAttention.v", "attn_out": "layer.0.SelfAttention.o",
                 "cross_norm": "layer.1.layer_norm", "cross_query": "layer.1.EncDecAttention.q",
                 "cross_key": "layer.1.EncDecAttention.k", "cross_value": "layer.1.EncDecAttention.v",
                 "cross_out": "layer.1.EncDecAttention.o", "norm2": "layer.2.layer_norm", "mlp": "layer.2.DenseReluDense"},
}
#: Around a T5 language model's layers: the token embeddings, each half's final norm (and the decoder's head).
T5_PARTS: dict[str, str] = {
    "tokens": "language_model.shared",
    "encoder_norm": "language_model.encoder.final_layer_norm",
    "decoder_norm": "language_model.decoder.final_layer_norm",
    "head": "language_model.lm_head",
}
#: The attention whose relative position bias every layer of a T5 half shares: its first layer's self-attention.
T5_POSITION_BIAS = ".0.layer.0.SelfAttention"


#: Pieces of one vision layer, relative to the layer.
VISION_LAYER_PARTS: dict[str, str] = {
    "norm1": "layer_norm1",
    "qkv": "self_attn.qkv",
    "attn_out": "self_attn.projection",
    "norm2": "layer_norm2",
    "fc1": "mlp.fc1",
    "act": "mlp.activation_fn",
    "fc2": "mlp.fc2",
}


def check_block(block: str) -> Block:
    if block not in BLOCKS:
        raise BlipTraceError(f"unknown block {block!r}: use one of {', '.join(BLOCKS)}")
    return cast(Block, block)


def check_kind(kind: str, block: str | None = None) -> Kind:
    if kind not in KINDS:
        raise BlipTraceError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    if block is not None and kind not in kinds_of(block):
        raise BlipTraceError(f"the {BLOCK_LABELS.get(block, block)} has no {kind!r}: use one of {', '.join(kinds_of(block))}")
    return cast(Kind, kind)


def module_name(block: str, kind: str, layer: int) -> str:
    """Full name of the module whose output ``kind`` restores at ``layer`` of ``block``."""
    return MODULES[(check_block(block), check_kind(kind, block))].format(layer=layer)


def get_module(model: nn.Module, name: str) -> Any:
    """The submodule called ``name`` (dotted path), or a ValueError naming what is missing."""
    module: object = model
    for part in name.split("."):
        if not hasattr(module, part):
            raise BlipTraceError(
                f"this model has no module {name!r}: blip_trace_widgets needs a transformers "
                "BlipForQuestionAnswering, BlipForConditionalGeneration, BlipForImageTextRetrieval or "
                "Blip2ForConditionalGeneration or InstructBlipForConditionalGeneration (with an OPT, LLaMA or T5 language "
                "model)"
            )
        module = getattr(module, part)
    return module


def head_of(model: object) -> str:
    """Which BLIP head ``model`` is: "vqa", "caption" or "itm"; a clear error for anything else."""
    return head_of_model(model).name


def check_blip(model: object) -> None:
    """Raise a clear ValueError unless ``model`` is BLIP for VQA, captioning or image-text matching."""
    head_of(model)


def check_head_block(head: str, block: str) -> str:
    """``block`` if the ``head``'s model has it, else a clear error naming the blocks it has."""
    if check_block(block) not in BLOCKS_OF[head]:
        raise BlipTraceError(f"{head_named(head).a_model} has no {BLOCK_LABELS.get(block, block)}: use one of "
                             f"{', '.join(BLOCKS_OF[head])}")
    return block


def num_layers(model: nn.Module, block: str) -> int:
    if check_block(block) == LANGUAGE_MODEL:
        return len(get_module(model, language_model_row(model).layers))
    return len(get_module(model, LAYERS[block]))


@dataclass(frozen=True)
class TextLayer:
    """The modules of one BLIP text layer that a forward pass needs."""

    self_query: nn.Linear
    self_key: nn.Linear
    self_value: nn.Linear
    self_out: nn.Linear
    self_norm: nn.LayerNorm
    cross_query: nn.Linear | None  # None: a Q-Former layer without cross-attention
    cross_key: nn.Linear | None
    cross_value: nn.Linear | None
    cross_out: nn.Linear | None
    cross_norm: nn.LayerNorm | None
    mlp_in: nn.Linear
    mlp_act: nn.Module
    mlp_out: nn.Linear
    mlp_norm: nn.LayerNorm
    # a Q-Former's feed-forward for instruction tokens (InstructBLIP); None elsewhere
    text_mlp_in: nn.Linear | None = None
    text_mlp_act: nn.Module | None = None
    text_mlp_out: nn.Linear | None = None
    text_mlp_norm: nn.LayerNorm | None = None


def text_layers(model: nn.Module, block: str) -> list[TextLayer]:
    """Every layer of ``block`` as a :class:`TextLayer` (a Q-Former layer without cross-attention has None there)."""
    if check_block(block) not in TEXT_BLOCKS:
        raise BlipTraceError(f"{block} is not a text block: use one of {', '.join(TEXT_BLOCKS)}")
    parts = QFORMER_LAYER_PARTS if block == QFORMER else TEXT_LAYER_PARTS
    layers = []
    for layer in get_module(model, LAYERS[block]):
        absent = block == QFORMER and not getattr(layer, "has_cross_attention", True)
        text = block == QFORMER and hasattr(layer, "intermediate")  # BLIP-2's layers may lack it
        modules: dict[str, Any] = {role: None if (absent and role in CROSS_PARTS) or (role in TEXT_MLP_PARTS and not text)
                                   else get_module(layer, path) for role, path in parts.items()}
        layers.append(TextLayer(**modules))
    return layers


@dataclass(frozen=True)
class DecoderLayer:
    """The modules of one OPT decoder layer (pre-LN, causal) that a forward pass needs."""

    norm1: nn.LayerNorm
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attn_out: nn.Linear
    norm2: nn.LayerNorm
    fc1: nn.Linear
    act: nn.Module
    fc2: nn.Linear


def language_model_row(model: nn.Module) -> LanguageModelRow:
    """The row of ``model``'s decoder-only language model; a clear error for one this package cannot run."""
    config = text_config(model)
    kind = str(getattr(config, "model_type", "?"))
    if kind not in LANGUAGE_MODELS:
        raise BlipTraceError(f"BLIP-2 or InstructBLIP with a {kind} language model is not supported: use an OPT, "
                             "LLaMA (Vicuna) or T5 one, such as Salesforce/blip2-opt-2.7b")
    if kind == "opt" and (not config.do_layer_norm_before or int(config.word_embed_proj_dim) != int(config.hidden_size)):
        raise BlipTraceError("this OPT language model is post-LN or projects its embeddings (as OPT-350m does); "
                             "only pre-LN OPT (125m, 1.3b, 2.7b, 6.7b and up) is supported")
    return LANGUAGE_MODELS[kind]


def decoder_layers(model: nn.Module) -> list[Any]:
    """Every layer of BLIP-2's decoder-only language model (OPT's :class:`DecoderLayer`, LLaMA's
    :class:`PreNormLayer`); a clear error for a language model this package cannot run."""
    row = language_model_row(model)
    layer_class = DecoderLayer if row.positions is not None else PreNormLayer
    return [layer_class(**{role: get_module(layer, path) for role, path in row.parts.items()})
            for layer in get_module(model, row.layers)]


@dataclass(frozen=True)
class PreNormLayer:
    """The modules of one pre-norm layer whose MLP the engine calls whole (LLaMA's gated MLP; T5's DenseReluDense,
    gated or not, as the checkpoint has it)."""

    norm1: nn.Module
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attn_out: nn.Linear
    norm2: nn.Module
    mlp: nn.Module


@dataclass(frozen=True)
class T5Layer(PreNormLayer):
    """The modules of one T5 layer that a forward pass needs: a pre-norm layer, and in the decoder the
    cross-attention's (None in the encoder)."""

    cross_norm: nn.Module | None = None
    cross_query: nn.Linear | None = None
    cross_key: nn.Linear | None = None
    cross_value: nn.Linear | None = None
    cross_out: nn.Linear | None = None


def t5_layers(model: nn.Module, block: str) -> list[T5Layer]:
    """Every layer of a T5 language model's encoder or decoder; a clear error for another language model."""
    config = text_config(model)
    if getattr(config, "model_type", None) != "t5":
        raise BlipTraceError(f"the {BLOCK_LABELS.get(block, block)} is a T5 language model's; this model's is "
                             f"{getattr(config, 'model_type', '?')}: trace block='language_model'")
    parts = T5_LAYER_PARTS[block]
    layers = [T5Layer(**{role: get_module(layer, path) for role, path in parts.items()})
              for layer in get_module(model, LAYERS[block])]
    if layers and layers[0].query.weight.dtype == torch.float16:
        raise BlipTraceError("a T5 language model in float16: T5's activations can pass float16's range (transformers "
                             "keeps its wo in float32 and clamps infinities; this package's engine does neither): "
                             "load it with dtype='bfloat16' or 'float32'")
    return layers


def t5_position_bias(model: nn.Module, block: str) -> Any:
    """The attention of a T5 half that holds its relative position bias (``compute_bias``)."""
    return get_module(model, LAYERS[block] + T5_POSITION_BIAS)


def t5_parts(model: nn.Module) -> dict[str, Any]:
    """A T5 language model around its layers, with BLIP-2's query projection."""
    return {"projection": get_module(model, LANGUAGE_PROJECTION),
            **{role: get_module(model, name) for role, name in T5_PARTS.items()}}


@dataclass(frozen=True)
class VisionLayer:
    """The modules of one BLIP vision (ViT) layer that a forward pass needs."""

    norm1: nn.LayerNorm
    qkv: nn.Linear
    attn_out: nn.Linear
    norm2: nn.LayerNorm
    fc1: nn.Linear
    act: nn.Module
    fc2: nn.Linear


def vision_layers(model: nn.Module) -> list[VisionLayer]:
    stack = get_module(model, LAYERS[VISION_ENCODER])
    return [VisionLayer(**{role: get_module(layer, path) for role, path in VISION_LAYER_PARTS.items()}) for layer in stack]


def vision_embeddings(model: nn.Module) -> nn.Module:
    return get_module(model, VISION_EMBEDDINGS)


def vision_post_norm(model: nn.Module) -> nn.Module:
    return get_module(model, VISION_POST_NORM)


def vision_heads(model: nn.Module) -> int:
    return int(vision_config(model).num_attention_heads)


def text_embeddings(model: nn.Module, block: str) -> nn.Module:
    return get_module(model, EMBEDDINGS[check_block(block)])


def vision_encoder(model: nn.Module) -> nn.Module:
    return get_module(model, VISION_MODULE)


def answer_head(model: nn.Module) -> nn.Module:
    return get_module(model, ANSWER_HEAD)


def itm_head(model: nn.Module) -> nn.Module:
    return get_module(model, ITM_HEAD)


def text_encoder(model: nn.Module) -> nn.Module:
    return get_module(model, TEXT_ENCODER)


def projections(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(vision projection, text projection) for ITC, or None when the checkpoint lacks them."""
    if not all(hasattr(model, name) for name in (VISION_PROJECTION, TEXT_PROJECTION)):
        return None
    return get_module(model, VISION_PROJECTION), get_module(model, TEXT_PROJECTION)


def text_config(model: Any) -> Any:
    return model.config.text_config


#: Where the model's configuration keeps a block's transformer's, where that is not ``text_config`` (the text
#: transformers', and BLIP-2's language model's): the ViT's, and BLIP-2's Q-Former's own.
BLOCK_CONFIGS: dict[str, str] = {VISION_ENCODER: "vision_config", QFORMER: "qformer_config"}


def block_config(model: Any, block: str) -> Any:
    """The configuration of ``block``'s transformer (BLIP-2's Q-Former has its own)."""
    return getattr(model.config, BLOCK_CONFIGS.get(block, "text_config"))


def feed_forward_size(config: Any) -> int:
    """The width of a configuration's MLP (BERT's ``intermediate_size``, OPT's ``ffn_dim``, T5's ``d_ff``)."""
    return int(getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or config.d_ff)


def queries(model: nn.Module) -> Any:
    """BLIP-2's (or InstructBLIP's) learned queries [1, Q, D] and the LayerNorm the Q-Former applies to its input."""
    kind = str(getattr(model.config, "model_type", ""))
    if kind not in QFORMER_NORMS:
        raise BlipTraceError(f"a {kind} model has no Q-Former: use a BLIP-2 or InstructBLIP model")
    return get_module(model, QUERY_TOKENS), get_module(model, QFORMER_NORMS[kind])


def instruction_embeddings(model: nn.Module) -> tuple[nn.Embedding, nn.Embedding] | None:
    """InstructBLIP's Q-Former token and position embeddings for the instruction; None for BLIP-2's Q-Former."""
    if getattr(model.config, "model_type", None) != "instructblip":
        return None
    words, positions = (get_module(model, name) for name in INSTRUCTION_EMBEDDINGS)
    return words, positions


def language_model_parts(model: nn.Module) -> dict[str, Any]:
    """BLIP-2's decoder-only language model around its layers: the query projection, token embeddings, learned
    positions (OPT's) or rotary embedding (LLaMA's; None where absent), the final norm and the head."""
    row = language_model_row(model)
    rotary = row.rotary
    if rotary is not None and not _has_module(model, rotary):
        rotary = f"{row.layers}.0.{LEGACY_ROTARY}"  # transformers 4.x: one (the same) in every layer's attention
    names = {"projection": LANGUAGE_PROJECTION, "tokens": row.tokens, "positions": row.positions,
             "rotary": rotary, "final_norm": row.final_norm, "head": row.head}
    return {role: None if name is None else get_module(model, name) for role, name in names.items()}


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def vision_config(model: Any) -> Any:
    return model.config.vision_config


def num_heads(model: nn.Module, block: str = QUESTION_ENCODER) -> int:
    return int(block_config(model, block).num_attention_heads)
