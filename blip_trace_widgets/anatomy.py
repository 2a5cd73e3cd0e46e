"""Where BLIP keeps things: the one table from (block, kind) to module names.

    >>> from blip_trace_widgets.anatomy import module_name
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
from typing import Any

from torch import nn

from .errors import BlipTraceError
from .heads import BLOCKS_OF, head_of_model
from .heads import of as head_named
from .names import (  # noqa: F401  (re-exported)
    ANSWER_DECODER,
    BLOCKS,
    CAPTION_DECODER,
    ITM_ENCODER,
    KINDS,
    QUESTION_ENCODER,
    SEVERABLE,
    TEXT_BLOCKS,
    VISION_KINDS,
    kinds_of,
)
from .names import VISION_ENCODER as VISION_BLOCK

#: Layer stack of each block; ``{layer}`` is the layer index.
LAYERS: dict[str, str] = {
    QUESTION_ENCODER: "text_encoder.encoder.layer",
    ANSWER_DECODER: "text_decoder.bert.encoder.layer",
    CAPTION_DECODER: "text_decoder.bert.encoder.layer",  # BlipForConditionalGeneration's decoder
    ITM_ENCODER: "text_encoder.encoder.layer",  # BlipForImageTextRetrieval's text encoder
    VISION_BLOCK: "vision_model.encoder.layers",
}

#: The table: (block, kind) -> module whose output is restored.
MODULES: dict[tuple[str, str], str] = {
    **{
        (block, kind): LAYERS[block] + ".{layer}" + suffix
        for block in TEXT_BLOCKS
        for kind, suffix in {
            "hidden": "",
            "self_attn": ".attention.output.dense",
            "cross_attn": ".crossattention.output.dense",
            "mlp": ".output.dense",
            "post_self_attn": ".attention",  # h1 = LN(h + SA(h)): the output of BLIP's attention module
            "post_cross_attn": ".crossattention",  # h2 = LN(h1 + XA(h1))
        }.items()
    },
    # The ViT is pre-LN: h1 = h + SA(LN1(h)), h2 = h1 + MLP(LN2(h1)); .self_attn and .mlp
    # output exactly what each sublayer adds to the residual stream.
    **{
        (VISION_BLOCK, kind): LAYERS[VISION_BLOCK] + ".{layer}" + suffix
        for kind, suffix in {"hidden": "", "self_attn": ".self_attn", "mlp": ".mlp"}.items()
    },
}

EMBEDDINGS: dict[str, str] = {
    QUESTION_ENCODER: "text_encoder.embeddings",
    ANSWER_DECODER: "text_decoder.bert.embeddings",
    CAPTION_DECODER: "text_decoder.bert.embeddings",
    ITM_ENCODER: "text_encoder.embeddings",
}
VISION_ENCODER = "vision_model"
VISION_EMBEDDINGS = "vision_model.embeddings"  # patch embeddings + CLS + positions: [B, 1 + g*g, D]
VISION_POST_NORM = "vision_model.post_layernorm"
ANSWER_HEAD = "text_decoder.cls.predictions"  # the language-model head of the VQA and caption decoders
ITM_HEAD = "itm_head"  # Linear(D, 2) on the ITM encoder's first state: (no match, match)
TEXT_ENCODER = "text_encoder"  # the ITM model's text encoder, run without the image for ITC
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


def check_block(block: str) -> str:
    if block not in BLOCKS:
        raise BlipTraceError(f"unknown block {block!r}: use one of {', '.join(BLOCKS)}")
    return block


def check_kind(kind: str, block: str | None = None) -> str:
    if kind not in KINDS:
        raise BlipTraceError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    if block is not None and kind not in kinds_of(block):
        raise BlipTraceError(f"the {block.replace('_', ' ')} has no {kind!r}: use one of {', '.join(kinds_of(block))}")
    return kind


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
                "BlipForQuestionAnswering, BlipForConditionalGeneration or BlipForImageTextRetrieval"
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
        raise BlipTraceError(f"a {head_named(head).label} model has no {block.replace('_', ' ')}: use one of "
                             f"{', '.join(BLOCKS_OF[head])}")
    return block


def num_layers(model: nn.Module, block: str) -> int:
    return len(get_module(model, LAYERS[check_block(block)]))


@dataclass(frozen=True)
class TextLayer:
    """The modules of one BLIP text layer that a forward pass needs."""

    self_query: nn.Linear
    self_key: nn.Linear
    self_value: nn.Linear
    self_out: nn.Linear
    self_norm: nn.LayerNorm
    cross_query: nn.Linear
    cross_key: nn.Linear
    cross_value: nn.Linear
    cross_out: nn.Linear
    cross_norm: nn.LayerNorm
    mlp_in: nn.Linear
    mlp_act: nn.Module
    mlp_out: nn.Linear
    mlp_norm: nn.LayerNorm


def text_layers(model: nn.Module, block: str) -> list[TextLayer]:
    """Every layer of ``block`` as a :class:`TextLayer`."""
    if check_block(block) not in TEXT_BLOCKS:
        raise BlipTraceError(f"{block} is not a text block: use one of {', '.join(TEXT_BLOCKS)}")
    stack = get_module(model, LAYERS[block])
    return [
        TextLayer(**{role: get_module(layer, path) for role, path in TEXT_LAYER_PARTS.items()})
        for layer in stack
    ]


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
    stack = get_module(model, LAYERS[VISION_BLOCK])
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
    return get_module(model, VISION_ENCODER)


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


def vision_config(model: Any) -> Any:
    return model.config.vision_config


def num_heads(model: nn.Module) -> int:
    return int(text_config(model).num_attention_heads)
