"""The fast decode step (serve/decode_step.py) against the model's own forward through the same slot cache: equal
logits (float32 within 1e-5; int4 and int8 bases too) with no adapter, one adapter, and a batch mixing adapters
of other ranks and targets with base rows; fused weights share the model's storage; what it does not cover
(DoRA, an adapted head, merged adapters, other architectures) is left to the forward."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lorakit import LoraConfig, get_peft_model
from lorakit.serve.decode_step import TABLE_SETS, DecodeStep
from lorakit.serve.kv_cache import SlotCache
from lorakit.weight_only import Int4Linear, Int8Linear, fuse_rows, quantize_for_decode

VOCAB = 96


def llama(seed=0, cls=LlamaForCausalLM, config_cls=LlamaConfig, hidden=64, **extra) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = config_cls(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, **extra)
    return cls(config).eval()


def with_adapters(base, specs: dict) -> torch.nn.Module:
    """A PeftModel carrying random (non-zero) adapters: {name: LoraConfig kwargs}."""
    model = None
    for i, (name, kwargs) in enumerate(specs.items()):
        torch.manual_seed(100 + i)
        config = LoraConfig(init_lora_weights=False, **kwargs)
        if model is None:
            model = get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model.eval()


def prefilled(hf, prompts: list[list[int]], names, peft=None) -> SlotCache:
    """A slot cache holding each prompt's K/V (its own adapter's), as the engine's prefill leaves it."""
    cfg = hf.config
    cache = SlotCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                      len(prompts), 256, hf.dtype, torch.device("cpu"))
    from transformers import DynamicCache

    for slot, (prompt, name) in enumerate(zip(prompts, names)):
        past = DynamicCache(config=cfg)
        ids = torch.tensor([prompt])
        if peft is not None:
            peft(input_ids=ids, adapter_names=[name], past_key_values=past, use_cache=True)
        else:
            hf(input_ids=ids, past_key_values=past, use_cache=True)
        cache.write(slot, [layer.keys[0] for layer in past.layers], [layer.values[0] for layer in past.layers])
    return cache


def both_ways(model, hf, names, prompts, steps=3, fast_step=None):
    """Logits of `steps` decode steps, by the fast step (a new one unless given) and by the model's forward, each
    from its own cache."""
    fast_step = fast_step or DecodeStep(hf)
    peft = model if model is not hf else None
    caches = [prefilled(hf, prompts, names, peft) for _ in range(2)]
    positions = torch.tensor([len(p) for p in prompts])
    ids = torch.tensor([p[-1] for p in prompts])
    fast, slow = [], []
    with torch.no_grad():
        for _ in range(steps):
            assert fast_step.supports(names)
            caches[0].begin_step(positions)
            fast.append(fast_step.step(ids, positions, names, caches[0]))
            caches[1].begin_step(positions)
            mask = (torch.arange(int(positions.max()) + 1)[None, :] <= positions[:, None])[:, None, None, :]
            kwargs = {"adapter_names": list(names)} if peft is not None else {}
            out = model(input_ids=ids[:, None], position_ids=positions[:, None], attention_mask=mask,
                        past_key_values=caches[1], use_cache=True, **kwargs)
            slow.append(out.logits[:, -1])
            ids, positions = fast[-1].argmax(-1), positions + 1
    return torch.stack(fast), torch.stack(slow)


PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19], [20, 21]]


