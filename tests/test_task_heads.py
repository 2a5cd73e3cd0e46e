"""BLIP's task heads as classes (heads.py): picked from the model once, and the only place heads differ."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from fast_subset import lengthy
from tiny_blip import tiny_captioner, tiny_matcher, tiny_model, tiny_processor

from blip_trace_widgets import Tracer, load_model
from blip_trace_widgets.core.errors import BlipTraceError
from blip_trace_widgets.models import heads as H

PACKAGE = Path(__file__).resolve().parents[1] / "blip_trace_widgets"


def test_no_module_branches_on_the_head_name():
    """Heads differ only in heads.py: no other module compares a head's name (names.py only names them)."""
    branch = re.compile(r"head ==|head !=|\.head in|HEAD_INFO")
    offenders = [f"{p.name}:{i}" for p in PACKAGE.rglob("*.py") if p.name not in ("heads.py", "names.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if branch.search(line)]
    assert not offenders, f"branches on a head's name outside heads.py: {offenders}"


HEAD_CLASSES = ("Head", "VqaHead", "CaptionHead", "ItmHead", "Blip2Head", "InstructBlipHead", "Blip2T5Head", "InstructBlipT5Head")


def head_isinstance(source: str) -> list[int]:
    """Lines of ``isinstance(x, <a head class>)``: a question the head should answer itself."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance" and len(node.args) == 2:
            names = {getattr(n, "id", None) or getattr(n, "attr", None) for n in ast.walk(node.args[1])}
            if names & set(HEAD_CLASSES):
                found.append(node.lineno)
    return found


@lengthy
def test_no_module_asks_a_head_its_class():
    """What differs between heads is a head method or attribute: no ``isinstance(task, CaptionHead)`` outside
    heads.py."""
    offenders = [f"{p.relative_to(PACKAGE)}:{line}" for p in PACKAGE.rglob("*.py") if p.name != "heads.py"
                 for line in head_isinstance(p.read_text())]
    assert not offenders, f"isinstance on a head outside heads.py (make it a head method): {offenders}"
    assert head_isinstance("isinstance(task, heads.CaptionHead)\nisinstance(x, int)") == [1]


@pytest.mark.parametrize("make,cls", [(tiny_model, H.VqaHead), (tiny_captioner, H.CaptionHead),
                                      (tiny_matcher, H.ItmHead)])
def test_the_head_is_picked_from_the_model_class(make, cls, image):
    bundle = load_model((make(), tiny_processor()), device="cpu")
    assert isinstance(H.of(bundle.model), cls) and isinstance(H.of(bundle), cls)
    tracer = Tracer(bundle, image, "a red circle")
    assert tracer.task is H.of(cls.name) and tracer.head == cls.name
    assert tracer.blocks.reader.name == cls.blocks[0] == H.BLOCKS_OF[cls.name][0]


def test_an_unknown_head_or_model_is_refused_by_name():
    with pytest.raises(BlipTraceError, match="unknown head 'ocr': use one of vqa, caption, itm"):
        H.of("ocr")
    with pytest.raises(BlipTraceError, match="expected a transformers BLIP model"):
        H.of(object())


def test_what_the_model_says_is_one_method_for_the_cli_and_the_widgets(demo_bundle, demo_sample):
    from blip_trace_widgets.causal_trace.command import what_the_model_says
    from blip_trace_widgets.widgets import answer_html

    image, question, _ = demo_sample
    tracer = Tracer(demo_bundle, image, question)
    assert what_the_model_says(tracer) == f"question: {question}\nmodel's answer: 'red'"
    assert answer_html(tracer) == "model's answer: <b>red</b>"

    class Terse(H.VqaHead):  # a head's class alone decides what is said, everywhere
        said = "says"

    tracer.clean_pass.task = Terse()
    assert what_the_model_says(tracer).endswith("\nsays: 'red'")
    assert answer_html(tracer) == "says: <b>red</b>"


@lengthy
def test_captioner_and_matcher_say_their_own(image):
    captioner = Tracer(load_model((tiny_captioner(), tiny_processor()), device="cpu"), image, "a picture of")
    said = H.of("caption").describe(captioner)
    assert said.startswith("prompt: 'a picture of'\nmodel's caption: ")
    assert H.of("caption").describe(captioner, html=True).startswith("model's caption: <b>a picture of")
    matcher = Tracer(load_model((tiny_matcher(), tiny_processor()), device="cpu"), image, "a red circle")
    assert re.fullmatch(r"text: a red circle\nmodel: (no )?match \(p\(match\) 0\.\d{4}\)", H.of("itm").describe(matcher))


def test_correctness_per_head():
    assert H.of("vqa").correct("Two.", "2") and H.of("vqa").correct("red", None) is None
    assert H.of("caption").correct("a red circle", "a red circle")
    # a matcher's item is its image's own caption: a match is correct, whatever the caption says
    assert H.of("itm").correct("match", "a red circle") and not H.of("itm").correct("no match", "a red circle")


@pytest.mark.parametrize("name,field,message", [
    ("vqa", {"target": 1}, "word picks a word of a caption"),
    ("itm", {"answer": "yes"}, "scores the match of the text itself"),
    ("itm", {"metric": "logit_diff", "contrast": "no"}, "does not apply to an image-text matching model"),
    ("caption", {"metric": "itc"}, "does not apply to a captioning model"),
])
def test_each_head_refuses_what_means_nothing_for_it(name, field, message):
    from blip_trace_widgets import TraceConfig

    config = TraceConfig(block=H.of(name).default_block, **field)
    with pytest.raises(BlipTraceError, match=message):
        H.of(name).check(config)


def test_metric_labels_name_what_each_head_scores():
    assert [H.metric_label("prob", name) for name in H.BY_NAME] == ["p(answer)", "p(caption word)", "p(match)", "p(answer)",
                                                                     "p(answer)", "p(answer)", "p(answer)"]
