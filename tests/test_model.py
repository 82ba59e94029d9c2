"""PeftModel behaviour, checked number for number against PEFT."""

import copy

import peft
import pytest
import torch
from tiny_models import outputs, tiny_gpt2, tiny_llama, tiny_mlp, tiny_scaled_embedding_mlp, token_batch
from transformers import LlamaForCausalLM

import lorakit
from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.layers import LoraLayer, ModulesToSaveWrapper
from lorakit.model import unwrapped

ATOL = 1e-5

MODELS = {
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj"], ["lm_head"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"], ["lm_head"]),
    "mlp": (tiny_mlp, ["lin0", "lin1"], ["head"]),
    "llama_embedding": (tiny_llama, ["embed_tokens", "q_proj", "v_proj"], ["lm_head"]),
    "scaled_embedding": (tiny_scaled_embedding_mlp, ["emb", "lin0"], ["head"]),  # Gemma 3's embed_scale
}
VARIANTS = {
    "plain": {},
    "rslora": {"use_rslora": True, "lora_alpha": 32},
    "dora": {"use_dora": True},
    "bias_all": {"bias": "all"},
    "bias_lora_only": {"bias": "lora_only"},
    "modules_to_save": {"modules_to_save": "HEAD"},
}


def build_pair(model_name: str, variant: dict, **extra):
    """The same random base wrapped by PEFT and by lorakit, with identical (nonzero) adapter weights."""
    factory, targets, head = MODELS[model_name]
    kwargs = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                  fan_in_fan_out=model_name == "gpt2")
    kwargs.update(variant)
    kwargs.update(extra)
    if kwargs.get("modules_to_save") == "HEAD":
        kwargs["modules_to_save"] = head
    theirs = peft.get_peft_model(factory(), peft.LoraConfig(**kwargs))
    ours = get_peft_model(factory(), LoraConfig(**kwargs))
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():  # perturb magnitudes and heads so every trainable tensor matters
        for key, value in theirs.state_dict(keep_vars=True).items():
            if value.requires_grad and ("magnitude" in key or "modules_to_save" in key):
                value.add_(torch.randn_like(value) * 0.1)
    ours.load_state_dict(theirs.state_dict())
    return theirs.eval(), ours.eval()


def test_unwrapped_finds_the_users_model_inside_either_wrapper():
    theirs, ours = build_pair("llama", {})
    assert isinstance(unwrapped(ours), LlamaForCausalLM) and unwrapped(ours) is ours.base_model.model
    assert unwrapped(theirs) is theirs.base_model.model
    bare = tiny_llama()
    assert unwrapped(bare) is bare


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_outputs_and_gradients_match_peft(model_name, variant):
    theirs, ours = build_pair(model_name, VARIANTS[variant])
    ids = token_batch()
    assert torch.allclose(outputs(ours, ids), outputs(theirs, ids), atol=ATOL)

    ours_trainable = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    theirs_trainable = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours_trainable.keys() == theirs_trainable.keys()
    outputs(ours, ids).float().pow(2).mean().backward()
    outputs(theirs, ids).float().pow(2).mean().backward()
    for name, param in ours_trainable.items():
        assert torch.allclose(param.grad, theirs_trainable[name].grad, atol=ATOL), name


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_parameter_counts_match_peft(model_name, variant, capsys):
    theirs, ours = build_pair(model_name, VARIANTS[variant])
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    theirs.print_trainable_parameters()
    expected = capsys.readouterr().out
    ours.print_trainable_parameters()
    assert capsys.readouterr().out == expected


@pytest.mark.parametrize("extra", [
    {"target_modules": ["embed_tokens", "q_proj"]},
    {"layers_to_transform": [1]},
    {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"layers.1.self_attn.v_proj": 3}},
    {"target_modules": r".*\.layers\.0\.self_attn\.(q|v)_proj"},
    {"target_modules": "all-linear"},
    {"exclude_modules": ["k_proj"]},
])
def test_targeting_options_match_peft(extra):
    theirs, ours = build_pair("llama", {}, **extra)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ids = token_batch()
    assert torch.allclose(outputs(ours, ids), outputs(theirs, ids), atol=ATOL)


