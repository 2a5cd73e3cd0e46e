"""Question sets: the paper's CSV formats (own small fixtures), downloads over loopback, HF datasets, iterables."""
from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import datasets
import numpy as np
import pytest
from fast_subset import lengthy
from PIL import Image

from blip_trace_widgets.datasets import subsets
from blip_trace_widgets.datasets.easy_vqa import VQASample
from blip_trace_widgets.datasets.subsets import ImageRef, as_samples, hf_samples, load_vqa_subset, open_image

COCO_CSV = """,train_image_id_count,question_count,answer_count
0,23004,what is the color of the horses,brown
1,220218,what is the color of the big character,purple
2,491525,what is the color of the dog,black
3,77,what is the color of the large wooden table,red
"""
CLEVR_CSV = (
    ",Image_IDs,Questions_Answers\n"
    "0,CLEVR_val_000145,\"[{'question': 'Is the large red cylinder right of the small green sphere?', 'answer': 1}, "
    "{'question': 'Is the small green sphere right of the large red cylinder?', 'answer': 0}]\"\n"
    "1,CLEVR_val_000187,\"[{'question': 'Is the cube behind the sphere?', 'answer': 1}]\"\n"
)


def _jpeg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 32, 3), value, dtype=np.uint8)).save(path, format="JPEG")


@pytest.fixture
def server(tmp_path):
    """A static file server on 127.0.0.1 standing in for the paper's repository and COCO's image server."""
    root = tmp_path / "served"
    (root / "Datasets").mkdir(parents=True)
    (root / "Datasets" / "color_coco_qa.csv").write_text(COCO_CSV)
    for value, image in enumerate((23004, 220218, 491525, 77)):
        _jpeg(root / "train2017" / f"{image:012d}.jpg", 40 * value)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@lengthy
def test_coco_subset_is_fetched_and_cached_over_http(server, tmp_path, monkeypatch):
    monkeypatch.setattr(subsets, "PAPER_DATA_URL", server + "/Datasets/")
    monkeypatch.setattr(subsets, "COCO_IMAGE_URL", server + "/train2017/{id:012d}.jpg")
    cache = tmp_path / "cache"
    samples = load_vqa_subset("coco-qa-color", cache_dir=cache)
    assert [s.question for s in samples][:2] == ["what is the color of the horses", "what is the color of the big character"]
    assert [s.answer for s in samples] == ["brown", "purple", "black", "red"]
    assert (cache / "paper-vqa-subsets" / "color_coco_qa.csv").read_text() == COCO_CSV
    image = open_image(samples[1].image)
    assert image.size == (32, 24) and image.getpixel((0, 0))[0] in range(35, 46)
    assert (cache / "coco" / "train2017" / "000000220218.jpg").is_file()
    # the cache answers once the server is gone
    monkeypatch.setattr(subsets, "PAPER_DATA_URL", "http://127.0.0.1:9/")
    monkeypatch.setattr(subsets, "COCO_IMAGE_URL", "http://127.0.0.1:9/{id:012d}.jpg")
    again = load_vqa_subset("coco-qa-color", cache_dir=cache, limit=2)
    assert open_image(again[1].image).size == (32, 24)


def test_words_filter_and_limit(tmp_path):
    csv = tmp_path / "color.csv"
    csv.write_text(COCO_CSV)
    seven = load_vqa_subset("coco-qa-color", csv_path=csv, cache_dir=tmp_path, words=7)
    assert [s.question for s in seven] == ["what is the color of the horses", "what is the color of the dog"]
    eight = load_vqa_subset("coco-qa-color", csv_path=csv, cache_dir=tmp_path, words=8)
    assert [s.question for s in eight] == ["what is the color of the big character"]
    assert len(load_vqa_subset("coco-qa-color", csv_path=csv, cache_dir=tmp_path, limit=3)) == 3


def test_local_image_dir_is_used_before_the_network(tmp_path, monkeypatch):
    monkeypatch.setattr(subsets, "COCO_IMAGE_URL", "http://127.0.0.1:9/{id:012d}.jpg")
    csv = tmp_path / "color.csv"
    csv.write_text(COCO_CSV)
    _jpeg(tmp_path / "coco" / "000000023004.jpg", 200)
    [first] = load_vqa_subset("coco-qa-color", csv_path=csv, image_dir=tmp_path / "coco", cache_dir=tmp_path, limit=1)
    assert open_image(first.image).getpixel((3, 3))[0] > 190


def test_offline_errors_say_what_is_missing_and_how_to_supply_it(tmp_path, monkeypatch):
    monkeypatch.setattr(subsets, "PAPER_DATA_URL", "http://127.0.0.1:9/")
    monkeypatch.setattr(subsets, "COCO_IMAGE_URL", "http://127.0.0.1:9/{id:012d}.jpg")
    with pytest.raises(RuntimeError) as missing_csv:
        load_vqa_subset("coco-qa-count", cache_dir=tmp_path)
    message = str(missing_csv.value)
    assert "count_coco_qa.csv" in message and "csv_path" in message and str(tmp_path) in message
    csv = tmp_path / "color.csv"
    csv.write_text(COCO_CSV)
    [sample] = load_vqa_subset("coco-qa-color", csv_path=csv, cache_dir=tmp_path, limit=1)
    with pytest.raises(RuntimeError) as missing_image:
        open_image(sample.image)
    assert "000000023004.jpg" in str(missing_image.value) and "image_dir" in str(missing_image.value)


