"""Bad invocations of blip-trace: each exits with status 2 and one line on stderr, never a traceback."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fast_subset import lengthy, lengthy_except
from PIL import Image

from blip_trace_widgets import cli, demo_samples
from blip_trace_widgets.models.loading import DEMO_MODEL_DIR


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    image = root / "shape.png"
    demo_samples()[0].image.save(image)
    text = root / "notes.txt"
    text.write_text("not an image")
    occupied = root / "occupied"
    occupied.write_text("a file where --out wants a folder")
    damaged = root / "damaged-model"
    shutil.copytree(DEMO_MODEL_DIR, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    negative = root / "negative-noise-model"
    shutil.copytree(DEMO_MODEL_DIR, negative)
    (negative / "trace_defaults.json").write_text(json.dumps({"noise_scale": -5}))
    blank = root / "blank.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(blank)
    return {"image": str(image), "text": str(text), "occupied": str(occupied), "damaged": str(damaged),
            "negative": str(negative), "root": str(root)}


def trace(files, *extra):
    return ["trace", "--image", files["image"], "--question", "what is the color of the triangle?",
            "--out", files["root"] + "/out", *extra]


BAD = {
    "no image": lambda f: ["trace", "--question", "what?", "--out", f["root"]],
    "missing image": lambda f: ["trace", "--image", f["root"] + "/nope.png", "--question", "what?", "--out", f["root"]],
    "not an image": lambda f: ["trace", "--image", f["text"], "--question", "what?", "--out", f["root"]],
    "empty question": lambda f: ["trace", "--image", f["image"], "--question", "  ", "--out", f["root"]],
    "unknown kind": lambda f: trace(f, "--kind", "attention"),
    "unknown block": lambda f: trace(f, "--block", "vision"),
    "window 0": lambda f: trace(f, "--window", "0"),
    "window 99": lambda f: trace(f, "--window", "99"),
    "samples 0": lambda f: trace(f, "--samples", "0"),
    "samples 10**5": lambda f: trace(f, "--samples", "100000"),
    "negative seed": lambda f: trace(f, "--seed", "-1"),
    "seed past 2**32": lambda f: trace(f, "--seed", str(2**40)),
    "unknown noise": lambda f: trace(f, "--noise", "pink"),
    "infinite scale": lambda f: trace(f, "--noise", "gaussian", "--scale", "inf"),
    "negative scale": lambda f: trace(f, "--noise", "gaussian", "--scale", "-3"),
    "nan scale": lambda f: trace(f, "--noise", "uniform", "--scale", "nan"),
    "scale without noise": lambda f: trace(f, "--scale", "3"),
    "logit_diff without contrast": lambda f: trace(f, "--metric", "logit_diff"),
    "unknown answer word": lambda f: trace(f, "--answer", "zzqxj"),
    "corrupt token out of range": lambda f: trace(f, "--corrupt", "question", "--corrupt-tokens", "99"),
    "corrupt tokens not numbers": lambda f: trace(f, "--corrupt", "question", "--corrupt-tokens", "a,b"),
    "corrupt tokens without question": lambda f: trace(f, "--corrupt-tokens", "1"),
    "regions on a text block": lambda f: trace(f, "--regions", "3"),
    "vision block, image stage": lambda f: trace(f, "--block", "vision_encoder", "--corrupt", "image"),
    "sever with a sublayer kind": lambda f: trace(f, "--sever", "mlp", "--kind", "mlp"),
    "unknown sever_at": lambda f: trace(f, "--sever", "mlp", "--sever-at", "nowhere"),
    "blur on image embeddings": lambda f: trace(f, "--noise", "blur", "--corrupt", "image"),
    "mistyped model name": lambda f: trace(f, "--model", "nosuchmodel"),
    "missing model folder": lambda f: trace(f, "--model", f["root"] + "/no/such/folder/"),
    "damaged weights": lambda f: trace(f, "--model", f["damaged"]),
    "negative noise in trace_defaults.json": lambda f: trace(f, "--model", f["negative"]),
    "cuda without a GPU": lambda f: trace(f, "--device", "cuda"),
    "meta device": lambda f: trace(f, "--device", "meta"),
    "unknown dtype": lambda f: trace(f, "--dtype", "int8"),
    "out is a file": lambda f: ["trace", "--image", f["image"], "--question", "what is the color of the triangle?",
                                "--out", f["occupied"] + "/sub"],
    "unknown procedure": lambda f: trace(f, "--procedure", "mine"),
    "estimate with severing": lambda f: trace(f, "--method", "estimate", "--sever", "mlp"),
    "steps without an estimate": lambda f: trace(f, "--steps", "4"),
    "estimate of the paper's fresh noise": lambda f: trace(f, "--procedure", "paper", "--method", "estimate"),
    "sweep steps 0": lambda f: ["sweep", "--dataset", "easy-vqa-color", "--method", "estimate", "--steps", "0",
                                "--out", f["root"]],
    "sweep unknown kind": lambda f: ["sweep", "--dataset", "easy-vqa-color", "--kinds", "hidden,attention", "--out", f["root"]],
    "sweep limit 0": lambda f: ["sweep", "--dataset", "easy-vqa-color", "--limit", "0", "--out", f["root"]],
    "no command": lambda f: [],
    "caption word out of range": lambda f: ["trace", "--model", "demo-caption", "--image", f["image"], "--word", "9",
                                            "--out", f["root"] + "/out"],
    "caption word on a VQA model": lambda f: trace(f, "--word", "1"),
    "captioner with a question block": lambda f: ["trace", "--model", "demo-caption", "--image", f["image"],
                                                  "--block", "question_encoder", "--out", f["root"] + "/out"],
    "captioner, prompt swapped to another length": lambda f: [
        "trace", "--model", "demo-caption", "--image", f["image"], "--prompt", "a red", "--swap", "red=big blue",
        "--word", "0", "--out", f["root"] + "/out"],
    "caption of unknown words": lambda f: ["trace", "--model", "demo-caption", "--image", f["image"], "--answer",
                                           "a zzqxj circle", "--word", "1", "--out", f["root"] + "/out"],
    "matcher without a text": lambda f: ["trace", "--model", "demo-itm", "--image", f["image"], "--out", f["root"]],
    "matcher with an answer": lambda f: ["trace", "--model", "demo-itm", "--image", f["image"], "--text", "a red circle",
                                         "--answer", "red", "--out", f["root"] + "/out"],
    "ITC through the ITM encoder": lambda f: ["trace", "--model", "demo-itm", "--image", f["image"], "--text",
                                              "a red circle", "--metric", "itc", "--out", f["root"] + "/out"],
    "ITC on a VQA model": lambda f: trace(f, "--metric", "itc", "--block", "vision_encoder"),
    "caption sweep of questions": lambda f: ["sweep", "--model", "demo-caption", "--dataset", "easy-vqa-color",
                                             "--out", f["root"]],
    "VQA sweep of captions": lambda f: ["sweep", "--dataset", "easy-vqa-captions", "--out", f["root"]],
    "sweep targets on a VQA model": lambda f: ["sweep", "--dataset", "easy-vqa-color", "--targets", "1",
                                               "--out", f["root"]],
    "out names a file": lambda f: ["trace", "--image", f["image"], "--question", "what?", "--out", f["occupied"]],
    "image is a folder": lambda f: ["trace", "--image", f["root"], "--question", "what?", "--out", f["root"] + "/out"],
    "noise that overflows": lambda f: trace(f, "--noise", "gaussian", "--scale", "1e30", "--samples", "2"),
    "sweep targets no caption has": lambda f: ["sweep", "--model", "demo-caption", "--dataset", "easy-vqa-captions",
                                               "--limit", "2", "--targets", "50", "--samples", "1",
                                               "--out", f["root"] + "/sweep-targets"],
    "prompt too long": lambda f: ["trace", "--model", "demo-caption", "--image", f["image"], "--prompt",
                                  " ".join(["a"] * 40), "--out", f["root"] + "/out"],
    "sweep targets not numbers": lambda f: ["sweep", "--model", "demo-caption", "--dataset", "easy-vqa-captions",
                                            "--targets", "red", "--out", f["root"]],
}


#: The invocations refused only after a model loads or a trace starts (a quarter second and more each): the fast
#: subset keeps the others, the full suite runs them all.
LOADING = {
    "not an image", "empty question", "window 0", "window 99", "samples 0", "samples 10**5", "negative seed",
    "seed past 2**32", "infinite scale", "negative scale", "nan scale", "scale without noise",
    "logit_diff without contrast", "unknown answer word", "corrupt token out of range", "corrupt tokens not numbers",
    "corrupt tokens without question", "regions on a text block", "vision block, image stage",
    "sever with a sublayer kind", "blur on image embeddings", "damaged weights",
    "negative noise in trace_defaults.json", "cuda without a GPU", "meta device", "out is a file",
    "estimate with severing", "steps without an estimate", "estimate of the paper's fresh noise", "sweep steps 0",
    "sweep unknown kind", "sweep limit 0", "caption word out of range", "caption word on a VQA model",
    "captioner with a question block", "captioner, prompt swapped to another length", "caption of unknown words",
    "matcher without a text", "matcher with an answer", "ITC through the ITM encoder", "ITC on a VQA model",
    "caption sweep of questions", "VQA sweep of captions", "sweep targets on a VQA model", "noise that overflows",
    "sweep targets no caption has", "prompt too long", "sweep targets not numbers",
}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CUDA case needs a machine without a GPU")
@pytest.mark.parametrize("name", lengthy_except(list(BAD), *(name for name in BAD if name not in LOADING)))
def test_bad_invocation_is_one_line_and_exit_2(name, files, capsys):
    try:
        code = cli.main(BAD[name](files))
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    err = capsys.readouterr().err.strip()
    assert code == 2, (name, code, err)
    assert err.count("\n") == 0 and err.startswith("blip-trace"), (name, err)
    assert "Traceback" not in err


MESSAGES = {
    "out names a file": "is a file: name a folder",
    "image is a folder": "is a folder: name an image file",
    "noise that overflows": "not finite",
    "sweep targets no caption has": "made no trace: no caption has the words --caption-words 50",
    "prompt too long": "needs one for the caption: use at most",
    "matcher without a text": "--text is required",
}


@pytest.mark.parametrize("name", lengthy_except(list(MESSAGES), *(name for name in MESSAGES if name not in LOADING)))
def test_messages_name_what_is_wrong(name, files, capsys):
    try:
        cli.main(BAD[name](files))
    except SystemExit:
        pass
    assert MESSAGES[name] in capsys.readouterr().err, name


def test_there_are_at_least_thirty_bad_invocations():
    assert len(BAD) >= 30


def test_a_broken_pipe_ends_quietly(files, monkeypatch, capsys):
    def broken(_args):
        raise BrokenPipeError

    monkeypatch.setattr(cli, "build_parser", _parser_calling(broken))
    assert cli.main(["x"]) == 0


def _parser_calling(run):
    import argparse

    parser = argparse.ArgumentParser()
    parser.set_defaults(run=run)
    parser.add_argument("rest", nargs="*")
    return lambda: parser


def test_an_internal_key_error_keeps_its_traceback(files, monkeypatch):
    def bug(_args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "build_parser", _parser_calling(bug))
    with pytest.raises(KeyError):
        cli.main(["x"])


def test_a_plain_value_error_from_inside_is_a_bug_with_its_traceback(files, monkeypatch):
    """Only BlipTraceError is a user's mistake: a ValueError from torch or numpy inside is a bug, not one line."""
    def bug(_args):
        raise ValueError("shapes (2,3) and (4,5) not aligned")

    monkeypatch.setattr(cli, "build_parser", _parser_calling(bug))
    with pytest.raises(ValueError, match="not aligned"):
        cli.main(["x"])


