"""The tuned lens (Belrose et al. 2023, "Eliciting latent predictions from transformers with the tuned lens"):
one affine translator per layer, trained so that each layer's translated state, read through the block's own
final norm and head, says what the last layer says.

    >>> from blip_trace_widgets import load_model
    >>> from blip_trace_widgets.lenses.tuned import shipped_lens
    >>> shipped = shipped_lens(load_model("demo"), "answer_decoder")
    >>> shipped.layers, shipped.width, shipped.config["steps"]
    (4, 128, 300)

As in the tuned-lens package, a translator adds its output to the state, ``h + (A h + b)``, with ``A`` and ``b``
starting at zero, so a fresh lens is the logit lens; the last layer has no translator (its lens is the model's
output). Training minimises KL(final || translated) summed over layers, with Adam, on every position of the items'
forward passes (the states are recorded once, then the translators are fitted on them). Translators are saved as
safetensors (a plain state dict and a JSON header, no pickled classes). A wide model's full-rank translators are
width^2 per layer (OPT-2.7b: about 26 MB per layer in float32); ``rank=`` trains low-rank ones, ``A = U V``.

The translators shipped for the demo models (``lenses/translators/``: full-rank, float32, 66 kB per layer of width
128) were trained by ``python scripts/measure_lenses.py --train`` (256 easy-VQA train questions, 300 steps, seed 0),
which rebuilds them.
"""
from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from ..causal_trace.cost import WARN_SECONDS, LongTraceWarning, duration, matmul_speed
from ..core.errors import BlipTraceError
from ..core.names import ANSWER_DECODER, CAPTION_DECODER, LM_DECODER
from ..models import heads
from ..models.loading import DEMO_DIRS, BlipBundle
from .names import TRAIN_ITEMS, TRAIN_LR, TRAIN_STEPS, TRANSLATOR_FILE
from .reading import check_bundle, lens_block, read, unembed

TRANSLATORS = Path(__file__).resolve().parent / "translators"
#: What one item costs beside its matrix products (reading the image, the processor, hooks), measured on the demo
#: models: 256 items and 300 steps took 5.9 s on demo (2 shared CPU cores, one thread).
PER_ITEM_SECONDS = 0.02
Progress = Union[bool, Callable[[int, int], None]]


def _translator(width: int, rank: int | None) -> nn.Module:
    """``A h + b`` starting at zero: full rank (``A`` is width x width), or ``A = U V`` of ``rank`` (``V`` starts
    random, ``U`` and ``b`` at zero, so the product starts at zero and both factors still learn)."""
    if rank is None:
        full = nn.Linear(width, width)
        nn.init.zeros_(full.weight)
        nn.init.zeros_(full.bias)
        return full
    down, up = nn.Linear(width, rank, bias=False), nn.Linear(rank, width)
    nn.init.normal_(down.weight, std=width ** -0.5)
    nn.init.zeros_(up.weight)
    nn.init.zeros_(up.bias)
    return nn.Sequential(down, up)


