"""NF4 quantization: code book, packing, error bounds, NF4Linear autograd, whole-model quantization."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import train_steps
from torch import nn

from lorakit.quant import (
    ABSMAX_BLOCK_SIZE, BLOCK_SIZE, NF4Linear, dequantize_model, dequantize_nf4, nf4_code, quantize_model,
    quantize_nf4, quantized_nbytes,
)
from lorakit.quant import _dequantize_absmax

# Published NF4 values, QLoRA paper appendix E.
PAPER_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(cfg).eval()


def test_code_book_matches_paper():
    code = nf4_code()
    assert code.shape == (16,) and code.dtype == torch.float32
    assert torch.allclose(code.double(), torch.tensor(PAPER_NF4, dtype=torch.float64), rtol=0, atol=1e-6)
    assert (code == 0).sum() == 1 and (code > 0).sum() == 8 and (code < 0).sum() == 7
    assert torch.all(code[1:] > code[:-1])


@pytest.mark.parametrize("shape", [(7, 9), (33,), (128, 64), (3, 5, 67)])
def test_packing_two_values_per_byte_and_shape(shape):
    w = torch.randn(shape)
    q = quantize_nf4(w)
    n = w.numel()
    n_blocks = math.ceil(n / BLOCK_SIZE)
    assert q["packed"].dtype == torch.uint8 and q["packed"].numel() == math.ceil(n / 2)
    assert q["absmax_q"].dtype == torch.int8
    assert q["absmax_q"].numel() == n_blocks
    assert q["absmax_scale"].numel() == math.ceil(n_blocks / ABSMAX_BLOCK_SIZE)
    back = dequantize_nf4(**q, shape=w.shape)
    assert back.shape == w.shape and back.dtype == torch.float32
    # Nibble order: the first value of each pair is the high nibble.
    code = nf4_code()
    stored_absmax = _dequantize_absmax(q["absmax_q"], q["absmax_scale"], q["absmax_mean"], n_blocks)
    byte = int(q["packed"][0])
    assert back.reshape(-1)[0] == code[byte >> 4] * stored_absmax[0]
    assert back.reshape(-1)[1] == code[byte & 15] * stored_absmax[0]


def test_exact_values_survive():
    # Zeros (and blocks that are all zero) are represented exactly; so is each block's absmax up to the
    # double-quantization error of the absmax itself.
    w = torch.randn(4, 64)
    w[1] = 0
    w[2, ::2] = 0
    back = dequantize_nf4(**quantize_nf4(w), shape=w.shape)
    assert torch.equal(back[1], torch.zeros(64))
    assert torch.equal(back[2, ::2], torch.zeros(32))


def test_roundtrip_error_within_nf4_bound():
    torch.manual_seed(0)
    w = torch.randn(257, 130) * torch.linspace(0.01, 3, 130)  # blocks of very different scales, n % 64 != 0
    w[5, :] *= 50  # outlier row
    q = quantize_nf4(w)
    back = dequantize_nf4(**q, shape=w.shape)
    n = w.numel()
    n_blocks = math.ceil(n / BLOCK_SIZE)
    pad = n_blocks * BLOCK_SIZE - n
    err = F.pad((back - w).reshape(-1).abs(), (0, pad)).view(n_blocks, BLOCK_SIZE).amax(1)
    true_absmax = F.pad(w.reshape(-1).abs(), (0, pad)).view(n_blocks, BLOCK_SIZE).amax(1)
    stored_absmax = _dequantize_absmax(q["absmax_q"], q["absmax_scale"], q["absmax_mean"], n_blocks)
    half_gap = (nf4_code()[1:] - nf4_code()[:-1]).max() / 2
    dq_err = (true_absmax - stored_absmax).abs()
    # Double quantization of absmax: int8 with a per-256 scale, so at most half a step per constant.
    step = q["absmax_scale"].repeat_interleave(ABSMAX_BLOCK_SIZE)[:n_blocks]
    assert torch.all(dq_err <= step / 2 + 1e-6)
    bound = stored_absmax.abs() * half_gap + dq_err
    assert torch.all(err <= bound * (1 + 1e-5) + 1e-7), (err - bound).max()
    # And the typical error is far below the worst case (nearest-code rounding of Gaussian data).
    rel_rms = ((back - w).norm() / w.norm()).item()
    assert rel_rms < 0.12, rel_rms


def test_bits_per_parameter():
    layer = NF4Linear.from_linear(nn.Linear(1024, 1024, bias=False))
    bits = layer.bits_per_param()
    assert 4.1 <= bits <= 4.2, bits
    # 4 bits + 8/64 (int8 absmax) + 32/(64*256) (fp32 scales) + the mean
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / 1024**2, abs=1e-9)
    assert "4.127" in repr(layer) and "1024" in repr(layer)


def test_nf4linear_forward_and_backward_match_reference():
    torch.manual_seed(1)
    lin = nn.Linear(96, 80)
    layer = NF4Linear.from_linear(lin)
    assert layer.in_features == 96 and layer.out_features == 80 and layer.weight_shape == (80, 96)
    assert layer.compute_dtype == torch.float32
    assert layer.bias is not None and not layer.bias.requires_grad
    assert torch.equal(layer.bias, lin.bias.detach())
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == []
    assert not hasattr(layer, "weight")

    x = torch.randn(3, 5, 96, requires_grad=True)
    out = layer(x)
    w = layer.dequantize()
    assert w.shape == (80, 96) and not w.requires_grad
    x_ref = x.detach().clone().requires_grad_(True)
    ref = x_ref @ w.T + layer.bias
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6, rtol=1e-6)
    assert layer.bias.grad is None
    # The quantized layer is close to the original float layer.
    assert (out - lin(x)).norm() / lin(x).norm() < 0.1


def test_backward_saves_only_packed_data():
    layer = NF4Linear.from_linear(nn.Linear(256, 512, bias=False))
    x = torch.randn(4, 256, requires_grad=True)
    out = layer(x)
    node = out.grad_fn
    while node is not None and "NF4" not in type(node).__name__:  # skip the dtype cast node if any
        node = node.next_functions[0][0]
    assert node is not None, "forward did not go through the NF4 autograd Function"
    saved = node.saved_tensors
    assert len(saved) == 4
    n = 256 * 512
    assert all(not t.is_floating_point() or t.numel() < n / 32 for t in saved)
    assert sum(t.numel() * t.element_size() for t in saved) < 0.14 * 4 * n
    assert max(t.numel() for t in saved) == n // 2  # the packed uint8 data
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_no_grad_needed_for_input_skips_backward_work():
    layer = NF4Linear.from_linear(nn.Linear(16, 8))
    x = torch.randn(2, 16)
    with torch.no_grad():
        y = layer(x)
    assert y.grad_fn is None
    y2 = layer(x)  # input without grad: no graph at all
    assert not y2.requires_grad


def test_compute_dtype_bf16():
    torch.manual_seed(2)
    lin = nn.Linear(128, 64)
    layer = NF4Linear.from_linear(lin, compute_dtype=torch.bfloat16)
    assert layer.dequantize().dtype == torch.bfloat16
    x = torch.randn(2, 128, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32  # output comes back in the input's dtype
    ref = F.linear(x.detach(), layer.dequantize().float(), layer.bias.float())
    assert torch.allclose(y, ref, atol=0.05)
    y.sum().backward()
    assert x.grad.dtype == torch.float32
    w32 = NF4Linear.from_linear(lin).dequantize()
    assert torch.allclose(layer.dequantize().float(), w32, atol=1e-2)


def test_dtype_cast_changes_compute_dtype_not_constants():
    torch.manual_seed(5)
    layer = NF4Linear.from_linear(nn.Linear(64, 48))
    w32 = layer.dequantize()
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer.absmax_scale.dtype == torch.float32 and layer.absmax_mean.dtype == torch.float32
    assert layer.packed.dtype == torch.uint8 and layer.absmax_q.dtype == torch.int8
    assert layer.dequantize().dtype == torch.bfloat16
    assert torch.allclose(layer.dequantize().float(), w32, rtol=1e-2, atol=1e-3)
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    layer.float()
    assert layer.compute_dtype == torch.float32
    assert torch.equal(layer.dequantize(), w32)  # nothing was lost on the way


def test_state_dict_roundtrip():
    torch.manual_seed(3)
    layer = NF4Linear.from_linear(nn.Linear(100, 30))  # 3000 values: not a multiple of 64
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = NF4Linear(100, 30, bias=True)
    assert not torch.equal(fresh.dequantize(), layer.dequantize())
    fresh.load_state_dict(torch.load(buf))
    assert set(layer.state_dict()) == {"packed", "absmax_q", "absmax_scale", "absmax_mean", "bias"}
    assert torch.equal(fresh.dequantize(), layer.dequantize())
    x = torch.randn(4, 100)
    assert torch.equal(fresh(x), layer(x))


def test_quantize_model_tiny_llama():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    quantize_model(model)
    names = {n for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    expected = {f"model.layers.{i}.{p}" for i in range(2) for p in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert names == expected
    assert type(model.lm_head) is nn.Linear
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"
    with torch.no_grad():
        out = model(ids).logits
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"tiny llama NF4 logits relative error: {rel:.4f}")
    assert 0 < rel < 0.2  # each weight carries ~9% relative RMS error (NF4 on Gaussian data)
    stats = quantized_nbytes(model)
    assert stats["num_layers"] == 14
    assert stats["num_params"] == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)  # q,o + k,v + mlp
    assert stats["ratio_vs_fp32"] < 0.14 and 4.1 < stats["bits_per_param"] < 4.2

    # A training step: gradients flow to the inputs of quantized layers (here: through to a trainable norm).
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert model.model.layers[0].input_layernorm.weight.grad is not None
    assert all(m.bias is None or m.bias.grad is None for m in model.modules() if isinstance(m, NF4Linear))


def test_quantize_model_skip_and_errors():
    model = tiny_llama()
    quantize_model(model, skip_modules=("lm_head", "down_proj"))
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, NF4Linear)
    with pytest.raises(ValueError, match=r"Unknown quantization method 'int3'.*nf4"):
        quantize_model(tiny_llama(), method="int3")
    with pytest.raises(TypeError, match="from_linear"):
        quantize_model(nn.Linear(4, 4))
    parent = quantize_model(tiny_llama(), skip_modules=["lm_head", "layers.1"])  # a parent skips its children
    assert type(parent.model.layers[1].self_attn.q_proj) is nn.Linear
    assert isinstance(parent.model.layers[0].self_attn.q_proj, NF4Linear)
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match=r"no torch.nn.Linear layer to quantize in GPT2LMHeadModel \(it has Conv1D"):
        quantize_model(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)))


def test_output_heads_stay_full_precision_and_order_with_lora_is_checked():
    from transformers import LlamaForSequenceClassification

    from lorakit import LoraConfig, get_peft_model

    config = tiny_llama().config
    config.num_labels, config.pad_token_id = 3, 0
    classifier = quantize_model(LlamaForSequenceClassification(config))
    assert type(classifier.score) is nn.Linear  # the head of a classifier, as lm_head of a causal LM
    model = get_peft_model(classifier, LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS"))
    assert any("score.modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="before get_peft_model"):
        quantize_model(get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])))


def test_a_quantized_model_refuses_transformers_save_until_dequantized(tmp_path):
    model = quantize_model(tiny_llama())
    with pytest.raises(ValueError, match="4-bit NF4, which transformers cannot load back"):
        model.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()
    dequantize_model(model).save_pretrained(tmp_path / "d")  # full precision again: saves normally
    assert (tmp_path / "d" / "model.safetensors").is_file()


def test_dora_with_dropout_keeps_no_full_precision_weight_for_the_backward():
    from lorakit import LoraConfig, get_peft_model

    model = get_peft_model(quantize_model(tiny_llama()), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                    use_dora=True, lora_dropout=0.5))
    model.train()
    attention = model.base_model.model.model.layers[0].self_attn
    shapes = {tuple(attention.q_proj.base_layer.weight_shape), tuple(attention.v_proj.base_layer.weight_shape)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        model(input_ids=torch.randint(0, 128, (2, 8))).logits.sum().backward()
    assert saved and not shapes & set(saved)  # no DoRA layer's [out, in] weight: NF4 dequantizes in the backward


def test_quantize_model_leaves_lora_matrices():
    class Adapted(nn.Module):
        def __init__(self):
            super().__init__()
            self.base_layer = nn.Linear(32, 32)
            self.lora_A = nn.ModuleDict({"default": nn.Linear(32, 4, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(4, 32, bias=False)})

    model = nn.Sequential(Adapted())
    quantize_model(model)
    assert isinstance(model[0].base_layer, NF4Linear)
    assert type(model[0].lora_A["default"]) is nn.Linear and type(model[0].lora_B["default"]) is nn.Linear


def test_dequantize_model_restores_linear():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 8))
    quantize_model(model)
    with torch.no_grad():
        q_logits = model(ids).logits
    q_weight = model.model.layers[1].self_attn.v_proj.dequantize()
    dequantize_model(model)
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    v = model.model.layers[1].self_attn.v_proj
    assert type(v) is nn.Linear and torch.equal(v.weight, q_weight)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, q_logits, atol=1e-5)


def test_bad_inputs():
    with pytest.raises(TypeError, match="nn.Linear"):
        NF4Linear.from_linear(nn.Embedding(4, 4))
    with pytest.raises(ValueError, match="NaN"):
        quantize_nf4(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="floating-point"):
        quantize_nf4(torch.ones(4, dtype=torch.int64))


def test_gradient_checkpointing_recomputes_through_nf4():
    torch.manual_seed(6)
    layer = NF4Linear.from_linear(nn.Linear(32, 32))
    x = torch.randn(3, 32, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(lambda t: layer(torch.relu(layer(t))), x, use_reentrant=False)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    layer(torch.relu(layer(x2))).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)


def test_lora_trains_on_nf4_base():
    from lorakit import LoraConfig, get_peft_model

    model = quantize_model(tiny_llama())
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        base_logits = model(ids).logits
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    peft = get_peft_model(model, cfg)
    with torch.no_grad():  # B starts at zero: the adapter is a no-op
        assert torch.allclose(peft(input_ids=ids).logits, base_logits, atol=1e-6)
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.5)
    losses = train_steps(peft, opt, 5, input_ids=ids, labels=ids)
    assert losses[-1] < losses[0]
    assert all(isinstance(m, NF4Linear) for n, m in peft.named_modules() if n.endswith("q_proj.base_layer"))