def test_clevr_subset_format(tmp_path):
    csv = tmp_path / "clevr.csv"
    csv.write_text(CLEVR_CSV)
    with pytest.raises(ValueError, match="image_dir"):
        load_vqa_subset("clevr-spatial", csv_path=csv)
    Image.new("RGB", (48, 32), "gray").save(tmp_path / "CLEVR_val_000145.png")
    samples = load_vqa_subset("clevr-spatial", csv_path=csv, image_dir=tmp_path)
    assert [s.answer for s in samples] == ["yes", "no", "yes"]
    assert samples[1].question == "Is the small green sphere right of the large red cylinder?"
    assert open_image(samples[0].image).size == (48, 32)
    with pytest.raises(RuntimeError, match="CLEVR_val_000187.png"):
        open_image(samples[2].image)


def test_bad_names_and_arguments():
    with pytest.raises(ValueError, match="unknown subset"):
        load_vqa_subset("coco-colour")
    with pytest.raises(ValueError, match="limit"):
        load_vqa_subset("easy-vqa", limit=0)
    with pytest.raises(ValueError, match="csv_path"):
        load_vqa_subset("coco-qa-color", csv_path="/nonexistent.csv")


@lengthy
def test_easy_vqa_subsets_read_the_installed_package():
    shapes = load_vqa_subset("easy-vqa-shape", limit=5)
    assert all(s.answer in ("circle", "rectangle", "triangle") for s in shapes)
    yes_no = load_vqa_subset("easy-vqa-yes-no", limit=5)
    assert all(s.answer in ("yes", "no") for s in yes_no)
    assert isinstance(shapes[0].image, ImageRef) and open_image(shapes[0].image).size == (64, 64)


def _images(n):
    return [Image.new("RGB", (16, 16), (20 * i, 0, 0)) for i in range(n)]


def test_hf_dataset_with_a_column_mapping_and_streaming():
    ds = datasets.Dataset.from_dict(
        {"img": _images(3), "query": ["what color?", "what shape?", "is it red?"], "label": ["red", "circle", "yes"]}
    ).cast_column("img", datasets.Image())
    eager = list(hf_samples(ds, image="img", question="query", answer="label"))
    streamed = list(hf_samples(ds.to_iterable_dataset(), image="img", question="query", answer="label", limit=2))
    assert [s.question for s in eager] == ["what color?", "what shape?", "is it red?"]
    assert [s.answer for s in streamed] == ["red", "circle"]
    assert open_image(streamed[1].image).getpixel((0, 0)) == (20, 0, 0)
    with pytest.raises(ValueError, match="image='img'"):
        list(hf_samples(ds))


def test_cauldron_layout_is_recognised():
    ds = datasets.Dataset.from_dict({
        "images": [[im] for im in _images(2)],
        "texts": [
            [{"user": "What is the color of the bus?\nAnswer the question using a single word or phrase.",
              "assistant": "Red.", "source": "cocoqa"},
             {"user": "How many dogs are there?", "assistant": "Answer: Two", "source": "cocoqa"}],
            [{"user": "Is the cube left of the sphere?", "assistant": "yes", "source": "clevr"}],
        ],
    })
    samples = list(hf_samples(ds))
    rows = [ds[i] for i in range(len(ds))]
    streamed = datasets.IterableDataset.from_generator(lambda: iter(rows))  # no features known up front
    assert [(s.question, s.answer) for s in hf_samples(streamed)] == [(s.question, s.answer) for s in samples]
    assert [(s.question, s.answer) for s in samples] == [
        ("What is the color of the bus?", "red"), ("How many dogs are there?", "two"),
        ("Is the cube left of the sphere?", "yes")]


def test_hub_failure_is_one_clear_error(monkeypatch):
    def refuse(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceM4/the_cauldron' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(RuntimeError, match="Connect to the internet, or pass a local datasets.Dataset"):
        load_vqa_subset("cauldron-cocoqa", limit=2)


def test_any_iterable_of_tuples_or_dicts():
    image = Image.new("RGB", (8, 8))
    items = list(as_samples([(image, "what?"), (image, "which?", "red"), {"image": image, "question": "is it?"},
                             VQASample(image, "where?", "left")]))
    assert [s.answer for s in items] == [None, "red", None, "left"]
    with pytest.raises(ValueError, match="sample 0"):
        list(as_samples(["just a string"]))


@lengthy
def test_fetched_files_are_checksummed_and_a_changed_one_is_fetched_again(server, tmp_path, monkeypatch):
    monkeypatch.setattr(subsets, "PAPER_DATA_URL", server + "/Datasets/")
    monkeypatch.setattr(subsets, "COCO_IMAGE_URL", server + "/train2017/{id:012d}.jpg")
    cache = tmp_path / "cache"
    samples = load_vqa_subset("coco-qa-color", cache_dir=cache)
    open_image(samples[0].image)
    image = cache / "coco" / "train2017" / "000000023004.jpg"
    assert (image.parent / (image.name + ".sha256")).is_file()
    image.write_bytes(image.read_bytes()[:50])  # damaged on disk since it was fetched
    with pytest.warns(UserWarning, match="no longer matches"):
        assert open_image(samples[0].image).size == (32, 24)  # fetched again
    assert (image.parent / (image.name + ".damaged")).is_file()


def test_coco_images_are_fetched_over_https():
    assert subsets.COCO_IMAGE_URL.startswith("https://") and subsets.PAPER_DATA_URL.startswith("https://")
