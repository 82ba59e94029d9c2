"""Adapter files: key names, atomic writes, and clear errors for bad files or bases."""

import json
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


# -- adapter files from elsewhere ----------------------------------------------------------------------------

def adapter_output(model_dir, ids=None):
    model = PeftModel.from_pretrained(tiny_llama(), model_dir)
    ids = torch.arange(3, 13).unsqueeze(0) if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_safetensors_file_cut_short_is_a_clear_error(tmp_path):
    saved_adapter(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    whole = file.read_bytes()
    for cut in (len(whole) - 10, len(whole) // 2, 7, 0):  # the data, the header, its length field, nothing
        file.write_bytes(whole[:cut])
        with pytest.raises(AdapterLoadError, match=r"adapter_model\.safetensors is corrupt or truncated .*"
                                                   r"Re-save or re-download the adapter"):
            PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_a_config_from_a_newer_peft_loads_with_a_warning_naming_the_unknown_fields(tmp_path):
    saved_adapter(tmp_path)
    want = adapter_output(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update({"peft_version": "9.0.0", "lora_shiny_new_option": None, "target_parameters": None})
    config_file.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="ignoring fields lorakit does not know: lora_shiny_new_option"):
        got = adapter_output(tmp_path)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("change", [{"r": 8}, {"rank_pattern": {"v_proj": 2}}])
def test_a_config_whose_rank_disagrees_with_the_tensors_names_both_ranks(tmp_path, change):
    saved_adapter(tmp_path)  # r=4 on q_proj and v_proj
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    wanted = change.get("r") or 2
    with pytest.raises(AdapterLoadError, match=rf"gives rank {wanted} to .*_proj' but the tensor .* has rank 4: the "
                                               r"config does not belong to these weights\. Set r \(or its "
                                               r"rank_pattern entry\) to 4"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_a_pickle_bin_adapter_loads_through_the_safe_loader_only(tmp_path):
    from safetensors.torch import load_file

    saved_adapter(tmp_path / "st")
    want = adapter_output(tmp_path / "st")
    legacy = tmp_path / "bin"
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text((tmp_path / "st" / "adapter_config.json").read_text())
    torch.save(load_file(tmp_path / "st" / "adapter_model.safetensors"), legacy / "adapter_model.bin")
    torch.testing.assert_close(adapter_output(legacy), want, rtol=0, atol=0)  # PEFT's older format: tensors only

    # A pickle that runs code when it is loaded: refused, and the code never runs.
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": Payload()},
               legacy / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match=r"adapter_model\.bin cannot be read safely .* lorakit loads only "
                                               r"tensors from a pickle; convert the adapter"):
        PeftModel.from_pretrained(tiny_llama(), legacy)
    assert not marker.exists()
    torch.save([torch.zeros(2)], legacy / "adapter_model.bin")  # safe to unpickle, but not an adapter
    with pytest.raises(AdapterLoadError, match=r"adapter_model\.bin holds a list, not a dict of named tensors"):
        PeftModel.from_pretrained(tiny_llama(), legacy)