@lengthy
def test_every_check_in_the_package_raises_blip_trace_error():
    import ast
    from pathlib import Path

    plain = []
    for path in sorted((Path(cli.__file__).parent).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and \
                    getattr(node.exc.func, "id", None) == "ValueError":
                plain.append(f"{path.name}:{node.lineno}")
    assert not plain, f"raise BlipTraceError (a ValueError that names the fix) instead: {plain}"


@pytest.mark.parametrize("planted", [RuntimeError("planted bug"), ValueError("a bug inside torch")])
@lengthy
def test_an_internal_error_keeps_its_traceback(planted, files, monkeypatch, capsys):
    """Only a user's mistake (BlipTraceError, a missing file) is one line: a bug, even a plain ValueError from inside
    torch, propagates with its traceback instead of passing for bad input."""
    from blip_trace_widgets.causal_trace import tracer as tracing

    def broken(*args, **kwargs):
        raise planted

    monkeypatch.setattr(tracing.Tracer, "trace", broken)
    with pytest.raises(type(planted), match=str(planted)):
        cli.main(["trace", "--model", "demo", "--image", files["image"], "--question", "what color is the shape?",
                  "--samples", "1", "--out", files["root"] + "/out"])
    assert "blip-trace: error" not in capsys.readouterr().err