def test_a_module_trained_whole_gets_no_lora_as_in_peft():
    # lm_head both targeted and in modules_to_save: PEFT trains it whole and puts no LoRA in it.
    theirs, ours = build_pair("llama", {}, target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"])
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert not any("lm_head" in n and "lora_" in n for n in ours.state_dict())
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    # all-linear on a classifier leaves its head to modules_to_save (SEQ_CLS adds "score" there)
    from transformers import LlamaForSequenceClassification

    config = tiny_llama().config
    config.num_labels = 3
    kwargs = dict(target_modules="all-linear", task_type="SEQ_CLS", init_lora_weights=False)
    torch.manual_seed(0)
    base = LlamaForSequenceClassification(config)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_layers_to_transform_finds_any_numbered_container():
    class Stack(torch.nn.Module):  # blocks in body.stack.N, a container name lorakit has no list for
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Module()
            self.body.stack = torch.nn.ModuleList(torch.nn.ModuleDict({"fc": torch.nn.Linear(8, 8)}) for _ in range(3))

        def forward(self, x):
            for block in self.body.stack:
                x = block["fc"](x)
            return x

    kwargs = dict(target_modules=["fc"], layers_to_transform=[1], r=2)
    theirs = peft.get_peft_model(Stack(), peft.LoraConfig(**kwargs))
    ours = get_peft_model(Stack(), LoraConfig(**kwargs))
    assert ours.base_model.targeted_module_names == ["body.stack.1.fc"]
    assert ours.state_dict().keys() == theirs.state_dict().keys()


# -- files ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name,variant", [("llama", "plain"), ("llama", "dora"), ("gpt2", "bias_lora_only"),
                                                ("llama", "modules_to_save"), ("llama_embedding", "dora")])
def test_lorakit_adapter_loads_in_peft_and_back(tmp_path, model_name, variant):
    theirs, ours = build_pair(model_name, VARIANTS[variant])
    factory = MODELS[model_name][0]
    ids = token_batch()
    expected = outputs(ours, ids)

    ours.save_pretrained(tmp_path / "ours")
    in_peft = peft.PeftModel.from_pretrained(factory(), tmp_path / "ours").eval()
    assert torch.allclose(outputs(in_peft, ids), expected, atol=ATOL)

    theirs.save_pretrained(tmp_path / "theirs")
    in_ours = PeftModel.from_pretrained(factory(), tmp_path / "theirs").eval()
    assert torch.allclose(outputs(in_ours, ids), expected, atol=ATOL)
    assert not any(p.requires_grad for p in in_ours.parameters())


def test_saved_files_use_peft_key_names_and_fields(tmp_path):
    theirs, ours = build_pair("llama", {})
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file

    ours_keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert ours_keys == set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in ours_keys
    import json

    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(theirs_cfg) - set(ours_cfg) <= {"peft_version"}
    for field in ("r", "lora_alpha", "target_modules", "peft_type", "bias", "use_dora", "inference_mode"):
        value = ours_cfg[field]
        assert (sorted(value) if isinstance(value, list) else value) == \
            (sorted(theirs_cfg[field]) if isinstance(theirs_cfg[field], list) else theirs_cfg[field])


