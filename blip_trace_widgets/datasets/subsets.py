"""Question sets for sweeps: the paper's subsets, Hugging Face datasets and plain iterables.

    >>> from blip_trace_widgets.datasets.subsets import load_vqa_subset
    >>> samples = load_vqa_subset("easy-vqa-color", limit=3)
    >>> len(samples), samples[0].question
    (3, 'what is the color of the triangle?')
    >>> samples[0].image.open().size
    (64, 64)

Every loader returns :class:`~blip_trace_widgets.datasets.easy_vqa.VQASample` items whose image is
an :class:`ImageRef`: a file that is read (and for COCO, downloaded into the cache)
only when a sweep reaches it, so skipping finished samples costs nothing.

The paper's subsets (``coco-qa-color``, ``coco-qa-count``, ``coco-qa-location``,
``clevr-spatial``) are the CSV files of its public repository, fetched on first use
and cached; COCO images are fetched by id from COCO's image server and cached too.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..core.errors import BlipTraceError, UnavailableError
from ..core.inputs import image_digest, to_rgb_image
from .easy_vqa import VQASample, check_limit, easy_vqa_captions, easy_vqa_questions, question_type

#: Folder of the paper's CSVs (its repository's ``Datasets/``), read over HTTP(S);
#: ``$BLIP_TRACE_PAPER_DATA_URL`` overrides it (a mirror).
PAPER_DATA_URL = (
    "https://raw.githubusercontent.com/vedantpalit/Towards-Vision-Language-Mechanistic-Interpretability/HEAD/Datasets/"
)
#: COCO images by zero-padded id, over https (the paper's notebook used http; the COCO-QA questions use
#: train2017 ids);
#: ``$BLIP_TRACE_COCO_IMAGE_URL`` overrides it.
COCO_IMAGE_URL = "https://images.cocodataset.org/train2017/{id:012d}.jpg"

PAPER_FILES: dict[str, str] = {
    "coco-qa-color": "color_coco_qa.csv",
    "coco-qa-count": "count_coco_qa.csv",
    "coco-qa-location": "location_coco_qa.csv",
    "clevr-spatial": "clevr_vqa_dataset_3.csv",
}
EASY_VQA_SUBSETS: dict[str, str | None] = {
    "easy-vqa": None, "easy-vqa-color": "color", "easy-vqa-shape": "shape", "easy-vqa-yes-no": "yes/no",
}
#: Captioning subsets: samples are (image, prompt "", reference caption).
CAPTION_SUBSETS: tuple[str, ...] = ("easy-vqa-captions",)
CAULDRON = "HuggingFaceM4/the_cauldron"
CAULDRON_SUBSETS: dict[str, str] = {"cauldron-cocoqa": "cocoqa", "cauldron-clevr": "clevr"}
SUBSETS: tuple[str, ...] = (*PAPER_FILES, *EASY_VQA_SUBSETS, *CAPTION_SUBSETS, *CAULDRON_SUBSETS)
DOWNLOAD_TIMEOUT_S = 30.0


def default_cache_dir() -> Path:
    """``$BLIP_TRACE_CACHE``, else ``$XDG_CACHE_HOME/blip-trace-widgets`` (``~/.cache`` by default)."""
    if os.environ.get("BLIP_TRACE_CACHE"):
        return Path(os.environ["BLIP_TRACE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "blip-trace-widgets"


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached(path: Path) -> bool:
    """Whether ``path`` holds a file fetched earlier, unchanged since: its checksum, recorded when it was
    downloaded, still matches. A file that no longer matches is moved aside (``.damaged``) and counts as missing."""
    if not path.is_file():
        return False
    record = _checksum_path(path)
    if not record.is_file():
        return True  # supplied by hand (or cached before checksums): trusted as it is
    if record.read_text().strip() == _sha256(path):
        return True
    import warnings

    path.replace(path.with_name(path.name + ".damaged"))
    warnings.warn(f"{path} no longer matches the checksum recorded when it was downloaded; moved it aside "
                  "and fetching it again", stacklevel=2)
    return False


def download(url: str, destination: Path, *, what: str, how_to_supply: str) -> Path:
    """Fetch ``url`` into ``destination`` atomically, with its sha256 beside it (``.sha256``), checked on reuse
    by :func:`cached`; a failure says what is missing and how to supply it."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            handle, partial = tempfile.mkstemp(dir=destination.parent, prefix=".download-")
            with os.fdopen(handle, "wb") as out:
                shutil.copyfileobj(response, out)
        _checksum_path(destination).write_text(_sha256(Path(partial)) + "\n")
        os.replace(partial, destination)
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise UnavailableError(
            f"{what} is not cached at {destination} and could not be downloaded from {url} ({reason}); "
            f"{how_to_supply}"
        ) from None
    return destination


