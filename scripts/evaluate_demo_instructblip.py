"""Exact-match accuracy of the bundled demo InstructBLIP on easy-VQA's test questions, with plain transformers.

    python scripts/evaluate_demo_instructblip.py                 # all 9,673 test questions
    python scripts/evaluate_demo_instructblip.py --limit 500     # the first 500

Nothing from blip_trace_widgets runs here: ``InstructBlipProcessor`` builds the inputs (the question after the
image's query placeholders for the language model, and the question for the Q-Former) and
``InstructBlipForConditionalGeneration.generate()`` answers greedily, as ``scripts/evaluate_demo_blip2.py`` does for
the BLIP-2 demo. Writes ``evaluation.json`` beside the model with ``--write``: all questions, and the first 1,000
apart (what ``tests/test_demo_instructblip.py`` re-measures).
"""
from __future__ import annotations

import sys
from pathlib import Path

from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_demo_blip2 import evaluate, run  # noqa: E402

FOLDER = Path(__file__).resolve().parent.parent / "blip_trace_widgets" / "demo_instructblip"
FIRST = 1000


def measure(folder: Path, limit: int | None = None) -> dict:
    """Exact match of plain ``generate()`` on the question itself (the first ``limit`` test questions, or all)."""
    return evaluate(folder, limit, prompt="{}", model_class=InstructBlipForConditionalGeneration,
                    processor_class=InstructBlipProcessor)


def main() -> None:
    # with every question, the first 1,000 too: the test suite re-measures those (a full run is a minute)
    run(__doc__.splitlines()[0], FOLDER, measure, lambda folder: {"first_1000": measure(folder, FIRST)})


if __name__ == "__main__":
    main()
