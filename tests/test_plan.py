"""lorakit plan: counts equal real models built from the same configs, the adapter file size is exact, and the
memory estimate's terms match what torch keeps (saved-tensor hooks) and what a real step takes (RSS)."""

import contextlib
import io
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import single_thread
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from lorakit import LoraConfig, get_peft_model
from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.memory_estimate import GIB, layer_activation_bytes, nf4_bytes, parse_memory
from lorakit.plan import (architecture, build_meta_model, load_model_config, make_plan, render, safetensors_size,
                          shipped_configs, _layer_targets)
from lorakit.precision import autocast
from lorakit.quant import quantize_model, quantized_nbytes
from lorakit.train_config import TrainConfig, lora_recipe

ROOT = Path(__file__).resolve().parents[1]
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def settings(base: str, **changes) -> TrainConfig:
    lora = changes.pop("lora", {})
    return TrainConfig(base=base, data="-", lora=lora_recipe(**lora), **changes)


def tiny_config_file(tmp_path, **changes) -> str:
    values = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=300, max_position_embeddings=256, tie_word_embeddings=False)
    config = LlamaConfig(**{**values, **changes})
    path = tmp_path / "config.json"
    path.write_text(config.to_json_string())
    return str(path)


def printed(model) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        model.print_trainable_parameters()
    return out.getvalue().strip()


def test_textbook_8192_square_matrix_r8():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8192, 8192, bias=False))
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["0"]))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert (total - trainable, trainable) == (67_108_864, 131_072)


@pytest.mark.parametrize("lora", [{"target_modules": QKVO}, {"target_modules": "all-linear", "r": 4},
                                  {"target_modules": ["q_proj", "v_proj"], "r": 8, "use_dora": True}])