@dataclass(frozen=True)
class ImageRef:
    """An image file read on demand; with ``url`` it is downloaded to ``path`` the first time."""

    path: Path
    label: str
    url: str | None = None
    how_to_supply: str = ""

    def open(self) -> Image.Image:
        if not cached(self.path):
            if self.url is None:
                raise UnavailableError(f"{self.label}: {self.path} not found; {self.how_to_supply}".rstrip("; "))
            download(self.url, self.path, what=self.label, how_to_supply=self.how_to_supply)
        return to_rgb_image(self.path)


def open_image(image: Any) -> Image.Image:
    """The RGB image of a sample: an :class:`ImageRef` is opened, anything else goes through ``to_rgb_image``."""
    return image.open() if isinstance(image, ImageRef) else to_rgb_image(image)


def image_id(image: Any) -> str:
    """A short stable name for a sample's image: the reference's label, or a hash of the pixels."""
    if isinstance(image, ImageRef):
        return image.label
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    pixels = to_rgb_image(image)
    return "sha1:" + image_digest(pixels)[:16]


def _paper_csv(name: str, cache_dir: Path, csv_path: str | os.PathLike | None) -> Path:
    if csv_path is not None:
        path = Path(csv_path)
        if not path.is_file():
            raise BlipTraceError(f"csv_path {str(path)!r} does not exist; pass the paper's {PAPER_FILES[name]}")
        return path
    path = cache_dir / "paper-vqa-subsets" / PAPER_FILES[name]
    if not cached(path):
        base = os.environ.get("BLIP_TRACE_PAPER_DATA_URL") or PAPER_DATA_URL
        download(
            base + PAPER_FILES[name], path, what=f"the paper's {PAPER_FILES[name]}",
            how_to_supply=f"connect to the internet, copy the file to {path}, or pass "
                          f"csv_path='.../{PAPER_FILES[name]}' (blip-trace sweep --csv)",
        )
    return path


def _word_count(question: str) -> int:
    return len(question.split())


def _coco_samples(csv: Path, cache_dir: Path, image_dir: Path | None) -> Iterator[VQASample]:
    import pandas as pd

    frame = pd.read_csv(csv)
    expected = {"train_image_id_count", "question_count", "answer_count"}
    if not expected <= set(frame.columns):
        raise BlipTraceError(f"{csv} is not a COCO-QA subset of the paper: it needs the columns {sorted(expected)}")
    hint = (
        "connect to the internet once to fill the cache, copy COCO train2017 images there, "
        "or pass image_dir= a folder of COCO train2017 images (blip-trace sweep --image-dir)"
    )
    url = os.environ.get("BLIP_TRACE_COCO_IMAGE_URL") or COCO_IMAGE_URL
    for image, question, answer in zip(frame["train_image_id_count"], frame["question_count"], frame["answer_count"]):
        name = f"{int(image):012d}.jpg"
        local = image_dir / name if image_dir is not None and (image_dir / name).is_file() else None
        ref = ImageRef(
            path=local or cache_dir / "coco" / "train2017" / name, label=f"COCO image {name}",
            url=None if local else url.format(id=int(image)), how_to_supply=hint,
        )
        yield VQASample(ref, str(question).strip(), str(answer).strip())


def _clevr_samples(csv: Path, image_dir: Path | None) -> Iterator[VQASample]:
    import pandas as pd

    if image_dir is None:
        raise BlipTraceError(
            "clevr-spatial needs CLEVR's validation images, which are not served one by one: download "
            "CLEVR_v1.0 and pass image_dir='.../CLEVR_v1.0/images/val', or use 'cauldron-clevr' from the Hugging Face hub"
        )
    frame = pd.read_csv(csv)
    if not {"Image_IDs", "Questions_Answers"} <= set(frame.columns):
        raise BlipTraceError(f"{csv} is not the paper's CLEVR subset: it needs the columns Image_IDs and Questions_Answers")
    for image, pairs in zip(frame["Image_IDs"], frame["Questions_Answers"]):
        ref = ImageRef(path=Path(image_dir) / f"{image}.png", label=f"CLEVR image {image}.png",
                       how_to_supply=f"put CLEVR's validation images in {image_dir}")
        for pair in ast.literal_eval(pairs):
            yield VQASample(ref, str(pair["question"]).strip(), "yes" if int(pair["answer"]) else "no")


