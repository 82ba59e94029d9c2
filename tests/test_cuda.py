"""The same code on a GPU: the fast LoRA path, the fused loss, bf16, merging, mixed-adapter batches, QLoRA,
training against PEFT, and the serving engine, all on CUDA tensors.

Skipped where torch sees no CUDA GPU (CI has none). LORAKIT_TEST_DEVICE=cpu runs the same checks on the CPU, so
that the checks themselves are exercised on machines without a GPU.
"""

from __future__ import annotations

import copy
import os
import queue

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.kernels import lora_linear
from lorakit.quant import NF4Linear, quantize_model
from test_fused_loss import padded_batch
from test_kernels import CASES, leaves
from tiny_models import VOCAB, tiny_llama, train_steps

DEVICE = torch.device(os.environ.get("LORAKIT_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
ATOL = 1e-5
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """TF32 would round fp32 matmuls to 10-bit mantissas on the GPU; these checks compare at 1e-5."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def on_device(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


def reference_with_mask(x, weight, bias, a, b, scaling, p, fan_in_fan_out=False):
    """The plain composition, dropping out with the fast path's own draw: on CUDA F.dropout's kernel draws its
    mask differently from bernoulli_, so only the same draw gives comparable numbers there."""
    base = x @ weight + bias if fan_in_fan_out else F.linear(x, weight, bias)
    if p > 0:
        x2 = x.reshape(-1, x.shape[-1])
        x_lora = (x2 * torch.empty_like(x2).bernoulli_(1 - p).div_(1 - p)).view(x.shape)
    else:
        x_lora = x
    return base + F.linear(F.linear(x_lora, a), b) * scaling


@pytest.mark.parametrize("case", CASES)
def test_lora_linear_matches_reference(case):
    d_in, d_out, r, lead, with_bias, p, fan_in_fan_out, train_w = case
    torch.manual_seed(sum(lead) + r)
    shape = (d_in, d_out) if fan_in_fan_out else (d_out, d_in)
    x0, w0, a0, b0, grad_out = on_device(torch.randn(*lead, d_in), torch.randn(shape), torch.randn(r, d_in),
                                         torch.randn(d_out, r), torch.randn(*lead, d_out))
    bias0 = torch.randn(d_out, device=DEVICE) if with_bias else None
    results = []
    for fn in (lora_linear, reference_with_mask):
        x, w, bias, a, b = leaves(x0, w0, bias0, a0, b0, grad_flags=(True, train_w, with_bias, True, True))
        torch.manual_seed(123)
        out = fn(x, w, bias, a, b, 0.7, p, fan_in_fan_out)
        out.backward(grad_out)
        results.append((out, [t.grad if t is not None else None for t in (x, w, bias, a, b)]))
    (ours, our_grads), (ref, ref_grads) = results
    assert ours.device.type == DEVICE.type
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=1e-5)
    for name, g1, g2 in zip("x w bias A B".split(), our_grads, ref_grads):
        assert (g1 is None) == (g2 is None), name
        if g1 is not None:
            torch.testing.assert_close(g1, g2, atol=1e-4, rtol=1e-5, msg=name)


def lora_llama(dtype=torch.float32, **extra):
    config = dict(r=4, lora_alpha=8, target_modules=QKVO, init_lora_weights=False, task_type="CAUSAL_LM")
    config.update(extra)
    return get_peft_model(tiny_llama().to(DEVICE, dtype), LoraConfig(**config)).train()


def batch_on_device():
    ids, mask, labels = padded_batch()
    return dict(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), labels=labels.to(DEVICE))


def loss_and_grads(model, fused: bool, batch: dict):
    model.fused_loss = fused
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("extra", [{}, {"modules_to_save": ["lm_head"]}, {"use_dora": True}])
def test_fused_loss_and_gradients_equal_the_plain_path(extra):
    model, batch = lora_llama(**extra), batch_on_device()
    fused, fused_grads = loss_and_grads(model, True, batch)
    plain, plain_grads = loss_and_grads(model, False, batch)
    assert fused.device.type == DEVICE.type
    assert abs(fused.item() - plain.item()) < ATOL
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=ATOL, rtol=1e-4, msg=name)


def test_bf16_base_with_float32_adapters_trains_close_to_the_plain_path():
    model, batch = lora_llama(torch.bfloat16), batch_on_device()
    dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert dtypes == {torch.float32}
    fused, fused_grads = loss_and_grads(model, True, batch)
    plain, plain_grads = loss_and_grads(model, False, batch)
    assert abs(fused.item() - plain.item()) < 2e-2 * abs(plain.item())
    for name, grad in fused_grads.items():
        assert grad.dtype == torch.float32, name
        assert (grad - plain_grads[name]).norm() <= 5e-2 * plain_grads[name].norm(), name


def test_training_steps_equal_peft():
    kwargs = dict(r=4, lora_alpha=8, target_modules=QKVO, init_lora_weights=False, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(tiny_llama().to(DEVICE), peft.LoraConfig(**kwargs)).train()
    ours = get_peft_model(tiny_llama().to(DEVICE), LoraConfig(**kwargs)).train()
    ours.load_state_dict(theirs.state_dict())
    batch = batch_on_device()
    losses = []
    for model in (ours, theirs):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses.append(train_steps(model, optimizer, 4, **batch))
    assert losses[0][-1] < losses[0][0]
    assert max(abs(a - b) for a, b in zip(*losses)) < 1e-5, losses


@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_equals_unmerged_and_unload_restores_the_base(use_dora):
    torch.manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 9), device=DEVICE)
    base = tiny_llama().to(DEVICE)
    with torch.no_grad():
        base_logits = base(ids).logits
    model = get_peft_model(base, LoraConfig(r=4, target_modules=QKVO + ["gate_proj"], init_lora_weights=False,
                                            use_dora=use_dora)).eval()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        assert (unmerged - base_logits).abs().max() > 1e-2  # the adapter matters
        model.base_model.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, atol=ATOL, rtol=1e-5)
        model.base_model.unmerge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, atol=ATOL, rtol=1e-5)
        merged = copy.deepcopy(model).merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, unmerged, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(model.unload()(ids).logits, base_logits, atol=ATOL, rtol=1e-5)


def test_mixed_adapter_batch_equals_each_adapter_alone():
    model = lora_llama()
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False))
    model.eval()
    ids = batch_on_device()["input_ids"]
    names = ["default", "other", None, "other"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            if name is None:
                with model.disable_adapter():
                    alone = model(input_ids=ids[row:row + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=ids[row:row + 1]).logits
            torch.testing.assert_close(mixed[row:row + 1], alone, atol=ATOL, rtol=1e-5, msg=str(name))


def test_nf4_on_the_device_matches_the_cpu():
    torch.manual_seed(4)
    lin = nn.Linear(576, 1536)
    cpu = NF4Linear.from_linear(lin)
    here = NF4Linear.from_linear(copy.deepcopy(lin).to(DEVICE))  # Module.to moves in place: copy first
    assert here.packed.device.type == DEVICE.type and here.dequantize().device.type == DEVICE.type
    assert torch.equal(here.packed.cpu(), cpu.packed)
    torch.testing.assert_close(here.dequantize().cpu(), cpu.dequantize(), atol=1e-6, rtol=0)
    # Moved, the CPU's constants arrive unchanged (computed on the GPU they may differ by an ulp).
    moved = copy.deepcopy(cpu).to(DEVICE)
    for name, tensor in cpu.state_dict().items():
        assert torch.equal(moved.state_dict()[name].cpu(), tensor), name
    torch.testing.assert_close(moved.dequantize(), here.dequantize(), atol=1e-6, rtol=0)
    x = torch.randn(4, 576, device=DEVICE, requires_grad=True)
    here(x).sum().backward()
    assert x.grad.device.type == DEVICE.type
    bf16 = NF4Linear.from_linear(copy.deepcopy(lin).to(DEVICE), compute_dtype=torch.bfloat16)
    assert bf16(x.detach().bfloat16()).dtype == torch.bfloat16


def test_qlora_on_the_device_trains_and_merges():
    torch.manual_seed(0)
    base = tiny_llama().to(DEVICE)
    ids = torch.randint(3, VOCAB, (2, 12), device=DEVICE)
    reference = tiny_llama().to(DEVICE)
    model = quantize_model(base)
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert layers and all(m.packed.device.type == DEVICE.type and m.packed.dtype == torch.uint8 for m in layers)
    with torch.no_grad():  # NF4 rounding moves the logits a little, not a lot
        error = (model(ids).logits - reference(ids).logits).abs().max().item()
    assert 0 < error < 0.5
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=QKVO + ["down_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = train_steps(model, optimizer, 6, input_ids=ids, labels=ids)
    assert losses[-1] < losses[0] - 0.1, losses
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        with pytest.warns(UserWarning, match="(?i)quantiz|round"):
            merged = model.merge_and_unload()
        assert not any(isinstance(m, NF4Linear) for m in merged.modules())
        assert next(merged.parameters()).device.type == DEVICE.type
        torch.testing.assert_close(merged(ids).logits, unmerged, atol=1e-4, rtol=1e-4)


def test_serving_engine_mixed_batch_equals_offline_generation(tmp_path):
    from lorakit.serve.engine import Engine, EngineConfig, SamplingParams, Sequence
    from test_serve_helpers import save_random_adapter, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    base = tiny_model(tok)
    for i, name in enumerate(["a", "b"]):
        save_random_adapter(base, tmp_path / name, seed=i + 1)
    base = base.to(DEVICE)
    prompts = ["The weather today", "Hello there, how", "Once upon a time", "abc def ghi"]
    adapters = ["a", "b", None, "a"]
    jobs = [(tok(p)["input_ids"], a) for p, a in zip(prompts, adapters)]
    engine = Engine(copy.deepcopy(base), tok, EngineConfig(max_batch_size=4, max_model_len=128), base_name="tiny",
                    adapter_dirs=[str(tmp_path)]).start()
    try:
        assert engine.device.type == DEVICE.type
        queues = [queue.SimpleQueue() for _ in jobs]
        seqs = [Sequence(ids, a, SamplingParams(max_tokens=12, temperature=0), q.put)
                for (ids, a), q in zip(jobs, queues)]
        engine.submit(seqs).result(60)
        served = []
        for q in queues:
            ids = []
            while True:
                out = q.get(timeout=60)
                assert out.error is None, out.error
                ids.extend(out.token_ids)
                if out.finish_reason:
                    break
            served.append(ids)
    finally:
        engine.stop()
    for (prompt_ids, adapter), ids in zip(jobs, served):
        model = copy.deepcopy(base)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, tmp_path / adapter).eval()
        prompt = torch.tensor([prompt_ids], device=DEVICE)
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                 do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert ids == out[0, prompt.shape[1]:].tolist(), adapter
    assert len({tuple(ids) for ids in served[:3]}) == 3  # adapters a, b and the base answer differently


def test_lorakit_serve_device_serves_from_the_gpu(tiny_base, tmp_path):
    import argparse

    import httpx

    from lorakit.models import load_base_model
    from lorakit.serve import ServerThread, add_serve_arguments, build_server
    from test_serve_helpers import save_random_adapter

    base, _ = load_base_model(tiny_base)
    save_random_adapter(base, tmp_path / "a", seed=1)
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--base", tiny_base, "--adapter", f"a={tmp_path / 'a'}", "--max-model-len", "128",
                              "--device", str(DEVICE)])
    server = ServerThread(build_server(args)).start()
    try:
        engine = server.app.state.engine
        assert {p.device.type for p in engine.model.parameters()} == {DEVICE.type}
        for model in ("a", tiny_base):
            reply = httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": "What does code 3 mean?",
                                                                   "max_tokens": 4, "temperature": 0}, timeout=60)
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4, reply.text
    finally:
        server.stop()
