"""Lenses: what each state of a block already says, the logit lens and the tuned lens.

    >>> from blip_trace_widgets import load_model, demo_samples
    >>> from blip_trace_widgets.lenses import lens
    >>> image, question, _ = demo_samples()[0]
    >>> lens(load_model("demo-blip2"), image, question).labels[:3]
    ['q0', 'q1', 'q2']

- :func:`lens` (:mod:`.core`): every position x layer of a block that ends in a vocabulary, from one forward pass:
  top tokens, p(answer) and its rank, KL to the final layer, as a :class:`LensResult` (:mod:`.result`);
- :func:`query_words`: BLIP-2's projected queries against the language model's input embeddings;
- :func:`train_tuned_lens` and :class:`TunedLens` (:mod:`.tuned`), with translators shipped for the demo models;
- :func:`confidence` (:mod:`.confidence`): internal confidence of words at BLIP-2's image queries;
- :func:`lens_sweep` and :func:`lens_average` (:mod:`.sweep`): p(answer), rank and KL per layer over a dataset;
- :mod:`.plots` (figures), :mod:`.command` (``blip-trace lens``), and ``widgets.lens.LensExplorer``.

Measured with release 0.3.0 on a machine of 2 shared CPU cores, one torch thread:

- ``python scripts/measure_lenses.py --train`` (load average 1.5): training took 5.9 s (demo), 6.8 s
  (demo-caption), 31.8 s (demo-blip2) and 19.0 s (demo-instructblip); on 100 held-out easy-VQA test items the
  mean KL to the final layer at the middle layer fell from 1.29 to 0.017 nats (demo, layer 1), 1.39 to 0.015
  (demo-caption, layer 1), 1.10 to 0.092 (demo-blip2, layer 2) and 1.05 to 0.083 (demo-instructblip, layer 2).
- ``python scripts/measure_lenses.py --confidence 200`` (load average 2.5): the AUROC of the right colour's internal
  confidence against a random wrong colour's, over 200 easy-VQA test images, was 0.942 (demo-blip2) and 0.934
  (demo-instructblip).
- ``python benchmarks/bench_lenses.py`` (load average 4.1): on a BLIP-base-sized VQA model the lens of the answer
  decoder's 12 layers took 3.36 s against 3.35 s for one forward pass (1.00x).
- ``python scripts/measure_lenses.py --base`` (load average 4): training on a BLIP-base-sized VQA model (random
  weights, 384 px images, a 34-token vocabulary) over 32 items and 50 steps took 128 s (76 s of CPU time), nearly
  all of it the items' forward passes.
"""
from __future__ import annotations

from .confidence import confidence, image_confidence
from .core import lens, query_words
from .result import LensResult
from .sweep import lens_average, lens_sweep
from .tuned import TunedLens, train_tuned_lens

__all__ = ["LensResult", "TunedLens", "confidence", "image_confidence", "lens", "lens_average", "lens_sweep", "query_words",
           "train_tuned_lens"]