def _easy_vqa_samples(kind: str | None) -> Iterator[VQASample]:
    for path, question, answer in easy_vqa_questions("test"):
        if kind is None or question_type(answer) == kind:
            yield VQASample(ImageRef(Path(path), label=f"easy-VQA {Path(path).name}"), question, answer)


def _easy_vqa_caption_samples() -> Iterator[VQASample]:
    """easy-VQA test images with the captions their own questions settle (see :func:`~.data.easy_vqa_captions`)."""
    for path, caption in easy_vqa_captions("test"):
        yield VQASample(ImageRef(Path(path), label=f"easy-VQA {Path(path).name}"), "", caption)


def load_vqa_subset(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    words: int | None = None,
    csv_path: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
) -> list[VQASample]:
    """The samples of a named subset (see ``SUBSETS``), optionally only questions of ``words`` words, at most ``limit``.

    The paper averaged the first 200 colour questions of exactly 7 words:
    ``load_vqa_subset("coco-qa-color", words=7, limit=200)``.
    """
    if name not in SUBSETS:
        raise BlipTraceError(f"unknown subset {name!r}: use one of {', '.join(SUBSETS)}")
    limit = check_limit(limit)
    words = check_limit(words, "words")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = Path(image_dir) if image_dir is not None else None
    if name in EASY_VQA_SUBSETS:
        stream: Iterable[VQASample] = _easy_vqa_samples(EASY_VQA_SUBSETS[name])
    elif name in CAPTION_SUBSETS:
        stream = _easy_vqa_caption_samples()
    elif name in CAULDRON_SUBSETS:
        stream = hf_samples(CAULDRON, config=CAULDRON_SUBSETS[name], split="train", streaming=True)
    elif name == "clevr-spatial":
        stream = _clevr_samples(_paper_csv(name, cache, csv_path), folder)
    else:
        stream = _coco_samples(_paper_csv(name, cache, csv_path), cache, folder)
    picked = []
    for sample in stream:
        if words is None or _word_count(sample.question) == words:
            picked.append(sample)
            if limit is not None and len(picked) >= limit:
                break
    return picked


# ----- Hugging Face datasets and plain iterables ----------------------------------------------

def _clean_answer(text: str) -> str:
    text = re.sub(r"^answer:\s*", "", text.strip(), flags=re.IGNORECASE)
    return text.rstrip(".!").strip().lower()


def _cauldron_rows(row: Mapping[str, Any]) -> Iterator[tuple[Any, str, str]]:
    """The Cauldron keeps images in ``images`` and turns in ``texts`` ({user, assistant}); one sample per turn."""
    images = row["images"]
    if not images:
        return
    for turn in row["texts"]:
        question = str(turn["user"]).strip().split("\n")[0].strip()
        yield images[0], question, _clean_answer(str(turn["assistant"]))


def hf_samples(
    dataset: Any,
    *,
    config: str | None = None,
    split: str = "train",
    streaming: bool = True,
    image: str = "image",
    question: str = "question",
    answer: str | None = "answer",
    limit: int | None = None,
) -> Iterator[VQASample]:
    """Samples from a ``datasets`` dataset (or a hub id, loaded with ``streaming``), through a column mapping.

    The Cauldron's layout (``images`` and ``texts`` columns) is recognised without a mapping. A row without an image
    or a question is refused, naming it.
    """
    _check_dataset(dataset, "hf_samples")
    limit = check_limit(limit)
    return _hf_samples(dataset, config, split, streaming, image, question, answer, limit)


def _hf_samples(dataset: Any, config: str | None, split: str, streaming: bool, image: str, question: str,
                answer: str | None, limit: int | None) -> Iterator[VQASample]:
    if isinstance(dataset, str):
        dataset = _load_hf(dataset, config, split, streaming)
    columns = set(getattr(dataset, "column_names", None) or [])  # unknown for some streamed datasets
    count = 0
    for index, row in enumerate(dataset):
        _check_row(index, row)
        columns = columns or set(row)
        cauldron = {"images", "texts"} <= columns
        if not cauldron and not {image, question} <= columns:
            raise BlipTraceError(
                f"the dataset has columns {sorted(columns)}; name its image and question columns, "
                "e.g. hf_samples(ds, image='img', question='query', answer='label')"
            )
        if not cauldron:
            _require(index, row, [image, question])
        pairs = _cauldron_rows(row) if cauldron else [(row[image], row[question], row.get(answer) if answer else None)]
        for picture, text, expected in pairs:
            yield VQASample(picture, str(text), None if expected is None else str(expected))
            count += 1
            if limit is not None and count >= limit:
                return


