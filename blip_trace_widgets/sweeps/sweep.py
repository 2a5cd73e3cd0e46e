"""Sweeps: every configuration over every sample, written as it goes, resumable, shardable.

    >>> import tempfile
    >>> from blip_trace_widgets import load_model, TraceConfig, GaussianNoise
    >>> from blip_trace_widgets.datasets.subsets import load_vqa_subset
    >>> from blip_trace_widgets.sweep import sweep
    >>> table = sweep(load_model("demo"), load_vqa_subset("easy-vqa-color", limit=2),
    ...               configs=[TraceConfig(kind="hidden", samples=2, corruption=GaussianNoise(10.0))],
    ...               out=tempfile.mkdtemp(), progress=False)
    >>> len(table), sorted(table.columns)[:3]
    (2, ['answer', 'block', 'config'])

Layout of ``out``: ``sweep.json`` (what the sweep is), ``parts/`` (one Parquet file per
finished sample, written atomically) and ``sweep.parquet`` (all parts merged, written
when every sample is done). Run the same call again after a crash or a kill and it
skips finished samples: at most the sample in flight is recomputed.

Under ``accelerate launch --multi_gpu --num_processes N`` (or ``torchrun``: any launcher
that sets ``WORLD_SIZE``; on a machine without GPUs the processes share the CPU), each process
takes the samples whose index modulo the number of processes is its rank, on its own
device; the main process merges the parts when all are done.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..causal_trace import stages
from ..causal_trace.averages import upgrade_table
from ..causal_trace.results import TraceResult
from ..causal_trace.tracer import TraceConfig, Tracer
from ..core.errors import BlipTraceError, renamed
from ..core.inputs import image_digest
from ..core.names import ANSWER_MODES, VQA
from ..core.roles import position_roles
from ..datasets.easy_vqa import VQASample, text_of
from ..datasets.subsets import as_samples, image_id, open_image
from ..models import heads
from ..models.chunks import DEFAULT_MEMORY_BUDGET
from ..models.loading import BlipBundle

MANIFEST = "sweep.json"
DAMAGED = "damaged"
TABLE = "sweep.parquet"
PARTS = "parts"


def is_correct(model_answer: str, expected: str | None) -> bool | None:
    """Whether a VQA answer is the expected one (see :meth:`~.heads.Head.correct` for every head)."""
    return heads.of(VQA).correct(model_answer, expected)


@dataclass(frozen=True)
class Shard:
    """This process's share of a sweep: samples whose index % count == index."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise BlipTraceError(f"shard index must be in [0, {self.count}), got {self.index}")

    def owns(self, sample: int) -> bool:
        return sample % self.count == self.index


class ProcessGroup:
    """The processes of an ``accelerate launch`` (or a single process)."""

    def __init__(self) -> None:
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            from accelerate import PartialState

            # without CUDA, accelerate's torchrun launch (--multi_gpu) still gives one gloo process per shard
            self.state = PartialState(cpu=not torch.cuda.is_available())

    @property
    def shard(self) -> Shard:
        if self.state is None:
            return Shard()
        return Shard(self.state.process_index, self.state.num_processes)

    @property
    def is_main(self) -> bool:
        return self.state is None or self.state.is_main_process

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def process_device() -> str | None:
    """The device this process should use under ``accelerate launch`` (None outside it)."""
    group = ProcessGroup()
    return None if group.state is None else str(group.state.device)


def _check_configs(configs: TraceConfig | Sequence[TraceConfig]) -> list[TraceConfig]:
    configs = [configs] if isinstance(configs, TraceConfig) else list(configs)
    if not configs:
        raise BlipTraceError("configs is empty: pass one TraceConfig or a list of them")
    for config in configs:
        if not isinstance(config, TraceConfig):
            raise BlipTraceError(f"configs must be TraceConfig objects, got {type(config).__name__}")
        if config.answer is not None:
            raise BlipTraceError("a sweep scores each sample's own answer: leave TraceConfig.answer as None "
                             "and use answer='model' or answer='expected' in sweep()")
    return configs