def test_from_pretrained_trainable_and_frozen(tmp_path):
    _, ours = build_pair("llama", {}, lora_dropout=0.5)
    ours.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_llama().train(), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    assert not frozen.training  # loaded for inference: no dropout, as PEFT
    ids = token_batch()
    assert torch.equal(outputs(frozen, ids), outputs(frozen, ids))
    trainable = PeftModel.from_pretrained(tiny_llama().train(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == ours.get_nb_trainable_parameters()[0]
    assert trainable.training


def test_subfolder_and_save_options_as_in_peft(tmp_path):
    _, ours = build_pair("llama", {})
    ours.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    ids = token_batch()
    ours.set_adapter("b")
    expected = outputs(ours, ids)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, subfolder="b")
    assert torch.allclose(outputs(loaded, ids), expected, atol=ATOL)
    loaded.load_adapter(tmp_path, "b2", subfolder="b")
    loaded.set_adapter("b2")
    assert torch.allclose(outputs(loaded, ids), expected, atol=ATOL)
    with pytest.raises(lorakit.errors.AdapterLoadError, match="no sub-folder 'c'; sub-folders holding an adapter: b"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, subfolder="c")
    ours.save_pretrained(tmp_path / "not_main", is_main_process=False)
    assert not (tmp_path / "not_main").exists()
    with pytest.warns(UserWarning, match="ignores safe_serialization=False"):
        ours.save_pretrained(tmp_path / "st", safe_serialization=False)
    assert (tmp_path / "st" / "adapter_model.safetensors").is_file()
    with pytest.warns(UserWarning, match="ignores these adapter-loading options: unknown_option"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, unknown_option=1, low_cpu_mem_usage=True)


def test_peft_attributes_and_errors():
    theirs, ours = build_pair("llama", VARIANTS["modules_to_save"])
    assert ours.peft_type == "LORA" and ours.active_peft_config is ours.peft_config["default"]
    assert ours.modules_to_save == set(theirs.modules_to_save) == {"lm_head"}
    assert ours.base_model.targeted_module_names == theirs.targeted_module_names
    ids = token_batch()
    ours.disable_adapter_layers()
    assert torch.allclose(outputs(ours, ids), outputs(tiny_llama(), ids), atol=ATOL)
    ours.enable_adapter_layers()
    assert torch.allclose(outputs(ours, ids), outputs(theirs, ids), atol=ATOL)
    with pytest.raises(ValueError, match="No adapter named 'nope'"):  # PEFT raises ValueError too
        ours.set_adapter("nope")
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 3 rows"):
        ours(input_ids=ids, adapter_names=["default", "__base__"])


@pytest.mark.parametrize("init", ["olora", "pissa", "pissa_niter_4", "orthogonal"])
def test_initialisations_of_peft_that_change_the_base(init):
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs))
    ours = get_peft_model(tiny_llama(), LoraConfig(**kwargs))
    ids = token_batch()
    # each starts as the base model: residual base + B A, or B A = 0 with neither factor zero
    assert torch.allclose(outputs(ours, ids), outputs(tiny_llama(), ids), atol=ATOL)
    if init in ("olora", "pissa"):  # deterministic: the same factors and residual as PEFT's
        theirs_state = theirs.state_dict()
        for key, value in ours.state_dict().items():
            assert torch.allclose(value, theirs_state[key], atol=ATOL), key
    else:  # random: the update starts at zero although B does not
        layer = ours.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.lora_B["default"].weight.abs().min() > 0


def test_many_adapters_saved_in_peft_layout(tmp_path):
    _, ours = build_pair("llama", {})
    ours.add_adapter("billing", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "billing" / "adapter_model.safetensors").is_file()
    ids = token_batch()
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    reloaded.load_adapter(tmp_path / "billing", adapter_name="billing")
    for name in ("default", "billing"):
        ours.set_adapter(name)
        reloaded.set_adapter(name)
        assert torch.allclose(outputs(reloaded, ids), outputs(ours, ids), atol=ATOL)
    # PEFT reads the same layout
    in_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    in_peft.load_adapter(tmp_path / "billing", adapter_name="billing")
    in_peft.set_adapter("billing")
    assert torch.allclose(outputs(in_peft.eval(), ids), outputs(ours, ids), atol=ATOL)


