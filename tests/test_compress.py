"""lorakit compress: truncating to the adapter's own rank is exact, one rank less loses exactly the smallest singular
value's energy, and the result loads in PEFT and lorakit with the same outputs."""

import json
import math

import pytest
import torch
from tiny_models import single_thread, tiny_llama, token_batch, save_tiny_chat_base, write_code_pairs

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.adapter_folder import read_config, read_weights
from lorakit.cli import main
from lorakit.compress import (A_SUFFIX, B_SUFFIX, FILE_PREFIX, compress_adapter, energy_rank, lora_layers,
                              lora_svd)
from lorakit.errors import ConfigError, LoraKitError
from lorakit.train_config import lora_recipe


def saved_adapter(path, r: int = 6, rslora: bool = False, update_ranks: dict | None = None) -> str:
    """A tiny Llama's adapter on q,k,v,o with random A and B (B·A of rank r), saved to `path`."""
    torch.manual_seed(0)
    config = lora_recipe(r=r, lora_alpha=12, lora_dropout=0.0, use_rslora=rslora)
    model = get_peft_model(tiny_llama(), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
                for key, k in (update_ranks or {}).items():
                    if key in name:
                        param[:, k:] = 0
    model.save_pretrained(path)
    return str(path)


def updates(path) -> dict[str, torch.Tensor]:
    """scaling * B @ A of every layer of a saved adapter, in float64."""
    config = LoraConfig.from_pretrained(path)
    tensors = read_weights(path)
    return {name: config.scaling_for(name) * tensors[FILE_PREFIX + name + B_SUFFIX].double()
            @ tensors[FILE_PREFIX + name + A_SUFFIX].double() for name in lora_layers(tensors)}


def test_svd_of_the_core_equals_the_full_svd():
    torch.manual_seed(0)
    a, b = torch.randn(5, 40), torch.randn(30, 5)
    u, s, vh = lora_svd(a, b, 0.5)
    full = torch.linalg.svdvals(0.5 * b.double() @ a.double())
    assert torch.allclose(s, full[:5], rtol=1e-10)
    assert torch.allclose(u @ torch.diag(s) @ vh, 0.5 * b.double() @ a.double(), atol=1e-10)


@pytest.mark.parametrize("rslora", [False, True])
def test_rank_k_to_k_is_exact(tmp_path, rslora):
    src = saved_adapter(tmp_path / "src", r=6, rslora=rslora)
    result = compress_adapter(src, str(tmp_path / "out"), rank=6)
    before, after = updates(src), updates(tmp_path / "out")
    assert before.keys() == after.keys() and len(before) == 8
    for name in before:
        assert torch.allclose(after[name], before[name], rtol=0, atol=1e-5 * before[name].abs().max())
    assert all(r.relative_error < 1e-6 and r.kept == 6 for r in result.layers)


def test_rank_k_minus_1_loses_exactly_the_smallest_singular_value(tmp_path):
    src = saved_adapter(tmp_path / "src", r=6)
    result = compress_adapter(src, str(tmp_path / "out"), rank=5)
    before, after = updates(src), updates(tmp_path / "out")
    for layer in result.layers:
        s = torch.linalg.svdvals(before[layer.name])[:6]
        lost = float(torch.linalg.matrix_norm(before[layer.name] - after[layer.name]) ** 2)
        assert math.isclose(lost, float(s[-1] ** 2), rel_tol=1e-4)  # ||dW - dW_5||_F^2 = s_6^2
        assert math.isclose(layer.relative_error ** 2, float(s[-1] ** 2 / (s ** 2).sum()), rel_tol=1e-6)
        assert math.isclose(layer.energy_kept, float((s[:5] ** 2).sum() / (s ** 2).sum()), rel_tol=1e-6)
    assert read_config(tmp_path / "out")["r"] == 5
    assert result.bytes_after < result.bytes_before


def test_energy_keeps_per_layer_ranks_through_rank_pattern(tmp_path):
    src = saved_adapter(tmp_path / "src", r=6, update_ranks={"q_proj": 2, "v_proj": 3})
    result = compress_adapter(src, str(tmp_path / "out"), energy=0.999999)
    kept = {r.name.split(".")[-1]: r.kept for r in result.layers}
    assert kept == {"q_proj": 2, "k_proj": 6, "v_proj": 3, "o_proj": 6}
    config = read_config(tmp_path / "out")
    assert config["r"] == 6 and sorted(set(config["rank_pattern"].values())) == [2, 3]
    before, after = updates(src), updates(tmp_path / "out")
    for name in before:
        assert torch.allclose(after[name], before[name], atol=1e-5 * before[name].abs().max())
    assert energy_rank(torch.tensor([3.0, 4.0, 0.0]), 0.6) == 2 and energy_rank(torch.zeros(3), 0.9) == 1


def test_compressed_adapter_loads_in_peft_and_lorakit_with_equal_outputs(tmp_path):
    import peft

    src = saved_adapter(tmp_path / "src", r=6, update_ranks={"q_proj": 2})
    out = tmp_path / "out"
    compress_adapter(src, str(out), energy=0.9)
    ids = token_batch()
    with single_thread(), torch.no_grad():
        ours = PeftModel.from_pretrained(tiny_llama(), out)(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(out))
        assert all(theirs.peft_config["default"].rank_pattern.values())
        theirs = theirs(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_errors(tmp_path):
    src = saved_adapter(tmp_path / "src")
    with pytest.raises(ConfigError):
        compress_adapter(src, str(tmp_path / "o"))  # neither --rank nor --energy
    with pytest.raises(ConfigError):
        compress_adapter(src, str(tmp_path / "o"), energy=1.5)
    with pytest.raises(LoraKitError):
        compress_adapter(src, src, rank=2)  # --out is the adapter itself
    with pytest.raises(LoraKitError):
        compress_adapter(str(tmp_path / "missing"), str(tmp_path / "o"), rank=2)


def test_cli_with_held_out_accuracy_side_by_side(tmp_path, capsys):
    from lorakit.train import train
    from tiny_models import tiny_train_config

    base = save_tiny_chat_base(tmp_path / "base")
    data = write_code_pairs(tmp_path / "train.jsonl", 8)
    with single_thread():
        train(tiny_train_config(base, data, tmp_path / "run"))
        capsys.readouterr()  # training's own output
        assert main(["compress", str(tmp_path / "run"), "--rank", "2", "--out", str(tmp_path / "small"),
                     "--eval-data", data, "--eval-limit", "3", "--base", base, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["eval_n"] == 3 and 0 <= result["original_accuracy"] <= 1 and 0 <= result["compressed_accuracy"] <= 1
    assert [layer["kept"] for layer in result["layers"]] == [2] * len(result["layers"])
    assert (tmp_path / "small" / "lorakit_train.json").is_file()  # the run's settings travel with it
