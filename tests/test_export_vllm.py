"""`lorakit export --format vllm`: the folder vLLM loads, the exact serve line, and refusals that say the fix."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import VOCAB
from transformers import AutoModelForCausalLM

from lorakit import LoraConfig, get_peft_model
from lorakit.adapter_folder import read_config
from lorakit.cli import main
from lorakit.errors import ExportError
from lorakit.export.adapter_parts import read_adapter_parts
from lorakit.export.vllm import README_NAME, export_vllm, needed_max_lora_rank
from lorakit.models import load_with_adapters

pytestmark = pytest.mark.usefixtures("one_thread")


def make_adapter(base_dir, out, **config):
    torch.manual_seed(0)
    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                   LoraConfig(**{**settings, **config})).save_pretrained(out)
    return out


def test_folder_holds_the_adapter_and_the_exact_serve_line(tiny_base, tmp_path):
    adapter = make_adapter(tiny_base, tmp_path / "run")
    done = export_vllm(adapter, tmp_path / "support")
    line = (f"vllm serve {tiny_base} --enable-lora --lora-modules support={(tmp_path / 'support').resolve()} "
            "--max-lora-rank 16")
    assert done.command == line and done.max_lora_rank == 16 and done.name == "support"
    assert f"  {line}\n" in (tmp_path / "support" / README_NAME).read_text()
    assert '"model": "support"' in (tmp_path / "support" / README_NAME).read_text()
    original, exported = load_file(adapter / "adapter_model.safetensors"), load_file(
        tmp_path / "support" / "adapter_model.safetensors")
    assert set(exported) == set(original) and all(torch.equal(exported[k], original[k]) for k in original)
    assert all(k.startswith("base_model.model.model.layers.") for k in exported)  # the names vLLM parses
    config = read_config(tmp_path / "support")
    assert config["r"] == 4 and not config.get("use_dora") and not config.get("modules_to_save")
    # the folder is still an ordinary PEFT adapter: PEFT itself loads it and gives lorakit's logits
    from peft import PeftModel as HFPeftModel

    ours, _, _, _ = load_with_adapters(None, [str(adapter)])
    theirs = HFPeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / "support")
    x = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).logits, ours(input_ids=x).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ExportError, match="pass --force"):
        export_vllm(adapter, tmp_path / "support")
    export_vllm(adapter, tmp_path / "support", name="billing", force=True)
    assert "--lora-modules billing=" in (tmp_path / "support" / README_NAME).read_text()


def test_rank_against_max_lora_rank(tiny_base, tmp_path):
    assert [needed_max_lora_rank(r) for r in (1, 4, 8, 9, 16, 17, 64, 300, 512)] == [1, 8, 8, 16, 16, 32, 64, 320,
                                                                                     512]
    adapter = make_adapter(tiny_base, tmp_path / "r32", r=32, lora_alpha=32)
    assert export_vllm(adapter, tmp_path / "a").command.endswith("--max-lora-rank 32")
    with pytest.raises(ExportError, match="rank 32, above --max-lora-rank 16.*--max-lora-rank 32"):
        export_vllm(adapter, tmp_path / "b", max_lora_rank=16)
    with pytest.raises(ExportError, match="vLLM accepts only 1, 8, 16"):
        export_vllm(adapter, tmp_path / "c", max_lora_rank=20)
    assert export_vllm(adapter, tmp_path / "d", max_lora_rank=64).max_lora_rank == 64


def test_per_layer_scales_are_folded_into_b_for_vllms_single_scale(tiny_base, tmp_path):
    adapter = make_adapter(tiny_base, tmp_path / "p", rank_pattern={"down_proj": 8}, alpha_pattern={"v_proj": 2})
    done = export_vllm(adapter, tmp_path / "out")
    assert any("lora_B carries the difference" in note for note in done.notes)
    assert "alpha_pattern" not in read_config(tmp_path / "out")
    parts, tensors = read_adapter_parts(adapter), load_file(tmp_path / "out" / "adapter_model.safetensors")
    vllm_scale = 8 / 4  # lora_alpha / r, for every layer
    for module in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.q_proj"):
        a = tensors[f"base_model.model.{module}.lora_A.weight"]
        b = tensors[f"base_model.model.{module}.lora_B.weight"]
        torch.testing.assert_close(b @ a * vllm_scale, parts.delta(module), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config,message", [
    (dict(use_dora=True), "DoRA.*does not load DoRA.*lorakit merge"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save unset.*Retrain without them"),
    (dict(target_modules=["q_proj", "embed_tokens"]), "embed_tokens.*vllm#9280.*attention/MLP"),
    (dict(target_modules=["q_proj", "lm_head"]), "lm_head.*vllm#9280"),
    (dict(bias="lora_only"), "biases|bias="),
])
def test_refusals_explain_the_fix(tiny_base, tmp_path, config, message):
    adapter = make_adapter(tiny_base, tmp_path / "a", **config)
    with pytest.raises(ExportError, match=message):
        export_vllm(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_prints_the_serve_line(tiny_base, tmp_path, capsys):
    adapter = make_adapter(tiny_base, tmp_path / "run")
    assert main(["export", str(adapter), "--format", "vllm", "--out", str(tmp_path / "v"), "--name", "sup"]) == 0
    out = capsys.readouterr().out
    assert f"--enable-lora --lora-modules sup={(tmp_path / 'v').resolve()} --max-lora-rank 16" in out
    assert main(["export", str(adapter), "--format", "vllm", "--out", str(tmp_path / "w"), "--outtype", "f16"]) == 2
    assert "belong to the GGUF formats" in capsys.readouterr().err
    assert main(["export", str(adapter), "--format", "vllm", "--out", str(tmp_path / "w"), "--name", "a b"]) == 2
    assert "without spaces" in capsys.readouterr().err
