"""BLIP-2's and InstructBLIP's stacks: the Q-Former and the language models (OPT, LLaMA, Flan-T5), run layer by
layer."""
