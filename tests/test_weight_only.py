"""Int8 weight-only decoding: the layer's arithmetic, which modules a model swaps, LoRA on top, and the choice."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_llama
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit import weight_only
from lorakit.weight_only import (BATCH_ROWS, FLOAT32_BATCH_ROWS, GROUP_SIZE, HEAD_BATCH_ROWS, Int4Linear,
                                 Int8Linear, decode_precision, fuse_rows, prepare_for_decode, quantize_for_decode,
                                 reproduces_in_int4)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_int8_linear_is_the_rounded_weight_times_its_scale():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    q = Int8Linear.from_linear(linear)
    assert q.weight_q.dtype == torch.int8 and q.scale.dtype == torch.bfloat16 and q.weight_q.abs().max() <= 127
    # Each row's largest weight maps to +-127, and every weight is within half a step of its int8 value.
    w = linear.weight.detach()
    assert (q.weight_q.abs().amax(dim=1) == 127).all()
    assert ((q.dequantize() - w).abs() <= q.scale.float()[:, None] / 2 * 1.01).all()
    # The forward is the bf16-rounded input times that dequantized weight (the op's own accumulation aside).
    x = torch.randn(3, 5, 96)
    expected = x.bfloat16().float() @ q.dequantize().T + linear.bias.detach()
    torch.testing.assert_close(q(x), expected, rtol=2e-2, atol=2e-2)
    assert q(x).dtype == torch.float32 and q(x).shape == (3, 5, 40)
    # ...and close to the float32 layer: about 1% of the output's scale.
    out, ref = q(x), linear(x)
    assert (out - ref).norm() / ref.norm() < 0.02


def four_bit_weight(out_features: int, in_features: int) -> torch.Tensor:
    """A weight as a Q4_1 GGUF stores it: per group of 32 inputs, d * q + m with q in 0..15."""
    torch.manual_seed(1)
    groups = in_features // GROUP_SIZE
    d = torch.rand(out_features, groups, 1) * 0.01 + 0.001
    m = -8 * d + torch.randn(out_features, groups, 1) * 0.002
    q = torch.randint(0, 16, (out_features, groups, GROUP_SIZE)).float()
    q[..., 0], q[..., 1] = 0, 15  # Q4_1 maps each group's min and max to the ends of the range
    return (d * q + m).reshape(out_features, in_features)


def test_int4_linear_reproduces_four_bit_weights_and_detects_others():
    linear = nn.Linear(128, 48)
    with torch.no_grad():
        linear.weight.copy_(four_bit_weight(48, 128))
    assert reproduces_in_int4(linear.weight) and not reproduces_in_int4(torch.randn(48, 128))
    q = Int4Linear.from_linear(linear)
    # The stored weight is the 4-bit one up to bfloat16 rounding (scales, zero points, dequantize's output): a small
    # fraction of a quantization step, where a wrong code would be a whole step off.
    groups = linear.weight.detach().reshape(48, -1, GROUP_SIZE)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    assert ((q.dequantize().reshape(groups.shape) - groups).abs() / step[..., None]).max() < 0.15
    x = torch.randn(2, 7, 128)
    expected = x.bfloat16().float() @ q.dequantize().T + linear.bias.detach()
    torch.testing.assert_close(q(x), expected, rtol=2e-2, atol=2e-2)
    assert (q(x) - linear(x)).norm() / linear(x).norm() < 0.01
    # A random weight is rounded to the nearest of its group's 16 levels: within half a step (and bfloat16's share).
    random = nn.Linear(128, 48)
    groups = random.weight.detach().reshape(48, -1, GROUP_SIZE)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    error = (Int4Linear.from_linear(random).dequantize().reshape(groups.shape) - groups).abs() / step[..., None]
    assert 0.4 < error.max() < 0.6
    with pytest.raises(ValueError, match="multiple of 32"):
        Int4Linear.from_linear(nn.Linear(40, 48))


def four_bit_llama():
    model = tiny_llama()
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module) is nn.Linear and name != "lm_head":
                module.weight.copy_(four_bit_weight(*module.weight.shape))
    return model


def test_int4_keeps_the_head_int8_and_auto_picks_int4_with_a_bf16_copy_for_a_four_bit_base(monkeypatch):
    model = four_bit_llama()
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert prepare_for_decode(model, "int4") == "int4"
    assert all(m.batch_weight is None for m in model.modules() if isinstance(m, (Int4Linear, Int8Linear)))
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 14 and isinstance(model.lm_head, Int8Linear)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() < 0.02 * before.abs().max()
    for speedup in (0.3, 1.8):  # a CPU without bf16 units, one with them: int4 with a bf16 copy either way
        monkeypatch.setattr(weight_only, "bf16_matmul_speedup", lambda device: speedup)
        assert decode_precision("auto", torch.device("cpu"), four_bit_llama()) == "int4+bf16"
    # A model with ordinary weights keeps them.
    assert decode_precision("auto", torch.device("cpu"), tiny_llama()) == "fp32"


def test_int4_with_a_bf16_copy_multiplies_batches_by_the_same_weights():
    linear = nn.Linear(128, 64)
    with torch.no_grad():
        linear.weight.copy_(four_bit_weight(64, 128))
    plain, layer = Int4Linear.from_linear(linear), Int4Linear.from_linear(linear)
    layer.keep_bf16_copy()
    # The copy is the weight the packed matmul multiplies by (already bfloat16 values), not saved with the model.
    assert layer.batch_weight.dtype == torch.bfloat16 and torch.equal(layer.batch_weight.float(), plain.dequantize())
    assert "batch_weight" not in layer.state_dict() and "bfloat16 copy" in repr(layer)
    few, many = torch.randn(BATCH_ROWS - 1, 128), torch.randn(2, BATCH_ROWS, 128)
    # Under BATCH_ROWS rows the packed matmul, bit for bit; from BATCH_ROWS on the bfloat16 matmul on the copy.
    assert torch.equal(layer(few), plain(few))
    by_copy = (many.bfloat16() @ layer.batch_weight.T).float() + linear.bias.detach()
    assert torch.equal(layer(many), by_copy)
    torch.testing.assert_close(layer(many), plain(many), rtol=1e-2, atol=1e-2)
    # Fusing keeps one copy: the parts' copies are views of the fused one's rows.
    parts = [Int4Linear.from_linear(nn.Linear(128, 64)) for _ in range(2)]
    for part in parts:
        part.keep_bf16_copy()
    fused = fuse_rows(parts)
    assert fused.batch_weight.shape == (128, 128) and fused.batch_rows == BATCH_ROWS
    assert parts[1].batch_weight.data_ptr() == fused.batch_weight[64:].data_ptr()
    x = torch.randn(BATCH_ROWS, 128)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))


def test_without_bf16_units_the_copy_is_multiplied_in_float32_for_prompts_and_the_head_keeps_none(monkeypatch):
    model = four_bit_llama()
    ids = torch.arange(3, 3 + FLOAT32_BATCH_ROWS)[None]  # a prompt just long enough for the copy
    int4, bf16_units = copy.deepcopy(model), copy.deepcopy(model)
    quantize_for_decode(int4, "int4")
    monkeypatch.setattr(weight_only, "bf16_matmul_speedup", lambda device: 1.8)
    quantize_for_decode(bf16_units, "int4+bf16")
    monkeypatch.setattr(weight_only, "bf16_matmul_speedup", lambda device: 0.3)  # an AVX2-only CPU
    assert prepare_for_decode(model, "auto") == "int4+bf16"
    body = [m for name, m in model.named_modules() if isinstance(m, (Int4Linear, Int8Linear)) and name != "lm_head"]
    assert len(body) == 14 and all(m.batch_in_float32 and m.batch_rows == FLOAT32_BATCH_ROWS for m in body)
    assert model.lm_head.batch_weight is None and "multiplied in float32" in repr(body[0])
    # The same bf16 values as the copy multiplied in bf16: a layer's rows equal the widened product exactly.
    layer, x = body[0], torch.randn(FLOAT32_BATCH_ROWS, body[0].in_features)
    assert torch.equal(layer(x), x.bfloat16().float() @ layer.batch_weight.float().T)
    assert torch.equal(layer(x[:-1]), int4.get_submodule("model.layers.0.self_attn.q_proj")(x[:-1]))
    with torch.no_grad():
        logits, packed, bf16 = (m(input_ids=ids).logits for m in (model, int4, bf16_units))
    assert (logits - packed).abs().max() < 0.01 * packed.abs().max()
    assert (logits - bf16).abs().max() < 0.01 * packed.abs().max()


def test_auto_keeps_a_bf16_copy_where_bf16_matmuls_are_fast(monkeypatch):
    model = four_bit_llama()
    ids = torch.arange(3, 3 + 2 * BATCH_ROWS)[None]  # a prompt long enough for the copy
    int4 = copy.deepcopy(model)
    quantize_for_decode(int4, "int4")
    with torch.no_grad():
        before, packed = model(input_ids=ids).logits, int4(input_ids=ids).logits
    monkeypatch.setattr(weight_only, "bf16_matmul_speedup", lambda device: 1.8)
    assert prepare_for_decode(model, "auto") == "int4+bf16"
    layers = [m for m in model.modules() if isinstance(m, (Int4Linear, Int8Linear))]
    assert len(layers) == 15 and all(m.batch_weight is not None for m in layers)
    # the head (int8) from HEAD_BATCH_ROWS rows on, the int4 body from BATCH_ROWS
    assert model.lm_head.batch_rows == HEAD_BATCH_ROWS
    assert all(m.batch_rows == BATCH_ROWS for m in layers if m is not model.lm_head)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    # The same weights as int4 alone (bfloat16 outputs either way), and as near the float32 model
    assert (after - packed).abs().max() < 0.01 * before.abs().max()
    assert (after - before).abs().max() < 0.03 * before.abs().max()


def test_quantize_for_decode_swaps_the_base_weights_and_leaves_the_adapter_alone():
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False))
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        lora_a = {n: p.clone() for n, p in model.named_parameters() if "lora_" in n}
    count = quantize_for_decode(model)
    assert count == 2 * 7 + 1  # 7 projections in each of 2 layers, and the output head
    assert not any(type(m) is nn.Linear and "lora_" not in name for name, m in model.named_modules())
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, Int8Linear) and type(q_proj.lora_A["default"]) is nn.Linear
    for name, param in model.named_parameters():  # the adapter's weights are untouched
        if "lora_" in name:
            assert torch.equal(param, lora_a[name])
    with torch.no_grad():
        after = model(input_ids=ids).logits
        # The adapter still adds its update: the same model with adapters disabled answers differently.
        with model.disable_adapter():
            no_adapter = model(input_ids=ids).logits
    assert (after - before).abs().max() < 0.05 * before.abs().max()
    assert (after - no_adapter).abs().max() > 0.1 * (before - base(input_ids=ids).logits).abs().max()
    # Greedy decoding of the int8 model is what the float32 one picks on this tiny model's first tokens.
    assert torch.equal(after.argmax(-1), before.argmax(-1))


def test_an_adapter_added_after_quantizing_trains_on_the_dequantized_weight():
    base = tiny_llama()
    quantize_for_decode(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, Int8Linear) and layer.lora_A["default"].weight.dtype == torch.float32
    assert not base.config.tie_word_embeddings


def test_decode_precision_choices():
    assert decode_precision("fp32", torch.device("cpu")) == "fp32"
    assert decode_precision("int8", torch.device("cpu")) == "int8"
    assert decode_precision("auto", torch.device("cuda")) == "fp32"
    with pytest.raises(ValueError, match="CPU kernels; the model is on cuda: use --decode-precision fp32"):
        decode_precision("int4", torch.device("cuda"))
    assert decode_precision("auto", torch.device("cpu")) == "fp32"  # no model to look at
    assert decode_precision("int4+bf16", torch.device("cpu")) == "int4+bf16"
    with pytest.raises(ValueError, match="decode precision must be one of auto, fp32, int8, int4, int4\\+bf16"):
        decode_precision("int2", torch.device("cpu"))
    model = tiny_llama()
    assert prepare_for_decode(model, "fp32") == "fp32" and not any(isinstance(m, Int8Linear) for m in model.modules())
    assert prepare_for_decode(model, "int8") == "int8" and any(isinstance(m, Int8Linear) for m in model.modules())