def pair_configs(configs: Sequence[TraceConfig], item: Any) -> list[TraceConfig]:
    """For a semantic pair (a :class:`~.data.PairSample`): each configuration with the partner image swapped in
    (one sample) and, for a logit difference, the pair's counterfactual answer as the contrast; else unchanged."""
    if not hasattr(item, "counterfactual_image"):
        return list(configs)
    from dataclasses import replace

    from ..corruptions.kinds import ImageSwap
    from ..datasets.subsets import open_image

    swap = ImageSwap(open_image(item.counterfactual_image))
    return [replace(c, corruption=swap, samples=1, corrupt=c.corrupt if not stages.of(c.corrupt).text else "image",
                    contrast=item.counterfactual_answer if c.metric == "logit_diff" else c.contrast) for c in configs]


def manifest(bundle: BlipBundle, configs: Sequence[TraceConfig], answer: str,
             dataset: dict[str, Any] | None = None) -> dict[str, Any]:
    """What defines a sweep's rows; a resumed sweep must match it. ``dataset`` says where the questions
    came from (the command line records the subset, limit and filters); each part also records the
    identity of its question (:func:`question_id`), checked on resume."""
    return {"model": bundle.name, "dtype": str(bundle.dtype).replace("torch.", ""), "answer": answer,
            "configs": [config.to_json() for config in configs], "dataset": dataset}


