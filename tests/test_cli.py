"""The blip-trace command line, run as a user would: in a subprocess."""
from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from blip_trace_widgets import TraceResult, demo_samples
from blip_trace_widgets.causal_trace.plots import heatmap_png

pytestmark = pytest.mark.slow  # each test starts the command in a subprocess; test_cli_errors.py has the fast ones


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "blip_trace_widgets", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "sample.png"
    sample = demo_samples()[0]
    sample.image.save(path)
    return path, sample.question


def test_trace_writes_png_and_json(image_file, tmp_path):
    path, question = image_file
    out = run("trace", "--model", "demo", "--image", str(path), "--question", question, "--kind", "mlp",
              "--window", "3", "--noise", "multiplicative", "--samples", "3", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "model's answer" in out.stdout
    [js] = tmp_path.glob("*.json")
    [png] = tmp_path.glob("*.png")
    result = TraceResult.load(js)
    assert result.kind == "mlp" and result.window == 3 and result.config["samples"] == 3
    assert result.config["corruption"] == {"type": "multiplicative", "std": 5.0}
    with Image.open(png) as written:
        import io

        expected = Image.open(io.BytesIO(heatmap_png(result))).size
        assert written.size == expected and written.width > 200


def test_trace_estimate_says_so(image_file, tmp_path):
    path, question = image_file
    out = run("trace", "--model", "demo", "--image", str(path), "--question", question, "--method", "estimate",
              "--steps", "2", "--samples", "3", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    [js] = tmp_path.glob("*.json")
    result = TraceResult.load(js)
    assert result.is_estimate and result.config["steps"] == 2


def test_demo_command(tmp_path):
    out = run("demo", "--out", str(tmp_path / "o"), "--samples", "4")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("question:") == 3 and "model's answer" in out.stdout
    pngs, jsons = sorted((tmp_path / "o").glob("*.png")), sorted((tmp_path / "o").glob("*.json"))
    # a heatmap per trace, the image-side ones on the image too, and one captioning, one ITM and one BLIP-2 trace
    assert len(jsons) == 18 + 3 and len(pngs) == 18 + 3 + 3
    kinds = {(TraceResult.load(j).block, TraceResult.load(j).kind) for j in jsons}
    assert kinds == {("question_encoder", k) for k in ("hidden", "mlp", "self_attn", "cross_attn")} | {
        ("answer_decoder", "hidden"), ("vision_encoder", "hidden"), ("caption_decoder", "mlp"), ("itm_encoder", "mlp"),
        ("qformer", "hidden")}
    assert "[demo-caption] captioning: caption 'a red triangle', word 'red'" in out.stdout
    assert "[demo-itm] image-text matching: text 'a red triangle': match" in out.stdout
    assert "[demo-blip2] BLIP-2 question answering: question 'what is the color of the triangle?': answer 'red'" in out.stdout
    assert len(list((tmp_path / "o").glob("*-on-image.png"))) == 3
    for png in pngs:
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 100


@pytest.mark.parametrize(
    "args",
    [
        ["trace", "--image", "/no/such.png", "--question", "what?", "--out", "x"],
        ["trace", "--image", "IMAGE", "--question", "  ", "--out", "x"],
        ["trace", "--image", "IMAGE", "--question", "what color is the shape?", "--answer", "zebra", "--out", "x"],
        ["trace", "--image", "IMAGE", "--question", "q", "--kind", "attention", "--out", "x"],
        ["trace", "--image", "IMAGE", "--question", "q", "--window", "0", "--out", "x"],
        ["trace", "--model", "no-such-model", "--image", "IMAGE", "--question", "q", "--out", "x"],
        ["frobnicate"],
    ],
)
def test_bad_arguments_exit_2_without_traceback(image_file, tmp_path, args):
    args = [str(image_file[0]) if a == "IMAGE" else a for a in args]
    out = run(*args, cwd=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    assert "error:" in out.stderr.strip().splitlines()[-1]


def test_help_explains_every_option():
    out = run("trace", "--help")
    assert out.returncode == 0
    for option in ("--block", "--kind", "--window", "--noise", "--scale", "--samples", "--seed", "--answer", "--out"):
        assert option in out.stdout


def test_trace_vision_encoder_writes_an_overlay(image_file, tmp_path):
    path, question = image_file
    out = run("trace", "--image", str(path), "--question", question, "--block", "vision_encoder", "--regions", "2",
              "--samples", "2", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    [overlay] = tmp_path.glob("*-on-image.png")
    [js] = tmp_path.glob("*.json")
    result = TraceResult.load(js)
    assert result.block == "vision_encoder" and result.tokens[0] == "[CLS]" and len(result.tokens) == 5
    assert result.config["corrupt"] == "patches"
    assert overlay.read_bytes()[:4] == b"\x89PNG"
    bad = run("trace", "--image", str(path), "--question", question, "--block", "vision_encoder", "--kind", "cross_attn",
              "--out", str(tmp_path))
    assert bad.returncode == 2 and "no 'cross_attn'" in bad.stderr


def test_runs_with_other_settings_never_overwrite_each_other(image_file, tmp_path):
    path, question = image_file
    for window in ("1", "3"):
        out = run("trace", "--image", str(path), "--question", question, "--kind", "mlp", "--window", window,
                  "--samples", "2", "--out", str(tmp_path))
        assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in tmp_path.glob("*.json"))
    assert len(names) == 2 and not any(name.startswith("-") for name in names)


def test_unknown_words_are_named(tmp_path, image_file):
    path, _ = image_file
    out = run("trace", "--image", str(path), "--question", "what is the cat doing?", "--samples", "2", "--out", str(tmp_path))
    assert out.returncode == 0 and "lacks" in out.stderr and "'cat'" in out.stderr


def test_trace_a_caption_word_by_word_and_a_match(image_file, tmp_path):
    path, _ = image_file
    out = run("trace", "--model", "demo-caption", "--image", str(path), "--samples", "2", "--out", str(tmp_path / "one"))
    assert out.returncode == 0, out.stderr  # by default the first content word, as everywhere
    assert "scored caption word 'red'" in out.stdout and len(list((tmp_path / "one").glob("*.json"))) == 1
    out = run("trace", "--model", "demo-caption", "--image", str(path), "--samples", "2", "--word", "all",
              "--out", str(tmp_path / "c"))
    assert out.returncode == 0, out.stderr
    assert "model's caption: 'a red triangle'" in out.stdout and out.stdout.count("  total effect ") == 3
    results = sorted((TraceResult.load(j) for j in (tmp_path / "c").glob("*.json")), key=lambda r: r.config["word"])
    assert [r.answer for r in results] == ["a", "red", "triangle"]
    assert all(r.block == "caption_decoder" and r.head == "caption" for r in results)
    assert "'red': restoring caption decoder hidden states" in out.stdout
    out = run("trace", "--model", "demo-itm", "--image", str(path), "--text", "a red triangle", "--block",
              "vision_encoder", "--metric", "itc", "--regions", "2", "--samples", "2", "--out", str(tmp_path / "i"))
    assert out.returncode == 0, out.stderr
    [js] = (tmp_path / "i").glob("*.json")
    result = TraceResult.load(js)
    assert result.metric == "itc" and result.head == "itm" and result.high_score > 0.5
    assert len(list((tmp_path / "i").glob("*-on-image.png"))) == 1
