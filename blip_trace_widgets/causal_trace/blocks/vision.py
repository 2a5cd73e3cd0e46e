"""The vision encoder (BLIP's and BLIP-2's ViT) as a traced block: its patches on the image, and every block
after it run from its restored states.

    >>> from blip_trace_widgets.causal_trace.blocks.vision import VisionEncoder
    >>> VisionEncoder.__name__
    'VisionEncoder'
"""
from __future__ import annotations

import torch

from ...core.errors import BlipTraceError
from ...core.names import VISION_ENCODER, is_head_kind
from ...core.regions import patch_grid_size, region_grid
from ...core.scoring import Target
from ...models import anatomy
from ...models.blip.stacks import VisionStack
from ...models.chunks import vision_rows_per_chunk
from ...models.runs import Run, group_cells
from .base import Context, Corrupted, Cross, Facts, ImageReader, Layout, Settings, head_layout


class VisionEncoder(Facts):
    """The vision encoder (a pre-LN ViT): positions are CLS and the patches, or regions of patches."""

    name: str = VISION_ENCODER
    runs_per_target = False

    def __init__(self, model: torch.nn.Module, reader: ImageReader) -> None:
        self.stack = VisionStack(model)
        self.reader = reader
        self.projections = anatomy.projections(model)

    def labels(self, context: Context, target: Target) -> list[str]:
        """Its positions: CLS and each patch, by row and column."""
        side = patch_grid_size(int(context.clean.image_embeds.shape[1]))
        return ["[CLS]", *(f"p{r}c{c}" for r in range(side) for c in range(side))]

    def layout(self, context: Context, config: Settings, target: Target) -> Layout:
        side = patch_grid_size(int(context.clean.image_embeds.shape[1]))
        if is_head_kind(config.kind):
            return head_layout(self.labels(context, target), self.stack.heads, len(self.stack), config, text=False)
        grid = region_grid(side, config.regions)
        extra = {"grid": {"patches_per_side": side, "regions_per_side": config.regions or side,
                          "boxes": [list(g.box) if g.box else None for g in grid]}}
        return Layout([g.label for g in grid], group_cells([g.tokens for g in grid], len(self.stack), int(config.window)),
                      extra)

    def clean_run(self, context: Context, target: Target) -> Run:
        return context.clean_vision

    def clean_cross(self, context: Context, target: Target) -> Cross:
        return [None] * len(self.stack)

    def corrupted_run(self, context: Context, corrupted: Corrupted, target: Target) -> tuple[Run, Cross]:
        if corrupted.vision is None:
            raise BlipTraceError(
                "restoring vision-encoder states needs a corruption before the vision encoder: "
                "use corrupt='patches' or corrupt='pixels'")
        return corrupted.vision, [None] * len(self.stack)

    def rows_per_chunk(self, context: Context, config: Settings, target: Target) -> int:
        vision, text = anatomy.vision_config(context.model), anatomy.block_config(context.model, self.reader.name)
        return vision_rows_per_chunk(
            samples=config.samples, patches=int(context.clean.image_embeds.shape[1]), vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size, vision_heads=vision.num_attention_heads,
            tokens=len(self.reader.labels(context, target)),
            text_hidden=text.hidden_size, text_intermediate=anatomy.feed_forward_size(text),
            text_heads=text.num_attention_heads, element_size=context.bundle.working_itemsize,
            memory_budget=context.memory_budget, max_batch_rows=context.max_batch_rows,
        )

    def logits(self, context: Context, final: torch.Tensor, target: Target, prompt: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.stack.post_norm(final)
        if target.readout == "itc":
            return self.itc(context, embeds)
        return self.reader.logits(context, self.reader.encode_rows(context, embeds, target), target)

    def itc(self, context: Context, image_embeds: torch.Tensor) -> torch.Tensor:
        """ITC cosine similarity [...] of image embeddings [..., N, D] with the text (BLIP's projections of
        the image's first state and of the text encoder's first state, the text read without the image)."""
        if self.projections is None:
            raise BlipTraceError("this checkpoint has no ITC projections (vision_proj, text_proj): use metric='prob'")
        image_feature = torch.nn.functional.normalize(self.projections[0](image_embeds[..., 0, :]), dim=-1)
        return (image_feature * context.itc_text_feature(self.projections[1]).to(image_feature.dtype)).sum(-1)