def test_base_model_name_is_written_and_mismatch_warns(tmp_path):
    base = tiny_llama()
    base.config.name_or_path = "org/base-a"
    ours = get_peft_model(base, LoraConfig(target_modules=["q_proj"]))
    ours.save_pretrained(tmp_path)
    import json

    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/base-a"
    other = tiny_llama()
    other.config.name_or_path = "org/base-b"
    with pytest.warns(UserWarning, match="trained on 'org/base-a'"):
        PeftModel.from_pretrained(other, tmp_path)


# -- adapters at run time ---------------------------------------------------------------------------
def test_set_adapter_never_changes_trainability():
    _, ours = build_pair("llama", {})
    ours.add_adapter("frozen", LoraConfig(r=2, target_modules=["q_proj"], inference_mode=True))
    frozen = set(map(id, ours.base_model.adapter_parameters("frozen")))
    ours.set_adapter("frozen")
    assert not any(p.requires_grad for p in ours.parameters() if id(p) in frozen)
    ours.set_requires_grad("frozen", True)
    assert all(p.requires_grad for p in ours.parameters() if id(p) in frozen)


def test_disable_adapter_and_delete_adapter():
    base = tiny_llama()
    ids = token_batch()
    reference = outputs(base, ids)
    _, ours = build_pair("llama", {})
    with ours.disable_adapter():
        assert torch.allclose(outputs(ours, ids), reference, atol=ATOL)
    assert not torch.allclose(outputs(ours, ids), reference, atol=1e-3)
    ours.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    ours.delete_adapter("default")
    assert ours.active_adapter == "other" and list(ours.peft_config) == ["other"]
    assert torch.allclose(outputs(ours, ids), reference, atol=ATOL)  # 'other' starts at zero
    with pytest.raises(lorakit.AdapterNotFoundError, match="loaded adapters: other"):
        ours.set_adapter("default")


# -- merging ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name,variant", [("llama", "plain"), ("llama", "dora"), ("gpt2", "plain"),
                                                ("mlp", "modules_to_save"), ("llama_embedding", "dora"),
                                                ("scaled_embedding", "plain"), ("scaled_embedding", "dora")])
def test_merge_equals_unmerged_and_unmerge_restores(model_name, variant):
    _, ours = build_pair(model_name, VARIANTS[variant])
    ids = token_batch()
    expected = outputs(ours, ids)
    weights = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    ours.merge_adapter()
    assert torch.allclose(outputs(ours, ids), expected, atol=ATOL)
    ours.unmerge_adapter()
    for name, param in ours.named_parameters():
        if name in weights:
            assert torch.allclose(param, weights[name], atol=1e-6), name
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) for m in merged.modules())
    assert type(merged) is type(MODELS[model_name][0]())
    assert torch.allclose(outputs(merged, ids), expected, atol=ATOL)


def test_merging_dora_after_another_adapter_equals_unmerged():
    # The DoRA norm is taken on the base without merged adapters, as its forward sees it (and PEFT).
    _, ours = build_pair("llama_embedding", {})
    ours.add_adapter("d", LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], use_dora=True,
                                     init_lora_weights=False))
    ours.set_adapter(["default", "d"])
    ids = token_batch()
    expected = outputs(ours, ids)
    ours.merge_adapter()
    assert torch.allclose(outputs(ours, ids), expected, atol=ATOL)
    ours.unmerge_adapter()
    assert torch.allclose(outputs(ours, ids), expected, atol=ATOL)


def test_embedding_adapter_on_a_bf16_base_trains_in_float32():
    ours = get_peft_model(tiny_llama().to(torch.bfloat16),
                          LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], use_dora=True))
    dtypes = {n.split(".")[-2 if "magnitude" in n else -1]: p.dtype for n, p in ours.named_parameters()
              if p.requires_grad}
    assert set(dtypes.values()) == {torch.float32}
    ids = token_batch()
    assert outputs(ours, ids, adapter_names=["default", "__base__", "default"]).dtype == torch.bfloat16


