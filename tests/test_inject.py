"""Choosing target modules, and the errors when the choice is wrong."""

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama, tiny_mlp

from lorakit import LoraConfig, TargetModulesError, get_peft_model
from lorakit.inject import candidate_names, resolve_targets
from lorakit.layers import LoraEmbedding, LoraLinear


def test_unknown_target_lists_candidates():
    with pytest.raises(TargetModulesError) as err:
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["qproj"]))
    message = str(err.value)
    assert "['qproj'] matched no module of LlamaForCausalLM" in message
    assert "down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in message


def test_container_target_names_inner_layers():
    with pytest.raises(TargetModulesError, match="'model.layers.0.self_attn', a LlamaAttention.*"
                                                 "k_proj, o_proj, q_proj, v_proj"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["self_attn"]))


def test_unknown_modules_to_save():
    with pytest.raises(TargetModulesError, match="modules_to_save=\\['classifier'\\] matched no module"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["classifier"]))


def test_layers_to_transform_with_nothing_left():
    with pytest.raises(TargetModulesError, match="layers_to_transform=\\[7\\]"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], layers_to_transform=7))


def test_all_linear_skips_output_head():
    targets = resolve_targets(tiny_llama(), LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in targets and len(targets) == 2 * 7
    gpt2_targets = resolve_targets(tiny_gpt2(), LoraConfig(target_modules="all-linear"))
    assert all(t.split(".")[-1] in ("c_attn", "c_proj", "c_fc") for t in gpt2_targets)


def test_default_targets_by_model_type_and_no_default():
    assert resolve_targets(tiny_llama(), LoraConfig()) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    with pytest.raises(TargetModulesError, match="no default for model type None.*emb, head, lin0, lin1"):
        resolve_targets(tiny_mlp(), LoraConfig())


def test_layer_types_and_frozen_base():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["embed_tokens", "q_proj"]))
    inner = model.base_model.model.model
    assert isinstance(inner.embed_tokens, LoraEmbedding)
    assert isinstance(inner.layers[0].self_attn.q_proj, LoraLinear)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)


def test_gpt2_conv1d_fan_in_fan_out_warns_and_fixes():
    with pytest.warns(UserWarning, match="fan_in_fan_out=False does not fit"):
        model = get_peft_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"]))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (64, 192)


def test_candidate_names_of_wrapped_model_are_stable():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    assert "q_proj" in candidate_names(model.base_model.model)
    assert "base_layer" not in candidate_names(model.base_model.model)


def test_second_adapter_on_wrapped_layers():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear"))
    model.add_adapter("second", LoraConfig(target_modules="all-linear", r=2))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    assert set(layer.r) == {"default", "second"}
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("second", LoraConfig(target_modules=["q_proj"]))
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))
