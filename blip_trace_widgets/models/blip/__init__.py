"""BLIP's own stacks: its BERT text transformer (question encoder, answer and caption decoders, ITM encoder) and
its ViT vision encoder, run layer by layer."""