def question_id(image: Any, question: str, expected: str | None) -> str:
    """A question's identity by its content: the image's pixels, the question and the expected answer."""
    import hashlib

    text = json.dumps([image_digest(image), question, expected])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _write_atomically(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
    os.close(handle)
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _part_path(out: Path, sample: int) -> Path:
    return out / PARTS / f"sample-{sample:07d}.parquet"


def _sample_rows(tracer: Tracer, sample: int, item: VQASample, picture_id: str,
                 configs: Sequence[TraceConfig], answer: str) -> list[dict[str, Any]]:
    rows = []
    model_answer = tracer.model_answer
    for index, config in enumerate(pair_configs(configs, item)):
        scored = tracer.task.sweep_answer(item, answer, sample)
        if config.word is not None and config.word >= len(tracer.caption_words(scored)):
            continue  # this caption has no word at that index
        result = tracer.trace(config, answer=scored)
        rows.append({
            "sample": sample, "image_id": picture_id, "question": tracer.question, "expected": item.answer,
            "model_answer": model_answer,
            "correct": tracer.task.correct(model_answer, item.answer),
            "config": index, "block": config.block, "kind": config.kind, "window": int(config.window),
            "corruption": json.dumps({"type": "image_pair"} if hasattr(item, "counterfactual_image")  # one group
                                     else result.config["corruption"], sort_keys=True),
            "partner_image": result.config["corruption"].get("image_sha1") if hasattr(item, "counterfactual_image")
            else None,
            "noise_samples": int(config.samples), "seed": int(config.seed), "metric": config.metric,
            "sever": config.sever, "sever_at": config.sever_at, "fresh_noise": config.fresh_noise,
            "method": config.method, "steps": int(config.steps), "head": tracer.head,
            "word": result.config.get("word"),  # a captioner's scored word (its first content word by default)
            "answer": result.answer, "scored": answer, "tokens": list(result.tokens),
            "roles": position_roles(config.block, result.tokens, kind=config.kind), "scores": result.scores.tolist(),
            "stderr": (result.stderr if result.stderr is not None else np.full_like(result.scores, np.nan)).tolist(),
            "low_score": result.low_score, "high_score": result.high_score, "total_effect": result.total_effect,
            "num_layers": result.num_layers, "model": tracer.bundle.name,
            "grid": json.dumps(result.config["grid"]) if "grid" in result.config else None,
            "dtype": result.config["dtype"], "direction": config.direction,
            "counterfactual_answer": getattr(item, "counterfactual_answer", None),
            "contrast": result.config.get("contrast_answer"),
        })
    return rows


def _to_frame(rows: list[dict[str, Any]]):
    import pandas as pd

    frame = pd.DataFrame.from_records(rows)
    for column in ("expected", "sever", "correct", "grid", "word"):
        frame[column] = frame[column].astype(object)
    return frame


def read_parts(out: str | os.PathLike, indices: Iterable[int] | None = None):
    """The finished questions' rows so far (those of ``indices`` only, when given), in question and
    configuration order."""
    import pandas as pd

    if indices is None:
        paths = sorted((Path(out) / PARTS).glob("sample-*.parquet"))
    else:
        paths = [p for p in (_part_path(Path(out), i) for i in indices) if p.is_file()]
    if not paths:
        return pd.DataFrame()
    frame = pd.concat([upgrade_table(pd.read_parquet(p)) for p in paths], ignore_index=True)
    return frame.sort_values(["sample", "config"], kind="stable").reset_index(drop=True)


def load_sweep(out: str | os.PathLike):
    """The merged table of a finished sweep (or the parts of an unfinished one)."""
    import pandas as pd

    path = Path(out) / TABLE
    return upgrade_table(pd.read_parquet(path)) if path.is_file() else read_parts(out)


def result_from_row(row: Any) -> TraceResult:
    """One table row back as a :class:`TraceResult` (to plot a single sample's heatmap)."""
    get = row.__getitem__ if hasattr(row, "__getitem__") else lambda k: getattr(row, k)
    return TraceResult(
        scores=np.asarray([list(r) for r in get("scores")]), low_score=get("low_score"), high_score=get("high_score"),
        answer=get("answer"), tokens=list(get("tokens")), block=get("block"), kind=get("kind"),
        window=int(get("window")), config={"question": get("question"), "metric": get("metric"),
                                           "corruption": json.loads(get("corruption")), "sever": get("sever"),
                                           "method": _optional(get, "method", "exact"),
                                           "steps": int(_optional(get, "steps", 1)),
                                           "head": _optional(get, "head", VQA), "word": _optional(get, "word", None),
                                           "direction": _optional(get, "direction", "denoise")},
    )


def _optional(get: Any, column: str, default: Any) -> Any:
    """A column that tables written before it existed lack."""
    try:
        value = get(column)
    except (KeyError, AttributeError):
        return default
    return default if value is None else value


def _read_manifest(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BlipTraceError(f"{path} is damaged ({error}); delete it, or rerun with --overwrite "
                             "(overwrite=True) to start the sweep again") from None


def _upgrade_manifest(found: Any) -> Any:
    """An older sweep's manifest in today's names (a caption's ``target`` is its ``word``), so that it resumes."""
    for config in found.get("configs", []) if isinstance(found, dict) else []:
        if isinstance(config, dict) and "target" in config:
            config["word"] = config.pop("target")
    return found


def _differences(found: Any, wanted: dict[str, Any]) -> str:
    if not isinstance(found, dict):
        return "the whole manifest"
    return ", ".join(key for key in wanted if found.get(key) != wanted[key]) or "its layout"


def _prepare(out: Path, wanted: dict[str, Any], overwrite: bool) -> None:
    """Check that ``out`` holds this sweep (or nothing), or clear it when ``overwrite``; write the manifest.

    Leftovers of a killed run (``.partial-*`` files) are removed.
    """
    for orphan in [*out.glob(".partial-*"), *(out / PARTS).glob(".partial-*")]:
        orphan.unlink(missing_ok=True)
    manifest_path = out / MANIFEST
    if manifest_path.is_file() and not overwrite:
        found = _upgrade_manifest(_read_manifest(manifest_path))
        if found != wanted:
            raise BlipTraceError(
                f"{out} holds a different sweep: its {MANIFEST} differs in {_differences(found, wanted)}; "
                "pick a new --out folder, or rerun with --overwrite (overwrite=True in Python) to start again"
            )
    elif manifest_path.is_file() or (out / PARTS).exists():
        for stale in (out / PARTS).glob("*.parquet"):
            stale.unlink()
        (out / TABLE).unlink(missing_ok=True)
    _write_atomically(manifest_path, lambda p: Path(p).write_text(json.dumps(wanted, indent=1) + "\n"))


def _finished(part: Path, qid: str, index: int, question: str, out: Path) -> bool:
    """Whether ``part`` already holds this question's rows. A damaged part is moved aside (and redone);
    a part that holds another question stops the sweep."""
    import pandas as pd

    if not part.is_file():
        return False
    try:
        found = pd.read_parquet(part, columns=["question_id", "question"])
        stored = str(found["question_id"].iloc[0])
    except Exception as error:  # a truncated or foreign file: pyarrow raises several types
        aside = out / DAMAGED / part.name
        aside.parent.mkdir(parents=True, exist_ok=True)
        part.replace(aside)
        warnings.warn(f"{part} was damaged ({type(error).__name__}); moved it to {aside} and tracing question "
                      f"{index} again", stacklevel=3)
        return False
    if stored != qid:
        raise BlipTraceError(
            f"{out} holds another question at position {index}: {str(found['question'].iloc[0])!r} there, "
            f"{question!r} here; pick a new --out folder, or rerun with --overwrite (overwrite=True) to start again")
    return True


def _run_shard(bundle: BlipBundle, samples: Iterable[Any], configs: Sequence[TraceConfig], out: Path, answer: str,
               shard: Shard, progress: bool, memory_budget: int) -> int:
    """Trace this process's questions that have no part yet, one part per question; returns how many
    questions the sweep has (this process's and the others')."""
    from tqdm.auto import tqdm

    total = len(range(shard.index, len(samples), shard.count)) if hasattr(samples, "__len__") else None  # type: ignore[arg-type]
    bar = tqdm(total=total, unit="sample", disable=not progress or None, position=shard.index,
               desc=f"sweep {shard.index + 1}/{shard.count}" if shard.count > 1 else "sweep")
    count = 0
    try:
        for index, item in enumerate(as_samples(samples)):
            count = index + 1
            if not shard.owns(index):
                continue
            picture = open_image(item.image)
            qid = question_id(picture, item.question, item.answer)
            part = _part_path(out, index)
            if not _finished(part, qid, index, item.question, out):
                tracer = Tracer(bundle, picture, text_of(bundle.head, item), memory_budget=memory_budget)
                rows = _sample_rows(tracer, index, item, image_id(item.image), configs, answer)
                if rows:  # none when every configuration asks for a caption word this caption lacks
                    frame = _to_frame([{**row, "question_id": qid} for row in rows])
                    _write_atomically(part, lambda p, frame=frame: frame.to_parquet(p, index=False))
            bar.update(1)
    finally:
        bar.close()
    return count


def sweep(
    bundle: BlipBundle,
    items: Iterable[Any] | None = None,
    *,
    configs: TraceConfig | Sequence[TraceConfig],
    out: str | os.PathLike,
    scored: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    shard: Shard | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    dataset: dict[str, Any] | None = None,
    samples: Iterable[Any] | None = None,
    answer: str | None = None,
):
    """Trace every configuration on every dataset item; returns the table (a pandas DataFrame).

    ``scored="model"`` (the default) scores the model's own first answer token (ROME's choice);
    ``"expected"`` scores the dataset's answer. ``correct`` records whether the model's
    answer matches the expected one, for averages over correctly answered items. (``samples=`` and
    ``answer=`` are the old names of ``items=`` and ``scored=``: they still work, with a warning.)
    """
    import pandas as pd

    items = renamed(items, samples, "samples", "items")
    answer = renamed(scored, answer, "answer", "scored") or "model"
    if items is None:
        raise BlipTraceError("sweep needs the dataset's items: sweep(bundle, items, configs=..., out=...)")
    if not isinstance(bundle, BlipBundle):
        raise BlipTraceError("pass the bundle returned by load_model(...), not a bare model")
    if answer not in ANSWER_MODES:
        raise BlipTraceError(f"scored must be 'model' or 'expected', got {answer!r}")
    configs = _check_configs(configs)
    out = Path(out)
    group = ProcessGroup()
    shard = shard or group.shard
    if group.is_main:
        _prepare(out, manifest(bundle, configs, answer, dataset), overwrite)
    group.wait()
    count = _run_shard(bundle, items, configs, out, answer, shard, progress, memory_budget)
    group.wait()
    if group.is_main:
        table = read_parts(out, range(count))  # only this sweep's questions: strays are not merged
        _write_atomically(out / TABLE, lambda p: table.to_parquet(p, index=False))
    group.wait()
    return pd.read_parquet(out / TABLE)