def test_merging_into_tied_weights_warns():
    base = tiny_llama()
    base.config.tie_word_embeddings = True
    base.tie_weights()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    ours = get_peft_model(base, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    with pytest.warns(UserWarning, match="merging into model.embed_tokens, whose weight is tied to lm_head"):
        ours.merge_and_unload()


def test_merged_model_is_plain_transformers(tmp_path):
    _, ours = build_pair("llama", {})
    ids = token_batch()
    expected = outputs(ours, ids)
    ours.merge_and_unload().save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(outputs(reloaded, ids), expected, atol=ATOL)


def test_safe_merge_refuses_nan():
    _, ours = build_pair("llama", {})
    layer = ours.base_model.model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    before = ours.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with pytest.raises(ValueError, match="NaN/inf"):
        ours.merge_and_unload(safe_merge=True)
    assert torch.equal(ours.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, before)
    # on a 4-bit base the refusal comes before anything is unpacked
    from lorakit.quant import NF4Linear, quantize_model

    quantized = get_peft_model(quantize_model(tiny_llama()), LoraConfig(r=2, target_modules=["v_proj"]))
    with torch.no_grad():
        quantized.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        quantized.merge_and_unload(safe_merge=True)
    assert isinstance(quantized.base_model.model.model.layers[0].self_attn.q_proj, NF4Linear)


def test_unload_returns_base_without_changes():
    base_out = outputs(tiny_llama(), token_batch())
    _, ours = build_pair("llama", {})
    plain = ours.unload()
    assert torch.allclose(outputs(plain, token_batch()), base_out, atol=ATOL)


# -- the README snippet on the embedded model -------------------------------------------------------
def test_readme_snippet_on_smollm2_matches_peft(capsys):
    from lorakit.models import load_base_model

    kwargs = dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "k_proj", "o_proj"],
                  lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
    base, _ = load_base_model("smollm2")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    theirs.print_trainable_parameters()
    expected = capsys.readouterr().out
    model = get_peft_model(base, LoraConfig(**kwargs))
    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    assert printed == expected
    assert printed.startswith("trainable params: 1,843,200 || all params: ")


# -- LoRA on a 4-bit base -----------------------------------------------------------------------------
def test_lora_on_nf4_base_trains_and_merges(tmp_path):
    from lorakit.quant import NF4Linear, quantize_model

    model = get_peft_model(quantize_model(tiny_llama(), "nf4"),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = token_batch()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.grad is not None
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    with pytest.raises(ValueError, match="use merge_and_unload"):
        model.merge_adapter()
    expected = outputs(model.eval(), ids)
    second = copy.deepcopy(model)

    with pytest.warns(UserWarning, match="dequantized to full precision"):
        merged = model.merge_and_unload()
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())
    assert torch.allclose(outputs(merged, ids), expected, atol=ATOL)
    merged.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(outputs(reloaded, ids), expected, atol=ATOL)

    with pytest.warns(UserWarning, match="second rounding"):
        requantized = second.merge_and_unload(requantize=True)
    assert sum(isinstance(m, NF4Linear) for m in requantized.modules()) == 2 * 7
    reference = quantize_model(copy.deepcopy(merged), "nf4")
    assert torch.allclose(outputs(requantized, ids), outputs(reference, ids), atol=1e-6)


def test_dora_on_nf4_base_equals_dora_on_the_dequantized_base():
    from lorakit.quant import dequantize_model, quantize_model

    quantized = quantize_model(tiny_llama(), "nf4")
    plain = dequantize_model(copy.deepcopy(quantized))  # the same (rounded) weights, as nn.Linear
    config = dict(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False)
    torch.manual_seed(3)
    on_nf4 = get_peft_model(quantized, LoraConfig(**config))
    on_plain = get_peft_model(plain, LoraConfig(**config))
    on_plain.load_state_dict(on_nf4.state_dict(), strict=False)
    ids = token_batch()
    assert torch.allclose(outputs(on_nf4.eval(), ids), outputs(on_plain.eval(), ids), atol=ATOL)
    with pytest.warns(UserWarning, match="dequantized to full precision"):
        merged = on_nf4.merge_and_unload()
    assert torch.allclose(outputs(merged, ids), outputs(on_plain, ids), atol=ATOL)