def test_base_model_equals_forward():
    hf = llama()
    fast, slow = both_ways(hf, hf, [None] * 2, PROMPTS[:2])
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_one_adapter_and_a_mixed_batch_equal_forward():
    hf = llama()
    model = with_adapters(hf, {"a": dict(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                               "b": dict(r=4, lora_alpha=16, target_modules="all-linear"),
                               "c": dict(r=2, target_modules=["v_proj", "down_proj"])})
    assert model.get_base_model() is hf
    fast, slow = both_ways(model, hf, ["b"] * 2, PROMPTS[:2])
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    fast, slow = both_ways(model, hf, ["a", None, "b", "c"], PROMPTS)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    # the adapters change the logits: the step did not drop them
    base_logits, _ = both_ways(model, hf, [None] * 4, PROMPTS)
    assert (fast[:, 0] - base_logits[:, 0]).abs().max() > 1e-2


def test_a_step_stacks_the_adapters_its_batch_uses_once_many_are_resident():
    hf = llama()
    model = with_adapters(hf, {f"a{i}": dict(r=2 + i % 3, target_modules=["q_proj", "v_proj", "o_proj"])
                               for i in range(10)})
    step = DecodeStep(hf)
    everyone = tuple(f"a{i}" for i in range(10))
    # (batch's row adapters, the adapters the step stacks): every resident adapter while they are at most twice
    # as many as the batch uses; else the batch's own, or a kept stack with them and at most as many others
    for names, stacked in [(["a0", "a1", None, "a1"], ("a0", "a1")),
                           (["a3", "a1", "a2", "a4", "a0"], everyone),
                           (["a5", "a6", "a7"], ("a5", "a6", "a7")),
                           (["a7", "a5", None], ("a5", "a6", "a7")),  # kept: 3 adapters for 2 used
                           (["a8"], ("a8",)),
                           (["a0", "a9"], ("a0", "a9"))]:
        assert step.stacked_adapters(names) == stacked
        fast, slow = both_ways(model, hf, names, (PROMPTS + [[22, 23, 24]])[:len(names)], fast_step=step)
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert step.kept_stacks == [("a0", "a1"), everyone, ("a5", "a6", "a7"), ("a8",), ("a0", "a9")]
    # stacks of several adapters: the TABLE_SETS used last (the least recently used dropped); of one: all
    for i in range(1, 4):
        both_ways(model, hf, [f"a{i}", f"a{i + 5}"], PROMPTS[:2], steps=1, fast_step=step)
    several = [stack for stack in step.kept_stacks if len(stack) > 1]
    assert several == [("a0", "a9"), ("a1", "a6"), ("a2", "a7"), ("a3", "a8")] and len(several) == TABLE_SETS
    assert ("a8",) in step.kept_stacks
    # few resident adapters: one stack of all of them serves every batch, as the adapters stay
    few = DecodeStep(llama(seed=1))
    with_adapters(few.hf, {n: dict(r=2, target_modules=["q_proj"]) for n in ("x", "y", "z")})
    assert few.stacked_adapters(["x", "y"]) == few.stacked_adapters(["z", None, "y"]) == ("x", "y", "z")


@pytest.mark.parametrize("precision", ["int4", "int8", "int4+bf16"])
def test_quantized_base_equals_forward(precision):
    hf = llama(hidden=128)  # k and v have 64 outputs: int4 fuses q, k and v (rows in blocks of 64)
    quantize_for_decode(hf, precision)
    for module in hf.modules():  # int4+bf16: this test's batches (3 rows) use the bfloat16 copy
        if getattr(module, "batch_weight", None) is not None:
            module.batch_rows = 2
    DecodeStep(hf)
    attn, mlp = hf.model.layers[0].self_attn, hf.model.layers[0].mlp
    for stored in ("packed", "batch_weight") if precision == "int4+bf16" else ("packed" if precision == "int4"
                                                                               else "weight_q",):
        storage = lambda m: getattr(m, stored).untyped_storage().data_ptr()
        assert storage(attn.q_proj) == storage(attn.k_proj) == storage(attn.v_proj) != storage(mlp.gate_proj)
        assert storage(mlp.gate_proj) == storage(mlp.up_proj)
    model = with_adapters(hf, {"a": dict(r=8, target_modules="all-linear"), "b": dict(r=4, target_modules=["q_proj"])})
    fast, slow = both_ways(model, hf, ["a", "b", None], PROMPTS[:3])
    # the packed matmul of a fused weight is the same arithmetic per output row as the parts'
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_nf4_base_runs_its_parts_apart_and_equals_forward():
    from lorakit.quant import quantize_model

    hf = llama()
    quantize_model(hf, "nf4")
    model = with_adapters(hf, {"a": dict(r=4, target_modules="all-linear")})
    fast, slow = both_ways(model, hf, ["a", None], PROMPTS[:2])
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_bf16_base_with_float32_adapters_is_close_to_forward():
    hf = llama().to(torch.bfloat16)
    model = with_adapters(hf, {"a": dict(r=8, target_modules="all-linear"), "b": dict(r=4, target_modules=["v_proj"])})
    assert model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["a"].weight.dtype == torch.float32
    fast, slow = both_ways(model, hf, ["a", "b", None], PROMPTS[:3])
    assert fast.dtype == slow.dtype == torch.bfloat16
    # the same arithmetic up to bf16 roundings taken in another order (fused matmuls, the stacked update)
    torch.testing.assert_close(fast.float(), slow.float(), atol=0.05, rtol=0.02)


def test_qwen2_with_attention_bias_equals_forward():
    hf = llama(cls=Qwen2ForCausalLM, config_cls=Qwen2Config)
    assert hf.model.layers[0].self_attn.q_proj.bias is not None
    model = with_adapters(hf, {"a": dict(r=4, target_modules="all-linear")})
    fast, slow = both_ways(model, hf, ["a", None], PROMPTS[:2])
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_fused_weights_are_views_of_one_tensor():
    hf = llama()
    DecodeStep(hf)
    attn = hf.model.layers[0].self_attn
    q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    with torch.no_grad():  # a write through the model's weight is what the fused matmul reads
        v.zero_()
    h = torch.randn(2, 64)
    fused = fuse_rows([attn.q_proj, attn.k_proj, attn.v_proj])
    assert fused(h)[:, -v.shape[0]:].abs().max() == 0


def test_int4_parts_not_in_row_blocks_of_64_stay_apart():
    parts = [Int4Linear.from_linear(torch.nn.Linear(64, 32)), Int4Linear.from_linear(torch.nn.Linear(64, 64))]
    assert fuse_rows(parts) is None
    assert fuse_rows([Int8Linear.from_linear(torch.nn.Linear(64, 32)), torch.nn.Linear(64, 32)]) is None


def test_what_the_step_does_not_cover_goes_to_the_forward():
    hf = llama()
    model = with_adapters(hf, {"plain": dict(r=4, target_modules=["q_proj"]),
                               "dora": dict(r=4, target_modules=["q_proj"], use_dora=True),
                               "head": dict(r=4, target_modules=["q_proj", "lm_head"])})
    step = DecodeStep(hf)
    assert step.supports(["plain", None])
    assert not step.supports(["plain", "dora"]) and not step.supports(["head"])
    model.merge_adapter(["plain"])
    step.adapters_changed()
    assert not step.supports(["plain"]) and not step.supports([None])
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB))
    assert not DecodeStep.architecture_supported(gpt2)
    assert DecodeStep.architecture_supported(copy.deepcopy(hf))
