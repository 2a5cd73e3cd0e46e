"""Load BLIP (visual question answering, captioning or image-text matching) into a :class:`BlipBundle`.

    >>> from blip_trace_widgets import load_model
    >>> bundle = load_model("demo")            # the bundled easy-VQA model, offline
    >>> bundle.model.training, bundle.device.type, bundle.head
    (False, 'cpu', 'vqa')
    >>> load_model("demo-caption").head, load_model("demo-itm").head
    ('caption', 'itm')

``source`` may be a hub id such as ``"Salesforce/blip-vqa-base"``,
``"Salesforce/blip-image-captioning-base"`` or ``"Salesforce/blip-itm-base-coco"``, a local
folder, a bundled demo (``"demo"``, ``"demo-caption"``, ``"demo-itm"``, ``"demo-blip2"``, ``"demo-instructblip"``),
or a ``(model, processor)`` pair built in code.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from ..core.errors import BlipTraceError, UnavailableError
from ..core.names import DEMO_MODELS, HUB_MODELS, QUESTION_ENCODER, ROME_NOISE_SCALE
from .anatomy import check_blip
from .heads import BY_NAME

DEMO_MODEL_DIR = Path(__file__).resolve().parents[1] / "demo_model"
#: The bundled demo models by name: VQA, captioning and image-text matching, all trained on easy-VQA.
DEMO_DIRS: dict[str, Path] = {name: Path(__file__).resolve().parents[1] / folder for name, folder in
                              {"demo": "demo_model", "demo-caption": "demo_caption", "demo-itm": "demo_itm",
                               "demo-blip2": "demo_blip2", "demo-instructblip": "demo_instructblip"}.items()}
#: Optional file in a model folder: tracing defaults that suit that model.
TRACE_DEFAULTS_FILE = "trace_defaults.json"
#: Memory a trace needs beside the weights (activations, corrupted runs; measured on a BLIP-base-sized model).
TRACE_HEADROOM = 700 << 20

DTypeLike = Union[torch.dtype, str, None]


@dataclass
class BlipBundle:
    """A BLIP model (VQA, captioning or image-text matching) with its processor, on one device, in eval mode
    without gradients."""

    model: Any
    processor: Any
    device: torch.device
    name: str = "custom"
    #: Gaussian noise scale (in σ of the image embeddings) that widgets and the CLI start from:
    #: ROME's 3σ unless the model folder's trace_defaults.json says otherwise.
    noise_scale: float = ROME_NOISE_SCALE

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def head(self) -> str:
        """Which BLIP head the model is: "vqa", "caption" or "itm"."""
        from .anatomy import head_of

        return head_of(self.model)

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def working_itemsize(self) -> int:
        """Bytes per activation element while a chunk runs: half precision on a CPU works through float32
        temporaries (measured: a bfloat16 trace of a BLIP-base-sized model peaked 0.15 GiB lower with half
        the chunk budget, at 2% more time), so chunks are sized as for float32 there."""
        size = self.dtype.itemsize
        return max(size, 4) if self.device.type == "cpu" and self.dtype.is_floating_point else size

    def num_layers(self, block: str = QUESTION_ENCODER) -> int:
        """Layers in ``block`` (question_encoder, answer_decoder or vision_encoder)."""
        from .anatomy import num_layers

        return num_layers(self.model, block)

    @property
    def patch_grid_side(self) -> int:
        """Image patches per side of the vision encoder's input."""
        from .anatomy import vision_config

        vision = vision_config(self.model)
        return int(vision.image_size) // int(vision.patch_size)


