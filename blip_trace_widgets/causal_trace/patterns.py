"""Attention patterns of the clean run: which keys a head reads, for the head maps' "show me this head".

    >>> from blip_trace_widgets import load_model, demo_samples, Tracer
    >>> from blip_trace_widgets.causal_trace.patterns import attention_pattern
    >>> image, question, _ = demo_samples()[0]
    >>> weights = attention_pattern(Tracer(load_model("demo"), image, question), "question_encoder", "cross_attn_head", 1)
    >>> weights.shape[0] == 4 and abs(float(weights[0, 0].sum()) - 1) < 1e-5   # heads x queries x keys; rows sum to 1
    True

A head kind's cell restores what a head writes; its pattern says what it reads. For
``cross_attn_head`` of a block that reads the image the keys are the image tokens (CLS, then the
patches), which :func:`~.plotting.attention_overlay` paints on the image.
"""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

from ..core.errors import BlipTraceError
from ..core.names import BLOCK_LABELS, HEAD_KINDS


def attention_pattern(tracer: Any, block: str, kind: str, layer: int, config: Any = None) -> np.ndarray:
    """The clean run's attention weights at ``layer`` for every head of ``kind``: [heads, queries, keys]
    (``self_attn_head``: the block's tokens over themselves; ``cross_attn_head``: over what the block
    cross-attends to, the image tokens or, for the answer decoder, the question's; ``attn_head``: the patches)."""
    from .config import TraceConfig

    if kind not in HEAD_KINDS:
        raise BlipTraceError(f"patterns belong to head kinds: use one of {', '.join(HEAD_KINDS)}, not {kind!r}")
    from ..models.anatomy import check_block, check_kind

    config = config if config is not None else TraceConfig(block=check_block(block), kind=check_kind(kind))
    unit = tracer.blocks[block]
    stack = unit.stack
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise BlipTraceError(f"layer must be a whole layer index from 0 to {len(stack) - 1}, got "
                             f"{type(layer).__name__} {layer!r}")
    if not 0 <= layer < len(stack):
        raise BlipTraceError(f"layer must be between 0 and {len(stack) - 1}, got {layer}")
    layer = int(layer)
    target = tracer.target(config)
    with torch.no_grad():
        run = tracer.clean_run(unit, target)
        if unit.image_side:
            weights = stack.self_attention(layer, run.inputs[layer])
        elif kind == "cross_attn_head":
            cross = unit.clean_cross(tracer.clean_pass.context, target)[layer]
            if cross is None:
                raise BlipTraceError(f"layer {layer} of the {BLOCK_LABELS.get(block, block)} has no cross-attention: pick "
                                     f"one of layers {', '.join(str(j) for j in range(len(stack)) if stack.has_cross(j))}")
            keys = cross[0][:, 0]
            weights = stack.cross_attention(layer, stack.cross_input(run, layer), keys)
        else:
            h = run.inputs[layer]
            weights = stack.self_attention(layer, h, stack.self_mask(h.shape[1], h.dtype, h.device))
    return weights[0].float().cpu().numpy()