def hf_pairs(
    dataset: Any,
    *,
    config: str | None = None,
    split: str = "train",
    streaming: bool = True,
    image: str = "image",
    counterfactual_image: str = "counterfactual_image",
    question: str = "question",
    answer: str = "answer",
    counterfactual_answer: str = "counterfactual_answer",
    limit: int | None = None,
) -> Iterator[Any]:
    """Semantic image pairs (:class:`~.data.PairSample`) from any ``datasets`` dataset (or a hub id) with columns for
    both images and both answers, named through the keywords. A row whose answers are equal is refused: it is no
    pair; so is a row without one of them, its question or an image, naming the row."""
    _check_dataset(dataset, "hf_pairs")
    limit = check_limit(limit)
    wanted = [image, counterfactual_image, question, answer, counterfactual_answer]
    return _hf_pairs(_hf_rows(dataset, config, split, streaming, limit, wanted,
                              "hf_pairs(ds, counterfactual_image='image_b')"), wanted)


def _hf_pairs(rows: Iterator[tuple[int, Any]], wanted: list[str]) -> Iterator[Any]:
    from .easy_vqa import PairSample

    image, counterfactual_image, question, answer, counterfactual_answer = wanted
    for count, row in rows:
        _require(count, row, wanted)
        if str(row[answer]).strip() == str(row[counterfactual_answer]).strip():
            raise BlipTraceError(f"row {count} gives both images the answer {row[answer]!r}: a pair's answers differ")
        yield PairSample(row[image], row[counterfactual_image], str(row[question]), str(row[answer]),
                         str(row[counterfactual_answer]))


def question_pairs(items: Iterable[Any], limit: int | None = None) -> list[Any]:
    """Image pairs from any question set: two items that ask the same question (compared in lower case, without
    surrounding punctuation) and that the dataset answers differently, as :class:`~.data.PairSample` items (the first
    item's image and answer, then the other's). Each item is used once, in order; an item without an answer is
    skipped; nothing is guessed.

        >>> from blip_trace_widgets.datasets.subsets import question_pairs
        >>> pairs = question_pairs([("a.png", "What colour is the dog?", "black"), ("b.png", "what colour is the dog",
        ...                         "black"), ("c.png", "what colour is the dog", "brown")])
        >>> [(p.image, p.counterfactual_image, p.answer, p.counterfactual_answer) for p in pairs]
        [('a.png', 'c.png', 'black', 'brown')]

    These pairs are looser than :func:`~.data.easy_vqa_pairs`'s: two photographs that answer "what is the color
    of the dog" differently differ in the dog's colour and in everything else in them too."""
    from .easy_vqa import PairSample

    limit = check_limit(limit)
    waiting: dict[str, list[VQASample]] = {}
    pairs: list[Any] = []
    for item in as_samples(items):
        if not item.answer:
            continue
        key = " ".join(item.question.lower().strip(" .?!").split())
        partner = next((other for other in waiting.get(key, []) if _answer_key(other.answer) != _answer_key(item.answer)),
                       None)
        if partner is None:
            waiting.setdefault(key, []).append(item)
            continue
        waiting[key].remove(partner)
        pairs.append(PairSample(partner.image, item.image, partner.question, str(partner.answer), str(item.answer),
                                (image_id(partner.image), image_id(item.image))))
        if limit is not None and len(pairs) >= limit:
            break
    return pairs


def _answer_key(answer: Any) -> str:
    return " ".join(str(answer).lower().strip(" .!?").split())


def hf_caption_samples(
    dataset: Any,
    *,
    config: str | None = None,
    split: str = "train",
    streaming: bool = True,
    image: str = "image",
    caption: str = "caption",
    prompt: str = "",
    limit: int | None = None,
) -> Iterator[VQASample]:
    """Captioning samples (image, ``prompt``, reference caption) from any ``datasets`` captioning dataset, by
    its column names; a column holding several captions per image gives its first. A row without an image or a
    caption is refused, naming it."""
    _check_dataset(dataset, "hf_caption_samples")
    limit = check_limit(limit)
    return _hf_captions(_hf_rows(dataset, config, split, streaming, limit, [image, caption],
                                 "hf_caption_samples(ds, image='img', caption='sentences')"), image, caption, prompt)