def _dtype(dtype: DTypeLike) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise BlipTraceError(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16")
    return names[dtype]


def _device(device: Union[str, torch.device, None]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise BlipTraceError(f"unknown device {device!r} ({error}); use cpu, cuda or cuda:N") from None
    if target.type == "meta":
        raise BlipTraceError("device='meta' holds no weights, so nothing can be traced; use cpu or cuda")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise BlipTraceError(f"device {device!r} asks for CUDA, but this machine has no CUDA GPU; use device='cpu'")
    if target.type == "cuda" and target.index is not None and target.index >= torch.cuda.device_count():
        raise BlipTraceError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return target


def _offline_help(source: str) -> str:
    return (
        f"could not load {source!r}: it is not a local folder, and the Hugging Face Hub could not provide it "
        "(no network, no cached copy, or a wrong id). Connect to the internet once, or download it elsewhere "
        f"with `huggingface-cli download {source}` and pass the folder; set HF_HUB_OFFLINE=1 to use the cache. "
        "Offline, load_model('demo'), 'demo-caption' or 'demo-itm' loads a bundled easy-VQA model."
    )


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' loading bars and notices (such as the torchvision fallback) while loading."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _noise_scale(folder: Path) -> float:
    path = folder / TRACE_DEFAULTS_FILE
    if not path.is_file():
        return ROME_NOISE_SCALE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BlipTraceError(f"{path}: not readable JSON ({error}); fix or delete it") from None
    value = data.get("noise_scale", ROME_NOISE_SCALE) if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise BlipTraceError(f"{path}: noise_scale must be a positive number (σ of the image embeddings), got {value!r}")
    return float(value)


#: Files a local model folder needs, and what each is for.
MODEL_FILES = {"config.json": "the model's configuration", "tokenizer_config.json": "the tokenizer",
               "preprocessor_config.json|processor_config.json": "the image processor",
               "model.safetensors|pytorch_model.bin|model.safetensors.index.json": "the weights"}


def _check_folder(folder: Path, files: tuple[str, ...] = tuple(MODEL_FILES)) -> None:
    """A local folder must hold a whole model: name the first file that is missing."""
    for names, what in ((names, MODEL_FILES[names]) for names in files):
        if not any((folder / name).is_file() for name in names.split("|")):
            raise UnavailableError(f"{folder} has no {names.replace('|', ' or ')} ({what}); copy the whole model "
                                   "folder, or reinstall blip-trace-widgets for the demo model")


def _looks_like_hub_id(name: str) -> bool:
    """Hub ids are 'owner/name'; anything else that is not a folder cannot be fetched."""
    return name.count("/") == 1 and all(part.strip() for part in name.split("/")) and not name.startswith((".", "/"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection within ``timeout`` seconds ($HF_ENDPOINT respected)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_access(source: str) -> dict[str, Any]:
    """For a hub id: read the local cache only when the Hub cannot be reached, and fail at once (instead of
    after minutes of retries) when nothing is cached either."""
    if Path(source).exists() or hub_reachable():
        return {}
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return {"local_files_only": True}
    raise UnavailableError(_offline_help(source))


def _half_source(source: str, dtype: torch.dtype, access: dict[str, Any]) -> str:
    """For half precision, a folder whose weights are already in ``dtype`` (converted tensor by tensor, once):
    loading then never holds the float32 weights and their copy at the same time."""
    from ..core.memory import checkpoint_dtype, half_checkpoint

    if dtype not in (torch.float16, torch.bfloat16):
        return source
    folder = Path(source)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, allow_patterns=["*.json", "*.txt", "model.safetensors"], **access))
        except Exception:  # a hub layout this shortcut does not know: transformers loads it the usual way
            return source
    if not (folder / "model.safetensors").is_file():  # sharded (BLIP-2's hub checkpoints): transformers loads it
        return source
    if checkpoint_dtype(folder) != torch.float32:
        return str(folder)
    return str(half_checkpoint(folder, dtype))


def _warn_if_too_big(source: str, dtype: torch.dtype) -> None:
    """Warn before loading when the weights alone would not leave room to trace, naming a dtype that would fit."""
    import warnings

    from ..core.memory import available_memory

    weights = Path(source) / "model.safetensors"
    free = available_memory()
    if not weights.is_file() or free is None:
        return
    stored = weights.stat().st_size
    from ..core.memory import checkpoint_dtype

    stored_dtype = checkpoint_dtype(Path(source)) or torch.float32
    need = stored * dtype.itemsize / stored_dtype.itemsize + TRACE_HEADROOM
    if need <= free:
        return
    fits = [name for name, candidate in (("bfloat16", torch.bfloat16), ("float16", torch.float16))
            if candidate.itemsize < dtype.itemsize and stored * candidate.itemsize / stored_dtype.itemsize
            + TRACE_HEADROOM <= free]
    hint = f"load_model(..., dtype={fits[0]!r}) would fit" if fits else "use a machine with more memory"
    warnings.warn(f"{source}: the weights in {str(dtype).replace('torch.', '')} and room to trace need about "
                  f"{need / 2**30:.1f} GiB, and {free / 2**30:.1f} GiB are available; {hint}", ResourceWarning,
                  stacklevel=3)


def dtype_argument(dtype: torch.dtype) -> dict[str, Any]:
    """``dtype=`` for transformers 4.56 and later, ``torch_dtype=`` before (4.x reads ``dtype`` as a config field)."""
    import transformers

    version = tuple(int(part) for part in transformers.__version__.split(".")[:2] if part.isdigit())
    return {"dtype": dtype} if version >= (4, 56) else {"torch_dtype": dtype}


def _head_class(source: str, config: Any) -> Any:
    """The head of the checkpoint, or a clear error for anything but BLIP's three heads and BLIP-2."""
    architectures = getattr(config, "architectures", None) or []
    known = {head.architecture for head in BY_NAME.values()}
    found = [head for name in architectures for head in BY_NAME.values() if head.architecture == name]
    types = {head.model_type for head in BY_NAME.values()}
    if config.model_type not in types or (architectures and not found) or (
            found and found[0].model_type != config.model_type):
        raise BlipTraceError(
            f"{source!r} is a {config.model_type} model ({', '.join(architectures) or 'unknown head'}), not one of "
            f"the heads this package traces ({', '.join(sorted(known))}); use a checkpoint such as "
            f"{', '.join(HUB_MODELS.values())}")
    if found:
        return found[0]
    # a configuration that names no head: VQA for BLIP, as this package did before it traced the other heads
    return next(head for head in BY_NAME.values() if head.model_type == config.model_type)


def _from_pretrained(source: str, dtype: torch.dtype) -> tuple[Any, Any]:
    import transformers
    from transformers import AutoConfig

    access = _hub_access(source)
    source = _half_source(source, dtype, access)
    _warn_if_too_big(source, dtype)
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(source, **access)
    except (OSError, ValueError, ConnectionError) as error:
        if Path(source).exists():
            raise BlipTraceError(f"{source!r} is not a Hugging Face model folder ({error})") from None
        raise UnavailableError(_offline_help(source)) from None
    head = _head_class(source, config)
    if Path(source).is_dir():
        _check_folder(Path(source))
    try:
        with _quiet_transformers():
            options: dict[str, Any] = {**dtype_argument(dtype), **access, "output_loading_info": True}
            loaded: Any = getattr(transformers, head.architecture).from_pretrained(source, **options)
            model, info = loaded
            processor = getattr(transformers, head.processor).from_pretrained(source, **access)
    except (OSError, ConnectionError) as error:
        if Path(source).is_dir():
            detail = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UnavailableError(
                f"{source!r} could not be read by transformers {transformers.__version__} ({detail}); the folder "
                f"was saved by transformers {getattr(config, 'transformers_version', 'of another version')}: copy "
                "it again if it is damaged, or install that transformers version") from None
        raise UnavailableError(_offline_help(source)) from None
    except Exception as error:  # safetensors and tokenizers raise their own types for damaged files
        if not Path(source).is_dir() or type(error).__module__.split(".")[0] not in ("safetensors", "tokenizers"):
            raise
        raise UnavailableError(f"{source!r}: a file in it is damaged ({type(error).__name__}: {error}); "
                               "copy the model folder again") from None
    _check_complete(source, sorted(info.get("missing_keys") or []), config)
    return model, processor


def _check_complete(source: str, missing: list[str], config: Any) -> None:
    """Refuse a model some of whose weights the checkpoint lacks: they would be random, and every trace wrong."""
    if not missing:
        return
    import transformers

    saved = getattr(config, "transformers_version", None) or "an unknown version"
    raise UnavailableError(
        f"{source!r} lacks {len(missing)} weight(s) this transformers {transformers.__version__} expects "
        f"({', '.join(missing[:3])}); they would be random. The checkpoint was saved by transformers {saved}: "
        "install that version or newer (pip install -U transformers), or use a complete checkpoint")


def load_model(
    source: Union[str, os.PathLike, tuple[Any, Any]],
    *,
    device: Union[str, torch.device, None] = None,
    dtype: DTypeLike = None,
) -> BlipBundle:
    """Load BLIP from a hub id, a folder, a demo name (``"demo"``, ``"demo-caption"``, ``"demo-itm"``) or a
    ``(model, processor)`` pair. The bundle's ``head`` says which of BLIP's heads it is."""
    torch_dtype = _dtype(dtype)
    noise_scale = ROME_NOISE_SCALE
    if isinstance(source, tuple):
        if len(source) != 2:
            raise BlipTraceError("pass a (model, processor) pair")
        model, processor = source
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or "custom"
    elif isinstance(source, (str, os.PathLike)):
        name = str(source)
        path = DEMO_DIRS.get(name, Path(name))
        if path.is_dir() or name in DEMO_DIRS:
            _check_folder(path, ("config.json",))  # the rest once the configuration says it is BLIP
        elif path.exists():
            raise BlipTraceError(f"{name!r} is a file; pass a model folder, a hub id such as Salesforce/blip-vqa-base, "
                                 f"or one of {', '.join(DEMO_MODELS)}")
        elif not _looks_like_hub_id(name):
            raise BlipTraceError(f"{name!r} is neither a folder nor a hub id such as Salesforce/blip-vqa-base "
                                 f"(did you mean a local folder?); offline, {', '.join(DEMO_MODELS)} are bundled")
        model, processor = _from_pretrained(str(path) if path.exists() else name, torch_dtype)
        if path.is_dir():
            noise_scale = _noise_scale(path)
    else:
        raise BlipTraceError(
            f"unsupported model source {type(source).__name__}: pass a hub id, a folder, 'demo' or (model, processor)"
        )
    check_blip(model)
    if dtype is None and isinstance(source, tuple):
        torch_dtype = next(model.parameters()).dtype  # a model built in code keeps its dtype
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise BlipTraceError("the processor must be a BlipProcessor (with .tokenizer and .image_processor)")
    target = _device(device)
    model = model.to(device=target, dtype=torch_dtype)
    model.eval()
    model.requires_grad_(False)
    return BlipBundle(model=model, processor=processor, device=target, name=name, noise_scale=noise_scale)
