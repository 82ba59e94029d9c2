"""`lorakit export --format gguf | merged-gguf`: llama.cpp's adapter file read back with the `gguf` package (names,
shapes, values, B·A·scale, metadata), the merged model reloaded through transformers' GGUF loader, refusals."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from tiny_models import VOCAB, tiny_gpt2
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import LoraConfig, get_peft_model
from lorakit.adapter_folder import write_train_record
from lorakit.cli import main
from lorakit.errors import ExportError
from lorakit.export.adapter_parts import read_adapter_parts
from lorakit.export.gguf import QUANTIZATION_KEY, export_adapter_gguf
from lorakit.export.gguf_format import GGUFArchitecture
from lorakit.export.merged_gguf import export_merged_gguf
from lorakit.models import load_tokenizer, load_with_adapters, smollm2_gguf_path

pytestmark = pytest.mark.usefixtures("one_thread")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir, out, seed: int = 0, **config):
    """A random adapter (A and B both non-zero) on the tiny chat base, saved as PEFT does."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    settings = dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR, init_lora_weights=False)
    peft = get_peft_model(model, LoraConfig(**{**settings, **config}))
    peft.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory):
    return make_adapter(tiny_base, tmp_path_factory.mktemp("gguf") / "adapter")


def read(path):
    """(metadata, {name: (shape as GGUF lists it, float32 values in torch's row order)}) of a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        values = gguf.dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape.tolist())))
        tensors[t.name] = (t.shape.tolist(), t.tensor_type.name, torch.from_numpy(np.array(values, np.float32)))
    return meta, tensors


def test_adapter_file_holds_every_pair_under_llama_cpps_name_with_its_values(adapter, tiny_base, tmp_path):
    out = tmp_path / "adapter.gguf"
    done = export_adapter_gguf(adapter, out, outtype="f32")
    meta, tensors = read(out)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama" and meta["adapter.lora.alpha"] == 8.0
    assert meta["general.base_model.0.name"] == tiny_base and QUANTIZATION_KEY not in meta
    assert done.tensors == 2 * 7 and done.modelfile is None  # no GGUF file known for this base
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    expected = {f"blk.{i}.{g}.weight.lora_{x}" for i in range(2) for g in names.values() for x in "ab"}
    assert set(tensors) == expected
    parts = read_adapter_parts(adapter)
    arch = GGUFArchitecture(AutoModelForCausalLM.from_pretrained(tiny_base).config)
    for module, (a, b) in parts.pairs.items():
        layer, hf = int(module.split(".")[2]), module.rsplit(".", 1)[1]
        name = f"blk.{layer}.{names[hf]}.weight"
        shape_a, type_a, lora_a = tensors[name + ".lora_a"]
        shape_b, _, lora_b = tensors[name + ".lora_b"]
        assert shape_a == [a.shape[1], 4] and shape_b == [4, b.shape[0]] and type_a == "F32"  # GGUF: [in, r], [r, out]
        torch.testing.assert_close(lora_a, a, rtol=0, atol=0)
        back = arch.rows_from_llama_cpp(name, lora_b)  # q/k rows are in llama.cpp's rotary order
        torch.testing.assert_close(back, b, rtol=0, atol=0)
        if hf in ("q_proj", "k_proj"):
            assert not torch.equal(lora_b, b)  # reordered, not copied
        # llama.cpp's update: lora_b · lora_a · alpha / r, with r read from lora_b
        delta = arch.rows_from_llama_cpp(name, lora_b @ lora_a * (meta["adapter.lora.alpha"] / shape_b[0]))
        torch.testing.assert_close(delta, parts.delta(module), rtol=1e-5, atol=1e-6)


def test_outtypes_f16_and_q8_0_keep_the_values_to_their_precision(adapter, tmp_path):
    parts = read_adapter_parts(adapter)
    a = parts.pairs["model.layers.1.mlp.up_proj"][0]
    for outtype, expected_a, expected_b, tol in (("f16", "F16", "F16", 1e-3), ("q8_0", "Q8_0", "F16", 1e-2)):
        out = tmp_path / f"{outtype}.gguf"
        export_adapter_gguf(adapter, out, outtype=outtype)
        meta, tensors = read(out)
        _, type_a, lora_a = tensors["blk.1.ffn_up.weight.lora_a"]
        _, type_b, _ = tensors["blk.1.ffn_up.weight.lora_b"]  # rank 4 rows: too narrow for q8_0's 32-value blocks
        assert (type_a, type_b) == (expected_a, expected_b)
        assert meta["general.file_type"] == {"f16": 1, "q8_0": 7}[outtype]
        torch.testing.assert_close(lora_a, a, rtol=tol, atol=tol * a.abs().max().item())


def test_per_layer_scales_fold_into_b_so_one_alpha_reproduces_each_update(tiny_base, tmp_path):
    adapter = make_adapter(tiny_base, tmp_path / "patterns", r=4, lora_alpha=8, use_rslora=True,
                           rank_pattern={"down_proj": 8}, alpha_pattern={"o_proj": 3})
    done = export_adapter_gguf(adapter, tmp_path / "p.gguf", outtype="f32")
    meta, tensors = read(tmp_path / "p.gguf")
    parts = read_adapter_parts(adapter)
    assert meta["adapter.lora.alpha"] == pytest.approx(8 / 2 * 4)  # rsLoRA's alpha / sqrt(r), as alpha / r
    assert any("lora_b" in note for note in done.notes)
    arch = GGUFArchitecture(AutoModelForCausalLM.from_pretrained(tiny_base).config)
    for module, name in (("model.layers.0.mlp.down_proj", "blk.0.ffn_down.weight"),
                         ("model.layers.1.self_attn.o_proj", "blk.1.attn_output.weight"),
                         ("model.layers.1.self_attn.k_proj", "blk.1.attn_k.weight")):
        lora_a, lora_b = tensors[name + ".lora_a"][2], tensors[name + ".lora_b"][2]
        assert lora_a.shape[0] == parts.ranks[module]
        delta = arch.rows_from_llama_cpp(name, lora_b @ lora_a * (meta["adapter.lora.alpha"] / lora_a.shape[0]))
        torch.testing.assert_close(delta, parts.delta(module), rtol=1e-5, atol=1e-6)


def test_the_embedded_base_gets_its_gguf_checked_and_an_ollama_modelfile(tmp_path):
    adapter = tmp_path / "smol"
    model, _, _, _ = load_with_adapters("smollm2", [])
    torch.manual_seed(0)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                     init_lora_weights=False)).save_pretrained(adapter)
    write_train_record(adapter, {"quantize": "nf4"}, {})  # as `lorakit train --quantize nf4` records QLoRA
    out = tmp_path / "smol.gguf"
    done = export_adapter_gguf(adapter, out)
    assert done.base_gguf == smollm2_gguf_path() and done.tensors == 2 * 30
    assert done.modelfile.read_text().splitlines()[-3:] == [f"FROM {smollm2_gguf_path()}", "ADAPTER ./smol.gguf",
                                                            'PARAMETER stop "<|im_end|>"']
    meta, _ = read(out)
    assert meta[QUANTIZATION_KEY] == "nf4" and any("QLoRA" in note for note in done.notes)
    # the same adapter cannot be put on a GGUF file of another model
    other = tmp_path / "other.gguf"
    export_merged_gguf(make_adapter(_tiny(tmp_path), tmp_path / "tiny_adapter"), other, outtype="f32")
    with pytest.raises(ExportError, match="not the base the adapter was trained on"):
        export_adapter_gguf(adapter, tmp_path / "x.gguf", base_gguf=str(other))


def _tiny(tmp_path):
    from tiny_models import save_tiny_chat_base

    return save_tiny_chat_base(tmp_path / "tiny_base")


def test_refusals_say_why_and_what_to_do(tiny_base, tmp_path):
    cases = [
        (dict(use_dora=True), "DoRA.*--format merged-gguf"),
        (dict(target_modules=["q_proj", "embed_tokens"]), "embedding.*--format merged-gguf"),
        (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save.*--format merged-gguf"),
    ]
    for i, (config, message) in enumerate(cases):
        adapter = make_adapter(tiny_base, tmp_path / f"a{i}", **config)
        with pytest.raises(ExportError, match=message):
            export_adapter_gguf(adapter, tmp_path / f"a{i}.gguf")
        assert not (tmp_path / f"a{i}.gguf").exists()
    gpt2_dir = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(gpt2_dir)
    load_tokenizer("smollm2").save_pretrained(gpt2_dir)
    torch.manual_seed(0)
    get_peft_model(AutoModelForCausalLM.from_pretrained(gpt2_dir),
                   LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)).save_pretrained(tmp_path / "g")
    with pytest.raises(ExportError, match="'gpt2' is not one this export maps.*lorakit merge"):
        export_adapter_gguf(tmp_path / "g", tmp_path / "g.gguf")
    adapter = make_adapter(tiny_base, tmp_path / "ok")
    with pytest.raises(ExportError, match="must end in .gguf"):
        export_adapter_gguf(adapter, tmp_path / "adapter.bin")
    (tmp_path / "taken.gguf").write_text("x")
    with pytest.raises(ExportError, match="--force"):
        export_adapter_gguf(adapter, tmp_path / "taken.gguf")
    with pytest.raises(ExportError, match="--outtype"):
        export_adapter_gguf(adapter, tmp_path / "q.gguf", outtype="q4_0")


def test_merged_gguf_reloads_through_transformers_with_the_merged_logits(adapter, tiny_base, tmp_path):
    model, tokenizer, _, _ = load_with_adapters(None, [str(adapter)])
    x = torch.randint(3, VOCAB * 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=x).logits
    for outtype, tol in (("f32", 1e-4), ("f16", 2e-2)):
        out = tmp_path / f"merged-{outtype}.gguf"
        done = export_merged_gguf(adapter, out, outtype=outtype)
        assert done.metadata_from == "transformers config and tokenizer" and done.tensors == 2 * 9 + 3  # + token_embd, output_norm, output
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
        with torch.no_grad():
            got = reloaded(input_ids=x).logits
        scale = expected.abs().max().item()
        assert (got - expected).abs().max().item() < tol * scale, outtype
    meta, tensors = read(tmp_path / "merged-f16.gguf")
    assert meta["general.type"] == "model" and meta["llama.block_count"] == 2
    assert tensors["blk.0.attn_norm.weight"][1] == "F32" and tensors["blk.0.attn_q.weight"][1] == "F16"
    assert tensors["output.weight"][0] == [32, 49152]  # the tiny base's lm_head is not tied to its embeddings
    text = "<|im_start|>user\nReset my password 12345<|im_end|>"
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="merged-f16.gguf")
    assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (tmp_path / "merged-f16.Modelfile").read_text().splitlines()[-2:] == [
        "FROM ./merged-f16.gguf", 'PARAMETER stop "<|im_end|>"']


def test_cli_export_prints_how_to_run_it_and_refuses_with_exit_2(adapter, tmp_path, capsys):
    assert main(["export", str(adapter), "--format", "gguf", "--out", str(tmp_path / "a.gguf")]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'a.gguf'}: llama.cpp LoRA adapter (llama, 14 layers, rank 4, alpha 8)" in printed
    assert "convert_hf_to_gguf.py" in printed  # no GGUF file known for the tiny base
    assert main(["export", str(adapter), "--format", "gguf", "--out", str(tmp_path / "a.gguf")]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["export", str(adapter), "--format", "gguf", "--out", str(tmp_path / "b.gguf"), "--name", "x"]) == 2
    assert "--name and --max-lora-rank belong to --format vllm" in capsys.readouterr().err
    json.loads((adapter / "adapter_config.json").read_text())  # the adapter is untouched


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_merged_gguf_of_the_qwen_families_reloads_with_the_merged_logits(family, tmp_path):
    """Qwen2 (q/k/v biases) and Qwen3 (q/k norms, head_dim apart from hidden / heads): no q/k reordering."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[
        family]
    torch.manual_seed(0)
    base = tmp_path / family
    # transformers' GGUF loader takes Qwen3's head_dim from its own default (128), so the tiny model uses that
    model_class(config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=128 if family == "qwen3" else 8, vocab_size=49152,
                             max_position_embeddings=256)).save_pretrained(base)
    load_tokenizer("smollm2").save_pretrained(base)
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert GGUFArchitecture(AutoModelForCausalLM.from_pretrained(base).config).permutes_qk is False
    export_adapter_gguf(adapter, tmp_path / "adapter.gguf")
    export_merged_gguf(adapter, tmp_path / "merged.gguf", outtype="f32")
    model, _, _, _ = load_with_adapters(None, [str(adapter)])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="merged.gguf", dtype=torch.float32)
    x = torch.randint(3, 49152, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-4, atol=1e-4)