class TunedLens(nn.Module):
    """One affine translator per layer but the last, each ``h + (A h + b)`` (starting at the identity); ``rank``:
    a low-rank ``A`` (``U V``) for wide models, whose full-rank translators would be width^2 per layer."""

    def __init__(self, block: str, layers: int, width: int, config: dict[str, Any] | None = None,
                 rank: int | None = None) -> None:
        super().__init__()
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= width):
            raise BlipTraceError(f"rank={rank!r}: pass a whole number from 1 to the width ({width}), or None for "
                                 "full-rank translators")
        self.block, self.width, self.rank = block, int(width), rank
        self.translators = nn.ModuleList(_translator(self.width, rank) for _ in range(int(layers) - 1))
        self.config: dict[str, Any] = dict(config or {})

    @property
    def layers(self) -> int:
        return len(self.translators) + 1

    def __repr__(self) -> str:
        rank = "full rank" if self.rank is None else f"rank {self.rank}"
        return f"TunedLens({self.block}, {self.layers} layers of width {self.width}, {rank}, {self.config})"

    def transform(self, states: torch.Tensor) -> torch.Tensor:
        """Translate every layer's states [layers, ..., width]; the last layer's are left as they are."""
        if states.shape[0] != self.layers or states.shape[-1] != self.width:
            raise BlipTraceError(f"this tuned lens is for {self.layers} layers of width {self.width}; the block has "
                                 f"{states.shape[0]} of width {states.shape[-1]}: train one for this model")
        if not len(self.translators):
            return states
        weight = next(self.parameters())
        if weight.device != states.device:
            self.to(states.device)
        moved = states.to(weight.dtype)
        out = [moved[i] + translator(moved[i]) for i, translator in enumerate(self.translators)]
        return torch.stack([*out, moved[-1]]).to(states.dtype)

    def save(self, path: Union[str, Path]) -> Path:
        """Write the translators as safetensors (the lens's block, shape and training settings in its header)."""
        from safetensors.torch import save_file

        path = Path(path)
        header = {"block": self.block, "layers": self.layers, "width": self.width, "rank": self.rank,
                  "config": self.config}
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, str(path), metadata={"tuned_lens": json.dumps(header, allow_nan=False)})
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> TunedLens:
        """Read a lens written by :meth:`save`."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise BlipTraceError(f"no tuned lens at {str(path)!r}: train one with train_tuned_lens(...).save(path)")
        with safe_open(str(path), framework="pt") as handle:
            meta = (handle.metadata() or {}).get("tuned_lens")
        if meta is None:
            raise BlipTraceError(f"{str(path)!r} is not a tuned lens written by TunedLens.save")
        header = json.loads(meta)
        lens = cls(header["block"], header["layers"], header["width"], header["config"], header.get("rank"))
        lens.load_state_dict(load_file(str(path)))
        return lens.eval()


def translator_path(model: str, block: str) -> Path:
    return TRANSLATORS / TRANSLATOR_FILE.format(model=model, block=block)


@lru_cache(maxsize=8)
def _load_shipped(path: str) -> TunedLens:
    return TunedLens.load(path)


def shipped_lens(bundle: BlipBundle, block: str) -> TunedLens:
    """The tuned lens shipped for a bundled demo model; for any other model, an error naming train_tuned_lens."""
    path = translator_path(bundle.name, block)
    if bundle.name in DEMO_DIRS and path.is_file():
        return _load_shipped(str(path))
    seconds = training_seconds(bundle, block, TRAIN_ITEMS, TRAIN_STEPS)
    raise BlipTraceError(f"no tuned lens ships for {bundle.name!r}: train one with lens = train_tuned_lens(bundle, "
                         f"items, block={block!r}) (about {duration(seconds)} here for {TRAIN_ITEMS} questions and "
                         f"{TRAIN_STEPS} steps, a rough estimate), save it with lens.save(path), and pass tuned=lens "
                         "(or TunedLens.load(path))")


def _positions(bundle: BlipBundle, block: str) -> int:
    return 1 if block in (ANSWER_DECODER, CAPTION_DECODER, LM_DECODER) else \
        int(getattr(bundle.model.config, "num_query_tokens", 0)) + 12


def training_seconds(bundle: BlipBundle, block: str, items: int, steps: int, per_item: float | None = None) -> float:
    """A rough price of :func:`train_tuned_lens`: the items' forward passes (``per_item`` seconds each when measured;
    else from the model's size: the vision encoder's parameters over its patches, the rest over the text) and the
    steps' matrix products, from this machine's matrix-product speed."""
    from ..models import anatomy

    model = bundle.model
    config = anatomy.block_config(model, block)
    width = int(getattr(config, "hidden_size", None) or config.d_model)
    vocabulary, layers = int(config.vocab_size), anatomy.num_layers(model, block)
    rows = items * _positions(bundle, block)
    speed = matmul_speed(width) * 2  # floating-point operations per second
    train = steps * 3 * 2.0 * rows * (layers - 1) * (width * width + 2 * width * vocabulary) / speed
    if per_item is None:
        vision = sum(p.numel() for p in anatomy.vision_encoder(model).parameters())
        text = sum(p.numel() for p in model.parameters()) - vision
        patches = (bundle.patch_grid_side ** 2) + 1
        per_item = 2.0 * (vision * patches + text * (_positions(bundle, block) + 12)) / speed + PER_ITEM_SECONDS
    return items * per_item + train


def default_items(bundle: BlipBundle, split: str = "train", limit: int = TRAIN_ITEMS) -> list[tuple[Any, str]]:
    """easy-VQA's first ``limit`` (image path, text) of ``split``: its questions, or for a captioner each image's
    caption less its last word (the prompt whose states predict the caption's words)."""
    from ..datasets.easy_vqa import easy_vqa_captions, easy_vqa_questions

    if heads.of(bundle).scores_words:  # a captioner: its caption's words
        return [(path, caption.rsplit(" ", 1)[0]) for path, caption in easy_vqa_captions(split)[:limit]]
    return [(path, question) for path, question, _ in easy_vqa_questions(split)[:limit]]


def _samples(bundle: BlipBundle, items: Iterable[Any] | None, limit: int) -> list[tuple[Any, str]]:
    if items is None:
        return default_items(bundle, "train", limit)
    samples = [(item[0], str(item[1])) for item in items]
    if not samples:
        raise BlipTraceError("no items to train on: pass (image, question) pairs, or items=None for easy-VQA's")
    return samples


def record_states(bundle: BlipBundle, samples: list[tuple[Any, str]], block: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's states at every position of ``samples`` ([layers, rows, width]) and the final layer's
    log-probabilities ([rows, vocabulary]), one forward pass per sample."""
    from PIL import Image

    states = []
    for image, text in samples:
        picture = Image.open(image) if isinstance(image, (str, Path)) else image
        states.append(read(bundle, picture, text, block).states.float())
    stacked = torch.cat(states, dim=1)
    with torch.no_grad():
        final = torch.log_softmax(unembed(bundle.model, block)(stacked[-1].to(bundle.dtype)).float(), -1)
    return stacked, final


def fit(lens: TunedLens, head: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor, final: torch.Tensor,
        steps: int, lr: float, bar: Callable[[int], None]) -> list[float]:
    """Fit ``lens``'s translators to minimise the summed KL(final || translated) over layers; the losses by step."""
    optimiser = torch.optim.Adam(lens.parameters(), lr=lr)
    target = final.exp()
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            translated = lens.transform(states)[:-1]
            logp = torch.log_softmax(head(translated).float(), -1)
            loss = (target * (final - logp)).sum(-1).mean(-1).sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            bar(1)
    return losses


def train_tuned_lens(bundle: BlipBundle, items: Iterable[Any] | None = None, block: str | None = None, *,
                     steps: int = TRAIN_STEPS, seed: int = 0, lr: float = TRAIN_LR, limit: int = TRAIN_ITEMS,
                     rank: int | None = None, progress: Progress = True) -> TunedLens:
    """Train a tuned lens of ``block`` on ``items`` ((image, text) pairs; by default the first ``limit`` easy-VQA
    train questions, or a captioner's captions less their last word: :func:`default_items`), seeded. Its cost is
    priced after the first item's forward pass, before the rest; above 30 s a
    :class:`~blip_trace_widgets.causal_trace.cost.LongTraceWarning` says so, and the progress bar says the time.
    ``rank``: low-rank translators (see :class:`TunedLens`). ``progress``: a bar (True), none (False), or a callable
    (done, total)."""
    bundle = check_bundle(bundle)
    block = lens_block(bundle, block)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise BlipTraceError(f"steps={steps!r}: pass a whole number of training steps, 1 or more")
    samples = _samples(bundle, items, limit)
    torch.manual_seed(seed)
    started = time.perf_counter()
    states = [record_states(bundle, samples[:1], block)]  # the first item's forward pass prices the others
    seconds = training_seconds(bundle, block, len(samples), steps, per_item=time.perf_counter() - started)
    if seconds > WARN_SECONDS:
        warnings.warn(f"training a tuned lens takes about {duration(seconds)} here ({len(samples)} items, {steps} "
                      "steps; a rough estimate): fewer items or steps make it faster", LongTraceWarning, stacklevel=2)
    total = len(samples) + steps
    with _bar(progress, total, f"tuned lens (about {duration(seconds)})") as bar:
        bar(1)
        for sample in samples[1:]:
            states.append(record_states(bundle, [sample], block))
            bar(1)
        stacked, final = torch.cat([s for s, _ in states], 1), torch.cat([f for _, f in states], 0)
        config = {"model": bundle.name, "items": len(samples), "steps": steps, "seed": seed, "lr": lr}
        lens = TunedLens(block, stacked.shape[0], stacked.shape[-1], config, rank).to(stacked.device)
        head = unembed(bundle.model, block)
        losses = fit(lens, lambda h: head(h.to(bundle.dtype)), stacked, final, steps, lr, bar)
    lens.config.update({"final_loss": losses[-1], "seconds": round(time.perf_counter() - started, 2)})
    return lens.eval()


class _bar:
    """A progress bar over ``total`` units: tqdm's, none, or the caller's callable."""

    def __init__(self, progress: Progress, total: int, desc: str) -> None:
        self.progress, self.total, self.done, self.tqdm, self.desc = progress, total, 0, None, desc

    def __enter__(self) -> Callable[[int], None]:
        if self.progress is True:
            from tqdm.auto import tqdm

            self.tqdm = tqdm(total=self.total, unit="step", desc=self.desc, disable=None)
        return self.update

    def update(self, n: int) -> None:
        self.done += n
        if self.tqdm is not None:
            self.tqdm.update(n)
        elif callable(self.progress):
            self.progress(self.done, self.total)

    def __exit__(self, *exc: object) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