@pytest.mark.parametrize("tied", [False, True])
def test_counts_equal_real_tiny_models_lorakit_and_peft(tmp_path, lora, tied):
    import peft

    path = tiny_config_file(tmp_path, tie_word_embeddings=tied)
    plan = make_plan(settings(path, lora=lora))
    real = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    ours = get_peft_model(real, lora_recipe(**lora))
    assert (plan.trainable, plan.total) == ours.get_nb_trainable_parameters()
    assert plan.trainable_line == printed(ours)
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)),
                                 peft.LoraConfig(**{k: v for k, v in lora_recipe(**lora).to_dict().items()
                                                    if k in ("r", "lora_alpha", "target_modules", "use_dora")}))
    assert plan.trainable_line == printed(theirs)
    assert sum(t.params for t in plan.targets) == plan.trainable
    # the adapter file, byte for byte: what save_pretrained writes
    ours.save_pretrained(tmp_path / "adapter")
    assert plan.adapter_file_bytes == (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size


def test_per_target_rows_of_llama_3_8b():
    plan = make_plan(settings("llama-3-8b", lora={"target_modules": QKVO, "r": 16}))
    rows = {t.name: (t.modules, t.shape, t.params, t.file_bytes) for t in plan.targets}
    assert rows == {"q_proj": (32, "4096 -> 4096", 32 * 16 * 8192, 32 * 16 * 8192 * 4),
                    "k_proj": (32, "4096 -> 1024", 32 * 16 * 5120, 32 * 16 * 5120 * 4),
                    "v_proj": (32, "4096 -> 1024", 32 * 16 * 5120, 32 * 16 * 5120 * 4),
                    "o_proj": (32, "4096 -> 4096", 32 * 16 * 8192, 32 * 16 * 8192 * 4)}
    assert plan.trainable == 13_631_488 and plan.total == 8_030_261_248 + 13_631_488


@pytest.mark.parametrize("name,total", [("llama-3-8b", 8_030_261_248), ("llama-3.1-70b", 70_553_706_496),
                                        ("mistral-7b", 7_241_732_096), ("qwen2.5-7b", 7_615_616_512),
                                        ("gemma-2-9b", 9_241_705_984), ("smollm2-135m", 134_515_008)])
def test_shipped_configs_give_the_published_sizes(name, total):
    model = build_meta_model(load_model_config(name))
    assert sum(p.numel() for p in model.parameters()) == total
    assert name in shipped_configs()


def test_smollm2_config_counts_equal_the_embedded_model():
    from lorakit.models import load_base_model

    real, _ = load_base_model("smollm2")
    lora = {"target_modules": "all-linear", "r": 8}
    plan = make_plan(settings("smollm2-135m", lora=lora))
    assert plan.trainable_line == printed(get_peft_model(real, lora_recipe(**lora)))
    assert make_plan(settings("smollm2", lora=lora)).total == plan.total  # the default base's name


def test_nf4_frozen_bytes_equal_a_quantized_model(tmp_path):
    path = tiny_config_file(tmp_path)
    plan = make_plan(settings(path, quantize="nf4"))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    quantize_model(model)
    stored = quantized_nbytes(model)["quantized_bytes"] + 4 * sum(p.numel() for p in model.parameters())
    assert plan.memory.frozen_weights == stored
    assert nf4_bytes(64 * 256) == 64 * 128 + 256 + 4 + 4


def _saved_bytes(model, ids, bf16: bool) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps for the backward of one training forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[(ptr, t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(bf16, "cpu"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_layer_activations_equal_what_autograd_keeps(bf16, attention):
    """One extra layer adds exactly the estimated bytes (the head, loss and embeddings cancel out)."""
    config = dict(hidden_size=128, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=500, attn_implementation=attention)
    ids = torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    saved = {}
    for layers in (2, 3):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(num_hidden_layers=layers, **config))
        model.to(torch.bfloat16 if bf16 else torch.float32)
        peft_model = get_peft_model(model, lora_recipe(r=8, lora_dropout=0.0)).train()
        with single_thread():
            saved[layers] = _saved_bytes(peft_model, ids, bf16)
    size = 2 if bf16 else 4
    parts = layer_activation_bytes(architecture(model), _layer_targets(peft_model), 2, 48, size, size, attention,
                                   dropout=False)
    assert saved[3] - saved[2] == sum(parts.values())


def test_tiny_measured_step_within_20_percent(tmp_path):
    """A real training step of a small model in a fresh process: the estimate of what the step adds over the
    loaded model is within 20% of the measured RSS peak (large blocks returned to the system when freed)."""
    from lorakit.models import load_tokenizer

    base = tmp_path / "base"
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    load_tokenizer("smollm2").save_pretrained(base)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plan_memory.py"), "--one", "none,fp32,8,512",
                          "--base", str(base), "--steps", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["estimated_step_bytes"] > 100 * 2 ** 20  # activations dominate the step
    assert 0.8 < result["estimated_step_bytes"] / result["measured_step_bytes"] < 1.2


def test_a_cpu_plan_says_what_glibc_adds_to_rss_and_how_to_remove_it(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    plan = make_plan(settings("smollm2"), device="cpu")
    glibc = [n for n in plan.notes if "MALLOC_MMAP_THRESHOLD_=131072" in n]
    assert len(glibc) == (platform.libc_ver()[0] == "glibc")
    if glibc:
        assert "note: " + glibc[0] in render(plan) and "1.5x" in glibc[0]
    assert not any("MALLOC" in n for n in make_plan(settings("smollm2")).notes)  # a GPU's allocator peak has no slack
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert not any("MALLOC" in n for n in make_plan(settings("smollm2"), device="cpu").notes)


def test_fits_and_the_hint_names_the_smallest_change():
    base = settings("llama-3-8b", lora={"target_modules": QKVO}, bf16=True, batch_size=4, max_length=2048)
    plan = make_plan(base, memory=parse_memory("24GB"))
    assert plan.fits is False and plan.memory.total > 24 * GIB
    assert plan.hint.startswith("add --gradient-checkpointing (")
    assert make_plan(base, memory=parse_memory("80GB")).fits is True
    assert make_plan(base, memory=parse_memory("80GB")).hint is None
    tiny = make_plan(base, memory=parse_memory("8GB"))  # nothing alone: QLoRA and checkpointing together
    assert "--gradient-checkpointing" in tiny.hint and "--quantize nf4" in tiny.hint
    ckpt = make_plan(settings("llama-3-8b", bf16=True, batch_size=4, max_length=2048, gradient_checkpointing=True))
    assert ckpt.memory.activations < plan.memory.activations == ckpt.other_activations
    # lorakit's fused loss vs the full logits
    assert plan.memory.loss * 10 < plan.memory.detail["full_logits_loss"]
    assert plan.full.trainable_states == 16 * 8_030_261_248


def test_parse_memory():
    assert parse_memory("24GB") == parse_memory("24GiB") == parse_memory("24g") == 24 * GIB
    assert parse_memory("512MB") == 512 * 2 ** 20 and parse_memory("1.5T") == int(1.5 * 2 ** 40)
    for bad in ("", "lots", "-3GB", "0"):
        with pytest.raises(ValueError):
            parse_memory(bad)


def test_safetensors_size_matches_a_written_file(tmp_path):
    from safetensors.torch import save_file

    tensors = {"b.weight": torch.zeros(3, 5), "a.weight": torch.zeros(7, 2), "c": torch.zeros(1, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    assert safetensors_size(tensors, {"format": "pt"}) == (tmp_path / "x.safetensors").stat().st_size


def test_cli_plan_json_and_errors(capsys, tmp_path):
    assert main(["plan", "--base", "llama-3-8b", "--r", "16", "--targets", "q_proj,k_proj,v_proj,o_proj",
                 "--memory", "24GB", "--bf16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["trainable"] == 13_631_488 and data["fits"] in (True, False) and data["memory"]["total"] > 0
    assert main(["plan", "--base", "mistral-7b", "--quantize", "nf4"]) == 0
    text = capsys.readouterr().out
    assert "trainable params: 13,631,488 || all params: 7,255,363,584" in text and "QLoRA" in text
    assert main(["plan", "--base", str(tmp_path / "nothing-here")]) == 2
    assert "not a shipped config" in capsys.readouterr().err
    assert main(["plan", "--memory", "lots"]) == 2
    with pytest.raises(ConfigError):
        load_model_config(str(tmp_path))  # a directory without config.json
