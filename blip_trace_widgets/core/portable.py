"""Save a BLIP model folder that transformers 4.4x and 5.x both read.

    >>> import tempfile
    >>> from transformers import BlipConfig, BlipForQuestionAnswering
    >>> from blip_trace_widgets.core.portable import save_portable, saved_keys
    >>> tiny = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16}
    >>> model = BlipForQuestionAnswering(BlipConfig(text_config={**tiny, "vocab_size": 40},
    ...                                             vision_config={**tiny, "image_size": 16, "patch_size": 8}))
    >>> folder = tempfile.mkdtemp()
    >>> save_portable(model, None, folder)
    >>> saved_keys(folder) == set(model.state_dict())  # tied weights too
    True

transformers 5 leaves tied weights (the answer decoder's output matrix, tied to its word
embeddings) out of ``model.safetensors``, and writes the image processor's settings inside
``processor_config.json``. transformers 4.44 (checked) does not tie that matrix, so it would start
it at random, and it reads the image processor only from ``preprocessor_config.json`` (a nested
one in ``processor_config.json`` makes ``BlipProcessor.from_pretrained`` fail). Hub
checkpoints such as ``Salesforce/blip-vqa-base`` have the layout written here: every
weight stored, and the image processor in ``preprocessor_config.json``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

WEIGHTS = "model.safetensors"
NESTED = "processor_config.json"
IMAGE_PROCESSOR = "preprocessor_config.json"


def saved_keys(folder: Union[str, os.PathLike]) -> set[str]:
    """The tensor names in a folder's ``model.safetensors``."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / WEIGHTS), "pt") as weights:
        return set(weights.keys())


def _store_tied_weights(model: Any, folder: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / WEIGHTS
    with safe_open(str(path), "pt") as weights:
        metadata = weights.metadata()
        tensors = {key: weights.get_tensor(key) for key in weights.keys()}
    state = model.state_dict()
    absent = [key for key in state if key not in tensors]
    if not absent:
        return
    for key in absent:
        tensors[key] = state[key].detach().to("cpu").clone().contiguous()
    save_file(tensors, str(path), metadata=metadata)


def _flatten_processor_config(folder: Path) -> None:
    nested = folder / NESTED
    if not nested.is_file():
        return
    settings = json.loads(nested.read_text())
    image = settings.pop("image_processor", None)
    if image is None:
        return
    image.setdefault("processor_class", settings.get("processor_class", "BlipProcessor"))
    (folder / IMAGE_PROCESSOR).write_text(json.dumps(image, indent=2, sort_keys=True) + "\n")
    if set(settings) <= {"processor_class"}:
        nested.unlink()
    else:
        nested.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def save_portable(model: Any, processor: Any, folder: Union[str, os.PathLike]) -> None:
    """``save_pretrained`` for the model (and the processor, unless None), in the layout both versions read."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    if (target / WEIGHTS).is_file():
        _store_tied_weights(model, target)
    if processor is not None:
        processor.save_pretrained(target)
        _flatten_processor_config(target)