class _PairsDataset(torch.utils.data.Dataset):
    """Token rows as a dataset hands them to the Hugging Face Trainer, with a column no model takes."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        ids = torch.randint(3, 100, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "source": f"row {i}"}


def test_hf_trainer_trains_a_lorakit_model_as_it_trains_peft(tmp_path):
    # The usual PEFT recipe with the import changed: Trainer keeps the columns forward names, passes
    # num_items_in_batch, and takes the fused-loss path; it must end where PEFT ends.
    from transformers import Trainer, TrainingArguments

    setting = dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    theirs, ours = build_pair("llama", {}, **setting)
    start = {k: v.clone() for k, v in ours.state_dict().items() if "lora_" in k}
    losses = {}
    for name, model in (("lorakit", ours), ("peft", theirs)):
        args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=4, num_train_epochs=1,
                                 learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                                 disable_tqdm=True)
        losses[name] = Trainer(model=model.train(), args=args, train_dataset=_PairsDataset()).train().training_loss
    assert losses["lorakit"] == pytest.approx(losses["peft"], abs=1e-5)
    mine = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    reference = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    assert mine.keys() == reference.keys() and len(mine) == 8
    for key, value in mine.items():
        assert torch.allclose(value, reference[key], atol=ATOL), key
    assert all((mine[k] - start[k]).abs().max() > 1e-3 for k in mine)  # every tensor trained


def test_hf_trainer_checkpoints_and_resumes_a_model_with_tied_embeddings(tmp_path):
    # SmolLM2, Llama 3.2 and small Qwens tie lm_head to the embedding. The Trainer saves a model that is not
    # PEFT's class with safetensors, which refuses tensors that share memory: state_dict holds a tied weight once.
    from transformers import Trainer, TrainingArguments

    def tied_model():
        base = tiny_llama()
        base.config.tie_word_embeddings = True
        base.tie_weights()
        torch.manual_seed(1)
        return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))

    def trainer(model, out):
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                                 save_steps=2, report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
        return Trainer(model=model.train(), args=args, train_dataset=_PairsDataset())

    straight = tied_model()
    trainer(straight, tmp_path / "a").train()
    assert (tmp_path / "a" / "checkpoint-2" / "model.safetensors").is_file()
    resumed = tied_model()
    trainer(resumed, tmp_path / "b").train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    want = {k: v for k, v in straight.state_dict().items() if "lora_" in k}
    got = {k: v for k, v in resumed.state_dict().items() if "lora_" in k}
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    # the tied weight is stored once and loads back strictly
    state = straight.state_dict()
    assert "base_model.model.lm_head.weight" not in state and "base_model.model.model.embed_tokens.weight" in state
    fresh = tied_model()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.base_model.model.lm_head.weight, straight.base_model.model.lm_head.weight)


@pytest.mark.parametrize("use_dora", [False, True])
def test_bf16_base_outputs_equal_peft_to_the_bit(use_dora):
    """bf16 base, float32 adapters, no autograd: each adapter's output is added in float32 and the sum rounded
    once, as PEFT does (rounding each adapter's output to bf16 first was up to 6e-3 off PEFT's logits)."""
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
                  init_lora_weights=False, use_dora=use_dora)
    theirs = peft.get_peft_model(tiny_llama().bfloat16(), peft.LoraConfig(**kwargs)).eval()
    ours = get_peft_model(tiny_llama().bfloat16(), LoraConfig(**kwargs)).eval()
    ours.load_state_dict(theirs.state_dict())
    ids = token_batch()
    with torch.no_grad():
        logits = ours(input_ids=ids).logits
        assert logits.dtype == torch.bfloat16
        assert torch.equal(logits, theirs(input_ids=ids).logits)
