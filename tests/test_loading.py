"""load_model: sources, modes, dtypes, and the errors a user meets offline."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from fast_subset import lengthy
from tiny_blip import tiny_model, tiny_processor

from blip_trace_widgets import load_model
from blip_trace_widgets.models.loading import dtype_argument


def test_pair_is_eval_without_grad():
    bundle = load_model((tiny_model(), tiny_processor()), device="cpu")
    assert not bundle.model.training
    assert all(not p.requires_grad for p in bundle.model.parameters())
    assert bundle.device == torch.device("cpu") and bundle.dtype == torch.float32


@lengthy
def test_folder_round_trip_keeps_tokens(tmp_path):
    model, processor = tiny_model(), tiny_processor()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    bundle = load_model(str(tmp_path), device="cpu", dtype="bfloat16")
    assert bundle.dtype == torch.bfloat16
    ids = bundle.tokenizer("what color is the shape?")["input_ids"]
    assert bundle.tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "what", "color", "is", "the", "shape", "?", "[SEP]"]
    assert bundle.tokenizer.unk_token_id not in ids


def test_non_blip_folder_is_a_value_error(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    BertModel(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not one of the heads this package traces"):
        load_model(str(tmp_path))


def test_bad_source_and_dtype():
    with pytest.raises(ValueError, match="unsupported model source"):
        load_model(42)
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model((tiny_model(), tiny_processor()), dtype="int8")


@pytest.mark.slow
def test_hub_id_offline_gives_clear_error(tmp_path):
    code = (
        "from blip_trace_widgets import load_model\n"
        "try:\n    load_model('Salesforce/blip-vqa-base')\n"
        "except RuntimeError as e:\n    print('RUNTIME', e)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "RUNTIME" in out.stdout, out.stderr[-2000:]
    assert "load_model('demo')" in out.stdout and "huggingface-cli download" in out.stdout
    assert "Traceback" not in out.stdout


@lengthy
def test_pair_keeps_its_dtype_unless_asked():
    model = tiny_model().to(torch.bfloat16)
    assert load_model((model, tiny_processor())).dtype == torch.bfloat16
    assert load_model((tiny_model(), tiny_processor()), dtype="float16").dtype == torch.float16


@lengthy
def test_noise_scale_comes_from_the_model_folder(tmp_path):
    import json

    from blip_trace_widgets.causal_trace.tracer import default_config
    from blip_trace_widgets.models.loading import DEMO_MODEL_DIR

    tiny_model().save_pretrained(tmp_path)
    tiny_processor().save_pretrained(tmp_path)
    plain = load_model(str(tmp_path))
    assert plain.noise_scale == 3.0 and default_config(plain).corruption.scale == 3.0
    (tmp_path / "trace_defaults.json").write_text(json.dumps({"noise_scale": 7.5}))
    assert default_config(load_model(str(tmp_path))).corruption.scale == 7.5
    assert load_model("demo").noise_scale == 10.0
    assert load_model(str(DEMO_MODEL_DIR)).noise_scale == 10.0  # the demo folder by path, too
    assert load_model((tiny_model(), tiny_processor())).noise_scale == 3.0


@lengthy
def test_loading_leaves_transformers_logging_as_it_was(capsys):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_info()
    try:
        load_model("demo")
        assert hf_logging.get_verbosity() == hf_logging.INFO and hf_logging.is_progress_bar_enabled()
        assert "Loading weights" not in capsys.readouterr().err
    finally:
        hf_logging.set_verbosity_warning()


def test_offline_hub_ids_fail_at_once_without_retries(monkeypatch):
    """No network and nothing cached: one clear error before transformers starts its retries."""
    import transformers

    from blip_trace_widgets.models import loading

    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)

    def never(*args, **kwargs):
        raise AssertionError("from_pretrained was called: it would retry for half a minute")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", never)
    with pytest.raises(RuntimeError, match="could not load 'Salesforce/blip-vqa-base'"):
        load_model("Salesforce/blip-vqa-base")


def test_offline_with_a_cached_copy_reads_the_cache_only(monkeypatch):
    import huggingface_hub

    from blip_trace_widgets.models import loading

    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: "/cache/config.json")
    assert loading._hub_access("Salesforce/blip-vqa-base") == {"local_files_only": True}


@pytest.mark.parametrize("name", ["nosuchmodel", "a/b/c", "/no/such/folder"])
def test_names_that_are_neither_folders_nor_hub_ids_fail_fast(name):
    with pytest.raises(ValueError, match="neither a folder nor a hub id|did you mean a local folder"):
        load_model(name)


@pytest.fixture
def float32_folder(tmp_path):
    folder = tmp_path / "tiny-float32"
    tiny_model().save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder


@lengthy
def test_half_precision_loads_from_a_copy_converted_tensor_by_tensor(float32_folder, tmp_path, monkeypatch):
    import torch
    from transformers import BlipForQuestionAnswering

    monkeypatch.setenv("BLIP_TRACE_CACHE", str(tmp_path / "cache"))
    bundle = load_model(str(float32_folder), dtype="bfloat16")
    direct = BlipForQuestionAnswering.from_pretrained(float32_folder, **dtype_argument(torch.bfloat16))
    ours = dict(bundle.model.named_parameters())
    for name, parameter in direct.named_parameters():
        assert torch.equal(ours[name], parameter), name
    copies = list((tmp_path / "cache" / "half").iterdir())
    assert len(copies) == 1 and copies[0].name.startswith("tiny-float32-bf16-")
    load_model(str(float32_folder), dtype="bfloat16")  # the cached copy serves again
    assert len(list((tmp_path / "cache" / "half").iterdir())) == 1


@lengthy
def test_short_memory_gives_a_warning_that_names_a_dtype_that_fits(float32_folder, monkeypatch):
    from blip_trace_widgets.core import memory
    from blip_trace_widgets.models import loading

    weights = (float32_folder / "model.safetensors").stat().st_size
    monkeypatch.setattr(memory, "available_memory", lambda: int(weights * 0.6) + loading.TRACE_HEADROOM)
    with pytest.warns(ResourceWarning, match=r"dtype='bfloat16'\) would fit"):
        load_model(str(float32_folder))


@lengthy
def test_a_checkpoint_missing_weights_is_refused(float32_folder):
    """Random weights in place of missing ones would make every trace wrong: refuse, naming them."""
    from safetensors.torch import load_file, save_file

    weights = float32_folder / "model.safetensors"
    tensors = load_file(weights)
    dropped = "text_decoder.cls.predictions.transform.dense.weight"
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(weights), metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="lacks 1 weight.*they would be random"):
        load_model(str(float32_folder))


@lengthy
def test_portable_folder_loads_the_same_model(tmp_path):
    from blip_trace_widgets.core.portable import save_portable, saved_keys

    model, processor = tiny_model(), tiny_processor()
    save_portable(model, processor, tmp_path)
    assert saved_keys(tmp_path) == set(model.state_dict())
    assert (tmp_path / "preprocessor_config.json").is_file() and not (tmp_path / "processor_config.json").exists()
    bundle = load_model(str(tmp_path))
    for name, value in model.state_dict().items():
        assert torch.equal(bundle.model.state_dict()[name], value), name


@lengthy
def test_half_precision_on_a_cpu_sizes_chunks_as_float32(image, question):
    """bfloat16 on a CPU works through float32 temporaries: chunks hold as many rows as in float32, not twice."""
    from blip_trace_widgets import TraceConfig, Tracer

    rows = {}
    for dtype in ("float32", "bfloat16"):
        bundle = load_model((tiny_model(), tiny_processor()), dtype=dtype)
        assert bundle.working_itemsize == 4
        tracer = Tracer(bundle, image, question, memory_budget=1 << 20)
        config = TraceConfig(samples=2)
        rows[dtype] = tracer.blocks.reader.rows_per_chunk(tracer.clean_pass, config, tracer.target(config))
    assert rows["bfloat16"] == rows["float32"]


@lengthy
def test_the_half_precision_cache_is_bounded(float32_folder, tmp_path, monkeypatch):
    """Conversions beyond the budget remove the least recently used copies, never the one in use."""
    import os
    import time

    from blip_trace_widgets.core.memory import prune_half_cache

    monkeypatch.setenv("BLIP_TRACE_CACHE", str(tmp_path / "cache"))
    load_model(str(float32_folder), dtype="bfloat16")
    first = next((tmp_path / "cache" / "half").iterdir())
    size = sum(f.stat().st_size for f in first.iterdir())
    old = time.time() - 3600
    os.utime(first, (old, old))
    monkeypatch.setenv("BLIP_TRACE_HALF_CACHE_GB", str(1.5 * size / (1 << 30)))  # room for one copy, not two
    load_model(str(float32_folder), dtype="float16")
    left = [p.name for p in (tmp_path / "cache" / "half").iterdir()]
    assert len(left) == 1 and "-f16-" in left[0], left
    assert len(prune_half_cache(budget=0)) == 1 and not list((tmp_path / "cache" / "half").iterdir())