def _hf_captions(rows: Iterator[tuple[int, Any]], image: str, caption: str, prompt: str) -> Iterator[VQASample]:
    for count, row in rows:
        text = row[caption]
        if isinstance(text, (list, tuple)):
            text = text[0] if text else ""
        if isinstance(text, Mapping):  # e.g. {"raw": "..."}
            text = text.get("raw") or next(iter(text.values()), "")
        _require(count, {image: row[image], caption: text}, [image, caption])
        yield VQASample(row[image], prompt, str(text).strip())


def _check_dataset(dataset: Any, call: str) -> None:
    """Refuse, before reading a row, a ``dataset`` that is neither a hub id nor an iterable of rows."""
    if isinstance(dataset, str):
        if not dataset.strip():
            raise BlipTraceError(f"{call} needs a dataset: a datasets.Dataset, rows as dicts, or a hub id")
        return
    if isinstance(dataset, Mapping):  # a DatasetDict: its splits
        raise BlipTraceError(f"{call} reads one split, and this dataset has splits {sorted(map(str, dataset))}: pass "
                             "one, e.g. ds['train']")
    if isinstance(dataset, (bytes, bytearray)) or not isinstance(dataset, Iterable):
        raise BlipTraceError(f"{call} takes a datasets.Dataset, an iterable of rows (dicts of columns) or a hub id "
                             f"such as 'user/name', got {type(dataset).__name__} {dataset!r:.60}")


def _check_row(index: int, row: Any) -> None:
    if not isinstance(row, Mapping):
        raise BlipTraceError(f"row {index} of the dataset is {type(row).__name__} {row!r:.40}, not a row of named columns: pass "
                             "a datasets.Dataset or rows as dicts")


def _require(index: int, row: Mapping[str, Any], columns: Sequence[str]) -> None:
    """Refuse a row with no value (None or blank text) in one of ``columns``, naming the row and the column."""
    for column in columns:
        value = row[column]
        if value is None or (isinstance(value, str) and not value.strip()):
            raise BlipTraceError(f"row {index} has no {column!r} (it is {value!r}): fill it in, or leave the row out "
                                 f"(a datasets.Dataset: ds.filter(lambda row: row[{column!r}] is not None))")


def _hf_rows(dataset: Any, config: str | None, split: str, streaming: bool, limit: int | None,
             wanted: Sequence[str], example: str) -> Iterator[tuple[int, Any]]:
    """Each row of a ``datasets`` dataset (or a hub id, loaded), with its index, up to ``limit`` rows; a row without
    a ``wanted`` column is refused, naming the columns it has and ``example``, a call that names them."""
    if isinstance(dataset, str):
        dataset = _load_hf(dataset, config, split, streaming)
    for count, row in enumerate(dataset):
        _check_row(count, row)
        missing = [c for c in wanted if c not in row]
        if missing:
            raise BlipTraceError(f"the dataset's rows have no column {', '.join(map(repr, missing))} (they have "
                                 f"{sorted(row)}): name its columns, e.g. {example}")
        yield count, row
        if limit is not None and count + 1 >= limit:
            return


def _load_hf(path: str, config: str | None, split: str, streaming: bool) -> Any:
    import datasets

    try:
        return datasets.load_dataset(path, config, split=split, streaming=streaming)
    except Exception as error:  # datasets raises many types for a missing network or dataset
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UnavailableError(
            f"could not load the dataset {path!r} (config {config!r}, split {split!r}) from the Hugging Face hub: "
            f"{first}. Connect to the internet, or pass a local datasets.Dataset to hf_samples()"
        ) from None


def as_samples(items: Iterable[Any]) -> Iterator[VQASample]:
    """VQASamples from any iterable of samples, (image, question[, answer]) tuples or dicts with those keys."""
    for index, item in enumerate(items):
        if isinstance(item, VQASample) or hasattr(item, "counterfactual_image"):  # a PairSample reads as one too
            yield item
        elif isinstance(item, Mapping):
            if "image" not in item or "question" not in item:
                raise BlipTraceError(f"sample {index} is a dict without 'image' and 'question' keys")
            yield VQASample(item["image"], item["question"], item.get("answer"))
        elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
            yield VQASample(item[0], item[1], item[2] if len(item) == 3 else None)
        else:
            raise BlipTraceError(
                f"sample {index} is a {type(item).__name__}; pass (image, question) or (image, question, answer) "
                "tuples, dicts with those keys, or VQASample"
            )
