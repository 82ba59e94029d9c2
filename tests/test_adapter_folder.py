"""Adapter files: key names, atomic writes, and clear errors for bad files or bases."""

import os

import pytest
import torch
from tiny_models import tiny_llama

from lorakit import AdapterLoadError, LoraConfig, PeftModel, get_peft_model
from lorakit.io_utils import atomic_write
from lorakit.adapter_folder import file_key
from transformers import LlamaConfig, LlamaForCausalLM


def saved_adapter(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("key,expected", [
    ("base_model.model.x.q_proj.lora_A.default.weight", "base_model.model.x.q_proj.lora_A.weight"),
    ("base_model.model.x.emb.lora_embedding_B.default", "base_model.model.x.emb.lora_embedding_B"),
    ("base_model.model.x.q.lora_magnitude_vector.default.weight", "base_model.model.x.q.lora_magnitude_vector"),
    ("base_model.model.lm_head.modules_to_save.default.weight", "base_model.model.lm_head.weight"),
    ("base_model.model.x.q_proj.lora_A.other.weight", None),
    ("base_model.model.x.q_proj.base_layer.weight", None),
])
def test_file_key(key, expected):
    assert file_key(key, "default") == expected


def test_shape_mismatch_names_the_tensor(tmp_path):
    saved_adapter(tmp_path)
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    with pytest.raises(AdapterLoadError, match=r"tensor 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj"
                                               r"\.lora_A\.weight' has shape \(4, 64\) in the file but the model "
                                               r"expects \(4, 32\)"):
        PeftModel.from_pretrained(other, tmp_path)


def test_adapter_for_another_architecture(tmp_path):
    saved_adapter(tmp_path)
    torch.manual_seed(0)
    deeper_file = tmp_path / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(deeper_file)
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, deeper_file)
    with pytest.raises(AdapterLoadError, match="layers.9.self_attn.q_proj.lora_A.weight', which matches nothing"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_missing_directory_and_weights(tmp_path):
    with pytest.raises(AdapterLoadError, match="does not exist"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "nope")
    saved_adapter(tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match="No adapter weights in .*Found: adapter_config.json"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_corrupt_weights(tmp_path):
    saved_adapter(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(AdapterLoadError, match="corrupt or truncated"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_incomplete_weights(tmp_path):
    saved_adapter(tmp_path)
    from safetensors.torch import load_file, save_file

    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, file)
    with pytest.raises(AdapterLoadError, match="lacks 1 tensor"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_failed_load_adapter_leaves_model_unchanged(tmp_path):
    model = saved_adapter(tmp_path / "good")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterLoadError):
        model.load_adapter(tmp_path / "bad", adapter_name="bad")
    assert list(model.peft_config) == ["default"]
    assert all(set(layer.r) == {"default"} for _, layer in model.base_model.lora_layers())


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write("new, half written")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_writes_get_an_ordinary_files_mode(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "f.txt", "w") as f:
            f.write("x")
        assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
        os.umask(0o077)
        with atomic_write(tmp_path / "g.txt", "w") as f:
            f.write("x")
        assert (tmp_path / "g.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_save_over_a_file_is_refused(tmp_path):
    model = saved_adapter(tmp_path / "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        model.save_pretrained(tmp_path / "file")
