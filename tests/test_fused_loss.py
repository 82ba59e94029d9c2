"""lorakit.fused_loss: the fused causal-LM forward (chunked head + loss, RMSNorm, SwiGLU) equals transformers'."""

import contextlib

import peft
import pytest
import torch
import torch.nn.functional as F
from tiny_models import VOCAB, tiny_gpt2, tiny_llama, token_batch, train_steps

from lorakit import LoraConfig, get_peft_model
import lorakit.fused_loss
from lorakit.fused_loss import fused_linear_cross_entropy

ATOL = 1e-5


# -- fused loss ----------------------------------------------------------------------------------------

def padded_batch():
    """Right padding, a masked prompt, and a row with no label at all."""
    ids = token_batch(batch=4, seq=16, seed=3)
    mask = torch.ones_like(ids)
    mask[0, 11:] = 0
    mask[2, 6:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[1, :9] = -100  # prompt
    labels[3, :] = -100   # nothing to learn in this row
    ids[mask == 0] = 0
    return ids, mask, labels


def lora_llama(**extra):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False,
                  task_type="CAUSAL_LM")
    config.update(extra)
    return get_peft_model(tiny_llama(), LoraConfig(**config)).train()


def loss_and_grads(model, fused: bool, **kwargs):
    model.fused_loss = fused
    model.zero_grad()
    out = model(**kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


@pytest.mark.parametrize("extra", [{}, {"lora_dropout": 0.2}, {"modules_to_save": ["lm_head"]}, {"use_dora": True},
                                   {"modules_to_save": ["norm", "post_attention_layernorm"]}])  # norms that train
def test_fused_loss_equals_transformers_loss_and_gradients(extra):
    model = lora_llama(**extra)
    ids, mask, labels = padded_batch()
    torch.manual_seed(5)
    fused, fused_grads = loss_and_grads(model, True, input_ids=ids, attention_mask=mask, labels=labels)
    torch.manual_seed(5)
    plain, plain_grads = loss_and_grads(model, False, input_ids=ids, attention_mask=mask, labels=labels)
    assert type(fused).__name__ == "FusedCausalLMOutput" and type(plain).__name__ == "CausalLMOutputWithPast"
    assert "logits" not in fused.keys()  # not computed unless read
    assert abs(fused.loss.item() - plain.loss.item()) < ATOL
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in fused_grads.items():
        assert torch.allclose(grad, plain_grads[name], atol=ATOL), name
    if not extra.get("lora_dropout"):  # read on demand, the logits are transformers' logits
        assert torch.allclose(fused.logits, plain.logits, atol=ATOL)
        assert torch.allclose(fused["logits"], plain["logits"], atol=ATOL)


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_fused_loss_on_other_families_equals_transformers(family):
    """Qwen3 normalises q and k per head (RMSNorms on [.., heads, head_dim]); Mistral is Llama's twin."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_class, model_class = (Qwen3Config, Qwen3ForCausalLM) if family == "qwen3" else \
        (MistralConfig, MistralForCausalLM)
    torch.manual_seed(0)
    base = model_class(config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                    max_position_embeddings=128, pad_token_id=0))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM")).train()
    norms = [m for m in base.modules() if type(m).__name__.endswith("RMSNorm")]
    calls = []
    for norm in norms:
        norm.register_forward_hook(lambda m, i, o: calls.append(type(o.grad_fn).__name__))
    ids, mask, labels = padded_batch()
    fused, fg = loss_and_grads(model, True, input_ids=ids, attention_mask=mask, labels=labels)
    assert "RMSNormFunctionBackward" in calls
    plain, pg = loss_and_grads(model, False, input_ids=ids, attention_mask=mask, labels=labels)
    assert type(fused).__name__ == "FusedCausalLMOutput"
    assert abs(fused.loss.item() - plain.loss.item()) < ATOL
    for name in fg:
        assert torch.allclose(fg[name], pg[name], atol=ATOL), name


def test_fused_loss_with_num_items_in_batch_shift_labels_and_ignore_index():
    model = lora_llama()
    ids, mask, labels = padded_batch()
    shift = F.pad(labels[:, 1:], (0, 1), value=-100)
    shift[shift == -100] = -1
    for kwargs in ({"labels": labels, "num_items_in_batch": torch.tensor(57)},
                   {"labels": labels, "num_items_in_batch": 40},
                   {"labels": labels, "shift_labels": shift, "ignore_index": -1}):
        fused, fg = loss_and_grads(model, True, input_ids=ids, attention_mask=mask, **kwargs)
        plain, pg = loss_and_grads(model, False, input_ids=ids, attention_mask=mask, **kwargs)
        assert type(fused).__name__ == "FusedCausalLMOutput"
        assert abs(fused.loss.item() - plain.loss.item()) < ATOL, kwargs
        for name in fg:
            assert torch.allclose(fg[name], pg[name], atol=ATOL), name


def test_fused_loss_when_no_token_has_a_label():
    model = lora_llama()
    ids, mask, _ = padded_batch()
    labels = torch.full_like(ids, -100)
    fused = model(input_ids=ids, attention_mask=mask, labels=labels)
    model.fused_loss = False
    plain = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.isnan(plain.loss) and torch.isnan(fused.loss)  # transformers' mean over nothing
    model.fused_loss = True
    summed = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=4)
    assert summed.loss.item() == 0.0
    summed.loss.backward()  # and the graph is still usable


@pytest.mark.parametrize("chunk_elements", [1, 3 * VOCAB, 5 * VOCAB, 10**9])
def test_fused_linear_cross_entropy_chunks(chunk_elements):
    torch.manual_seed(2)
    hidden0, weight0, bias0 = torch.randn(4, 9, 32), torch.randn(VOCAB, 32) / 4, torch.randn(VOCAB)
    targets = torch.randint(0, VOCAB, (4, 9))
    targets[1] = -100             # a whole chunk of ignored rows for small chunks
    targets[2, 3:7] = -100
    results = []
    for fused in (True, False):
        hidden, weight, bias = (t.clone().requires_grad_(True) for t in (hidden0, weight0, bias0))
        if fused:
            loss = fused_linear_cross_entropy(hidden, weight, bias, targets, chunk_elements=chunk_elements)
        else:
            loss = F.cross_entropy(F.linear(hidden, weight, bias).reshape(-1, VOCAB), targets.reshape(-1))
        (loss * 3).backward()  # a non-unit upstream gradient
        results.append((loss, hidden.grad, weight.grad, bias.grad))
    for ours, ref in zip(*results):
        assert torch.allclose(ours, ref, atol=ATOL, rtol=1e-5)
    assert not results[0][1][1].any()  # ignored rows get no gradient


@pytest.mark.parametrize("chunk_elements", [1, 40 * 300, 10**9])
@pytest.mark.parametrize("with_bias", [False, True])
def test_frozen_head_loss_online_softmax_over_vocab_slices(chunk_elements, with_bias, monkeypatch):
    # A frozen head takes the vocabulary-sliced path; several row blocks and uneven last slices too.
    monkeypatch.setattr(lorakit.fused_loss, "ROW_BLOCK", 16)
    torch.manual_seed(3)
    vocab = 1000
    hidden0, weight = torch.randn(40, 32) * 2, torch.randn(vocab, 32) / 2
    bias = torch.randn(vocab) if with_bias else None
    targets = torch.randint(0, vocab, (40,))
    targets[5:9] = -100
    results = []
    for fused in (True, False):
        hidden = hidden0.clone().requires_grad_(True)
        if fused:
            loss = fused_linear_cross_entropy(hidden, weight, bias, targets, chunk_elements=chunk_elements)
        else:
            loss = F.cross_entropy(F.linear(hidden, weight, bias), targets)
        (loss * 3).backward()
        results.append((loss, hidden.grad))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # no gradient wanted at all: the loss alone
        torch.testing.assert_close(fused_linear_cross_entropy(hidden0, weight, bias, targets), results[1][0])


def test_fused_linear_cross_entropy_bf16_is_close():
    torch.manual_seed(2)
    hidden0, weight0 = torch.randn(30, 32, dtype=torch.bfloat16), (torch.randn(VOCAB, 32) / 4).bfloat16()
    targets = torch.randint(0, VOCAB, (30,))
    out = []
    for fused in (True, False):
        hidden = hidden0.clone().requires_grad_(True)
        if fused:
            loss = fused_linear_cross_entropy(hidden, weight0, None, targets, chunk_elements=7 * VOCAB)
        else:
            loss = F.cross_entropy(F.linear(hidden, weight0).float(), targets)
        assert loss.dtype == torch.float32
        loss.backward()
        out.append((loss, hidden.grad.float()))
    assert abs(out[0][0].item() - out[1][0].item()) < 1e-3
    assert (out[0][1] - out[1][1]).norm() / out[1][1].norm() < 2e-2


@pytest.mark.parametrize("confidence", [1.0, 1.3, 1.6, 2.0])  # mean loss about 0.3, 0.03, 0.003, 0.0003
def test_bf16_gradient_of_confident_rows_is_as_close_to_float32_as_transformers(confidence):
    """Late in training most rows are confident (p_target near 1). Forming sum_v p_v W_v with bf16-rounded
    probabilities and subtracting W_t afterwards left mostly rounding error: 2x transformers' gradient error
    at a loss of 0.03, 7x at 0.0003. With the target's term kept out of the matmul it is transformers' error."""
    torch.manual_seed(0)
    vocab, width, rows = 4096, 64, 512
    weight = (torch.randn(vocab, width) * 0.5).bfloat16()
    targets = torch.randint(0, vocab, (rows,))
    toward_target = weight[targets].float() / weight[targets].float().norm(dim=1, keepdim=True)
    hidden0 = (torch.randn(rows, width) * 0.3 + 3 * confidence * toward_target).bfloat16()
    grads = {}
    for kind in ("float32", "fused", "transformers"):
        hidden = (hidden0.float() if kind == "float32" else hidden0.clone()).requires_grad_(True)
        w = weight.float() if kind == "float32" else weight
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind != "float32"):
            if kind == "fused":  # four vocabulary slices
                loss = fused_linear_cross_entropy(hidden, w, None, targets, chunk_elements=rows * vocab // 4)
            else:
                loss = F.cross_entropy((hidden @ w.t()).float(), targets)
        loss.backward()
        grads[kind] = hidden.grad.float()
    error = {k: float((grads[k] - grads["float32"]).norm() / grads["float32"].norm())
             for k in ("fused", "transformers")}
    assert error["fused"] < 1.1 * error["transformers"], error


def test_ordinary_path_when_logits_are_expected():
    model = lora_llama()
    ids, mask, labels = padded_batch()
    with torch.no_grad():  # evaluation: logits returned as usual
        assert model(input_ids=ids, attention_mask=mask, labels=labels).logits is not None
        assert "logits" in model(input_ids=ids, attention_mask=mask, labels=labels).keys()
    model.eval()
    assert "logits" in model(input_ids=ids, attention_mask=mask, labels=labels).keys()
    model.train()
    inner = model.get_base_model()
    inner.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().mean() * 0 + 42.0
    out = model(input_ids=ids, attention_mask=mask, labels=labels)  # a custom loss function is honoured
    assert out.loss.item() == 42.0 and "logits" in out.keys()
    del inner._loss_function
    assert "logits" in model(input_ids=ids, attention_mask=mask).keys()
    gpt2 = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"])).train()
    assert "logits" in gpt2(input_ids=ids, labels=labels).keys()  # not a recognised model: plain path


def test_multiple_active_adapters_and_mixed_batches_train_like_the_plain_path():
    model = lora_llama()
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False))
    model.set_adapter(["default", "other"])
    model.base_model.set_requires_grad("other")
    ids, mask, labels = padded_batch()
    for kwargs in ({}, {"adapter_names": ["default", "other", None, "other"]}):
        fused, fg = loss_and_grads(model, True, input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
        plain, pg = loss_and_grads(model, False, input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
        assert abs(fused.loss.item() - plain.loss.item()) < ATOL
        for name in fg:
            assert torch.allclose(fg[name], pg[name], atol=ATOL), name


def test_merged_and_disabled_adapters_still_give_the_right_loss():
    model = lora_llama()
    ids, mask, labels = padded_batch()
    model.fused_loss = False
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        with model.disable_adapter():
            expected_base = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    model.fused_loss = True
    with model.disable_adapter():
        assert abs(model(input_ids=ids, attention_mask=mask, labels=labels).loss.item() - expected_base.item()) < ATOL
    model.base_model.merge_adapter()
    assert abs(model(input_ids=ids, attention_mask=mask, labels=labels).loss.item() - expected.item()) < ATOL


def test_training_steps_equal_peft():
    """A few AdamW steps through the ordinary call: lorakit's fast path and PEFT give the same losses."""
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False,
                  task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs)).train()
    ours = get_peft_model(tiny_llama(), LoraConfig(**kwargs)).train()
    ours.load_state_dict(theirs.state_dict())
    ids, mask, labels = padded_batch()
    losses = []
    for model in (ours, theirs):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses.append(train_steps(model, optimizer, 4, input_ids=ids, attention_mask=mask, labels=labels))
    assert losses[0][0] > losses[0][-1]  # it learns
    assert max(abs(a - b) for a, b in zip(*losses)) < 1e-5, losses


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_training_steps_equal_peft_for_bias_modes_and_dropout(bias, dropout):
    """Projections with biases (attention_bias / mlp_bias), each bias mode, dropout on and off: the fast path's
    losses, gradients and trained weights equal PEFT's, step by step, through the ordinary call."""
    from transformers import LlamaForCausalLM

    def base():
        model = tiny_llama()
        config = model.config
        config.attention_bias = config.mlp_bias = True
        torch.manual_seed(4)
        return LlamaForCausalLM(config).eval()

    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"], lora_dropout=dropout,
                  bias=bias, init_lora_weights=False, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(base(), peft.LoraConfig(**kwargs)).train()
    ours = get_peft_model(base(), LoraConfig(**kwargs)).train()
    ours.load_state_dict(theirs.state_dict())
    trainable = sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert any(n.endswith(".bias") for n in trainable) == (bias != "none")
    ids, mask, labels = padded_batch()
    runs = []
    for model in (ours, theirs):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(11)  # the same dropout draws in both
        losses, grads = [], []
        for _ in range(3):
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            losses.append(out.loss.item())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
            optimizer.step()
            optimizer.zero_grad()
        runs.append((type(out).__name__, losses, grads, dict(model.named_parameters())))
    (our_output, our_losses, our_grads, our_params), (_, their_losses, their_grads, their_params) = runs
    assert our_output == "FusedCausalLMOutput"  # the fast path ran
    assert max(abs(a - b) for a, b in zip(our_losses, their_losses)) < 1e-5, (our_losses, their_losses)
    for step_ours, step_theirs in zip(our_grads, their_grads):
        for name in trainable:
            assert torch.allclose(step_ours[name], step_theirs[name], atol=1e-5), name
    for name in trainable:
        assert torch.allclose(our_params[name], their_params[name], atol=1e-5), name


def test_trainable_head_gets_the_same_gradient_through_the_fused_loss():
    """modules_to_save=["lm_head"]: the head's weight gradient is formed inside the fused loss."""
    results = []
    for fused in (True, False):
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                        init_lora_weights=False)).train()
        ids, mask, labels = padded_batch()
        out, grads = loss_and_grads(model, fused, input_ids=ids, attention_mask=mask, labels=labels)
        results.append(grads)
    assert any("modules_to_save" in n for n in results[0])
    for name in results[0]:
        assert torch.allclose(results[0][name], results[1][name], atol=ATOL), name


def test_silu_mul_is_exactly_the_composition():
    from lorakit.fused_loss import silu_mul

    torch.manual_seed(4)
    gate0, up0, grad = torch.randn(3, 7, 20), torch.randn(3, 7, 20), torch.randn(3, 7, 20)
    results = []
    for fused in (True, False):
        gate, up = gate0.clone().requires_grad_(True), up0.clone().requires_grad_(True)
        out = silu_mul(gate, up) if fused else F.silu(gate) * up
        out.backward(grad)
        results.append((out, gate.grad, up.grad))
    assert type(results[0][0].grad_fn).__name__ == "SiluMulFunctionBackward"
    for ours, ref in zip(*results):
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_trains", [False, True])
@pytest.mark.parametrize("shape", [(3, 7, 20), (2, 3, 5, 20)])  # hidden states; per-head (Qwen3's q_norm)
def test_rms_norm_equals_transformers(dtype, weight_trains, shape):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from lorakit.fused_loss import rms_norm

    torch.manual_seed(6)
    norm = LlamaRMSNorm(20, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm.weight.requires_grad_(weight_trains)
    x0, grad = torch.randn(shape, dtype=dtype) * 3, torch.randn(shape, dtype=dtype)
    results = []
    for fused in (True, False):
        x = x0.clone().requires_grad_(True)
        norm.weight.grad = None
        out = rms_norm(x, norm.weight, norm.variance_epsilon) if fused else norm(x)
        out.backward(grad)
        results.append((out, x.grad, norm.weight.grad))
    assert type(results[0][0].grad_fn).__name__ == "RMSNormFunctionBackward"
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for ours, ref in zip(*results):
        if ref is None:
            assert ours is None
        else:
            assert ours.dtype == ref.dtype and torch.allclose(ours.float(), ref.float(), **tol)
    with torch.no_grad():  # without autograd it is transformers' own arithmetic
        assert torch.equal(rms_norm(x0, norm.weight, norm.variance_epsilon), norm(x0))


def test_rms_norm_keeps_float32_statistics_under_autocast():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from lorakit.fused_loss import rms_norm

    torch.manual_seed(6)
    norm = LlamaRMSNorm(64).requires_grad_(False)
    x0 = torch.randn(5, 64) * 1000 + 3000  # a large mean: a bf16 sum of squares would be off by about 1%
    results = []
    for fused in (True, False):
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = rms_norm(x, norm.weight, norm.variance_epsilon) if fused else norm(x)
        out.sum().backward()
        results.append((out, x.grad))
    for ours, ref in zip(*results):
        assert ours.dtype == ref.dtype == torch.float32 and torch.allclose(ours, ref, atol=1e-6, rtol=1e-5)


def test_mlps_and_norms_are_patched_only_during_the_fused_forward():
    model = lora_llama(target_modules=["q_proj", "up_proj"])  # a LoRA layer inside the MLP too
    decoder = model.get_base_model().model
    patched = [layer.mlp for layer in decoder.layers] + [decoder.norm] + \
        [norm for layer in decoder.layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
    seen = []
    hooks = [module.register_forward_hook(lambda m, i, o: seen.append(("forward" in m.__dict__, o.grad_fn)))
             for module in (decoder.layers[0].mlp, decoder.layers[0].post_attention_layernorm)]
    ids, mask, labels = padded_batch()
    fused, fg = loss_and_grads(model, True, input_ids=ids, attention_mask=mask, labels=labels)
    plain, pg = loss_and_grads(model, False, input_ids=ids, attention_mask=mask, labels=labels)
    for hook in hooks:
        hook.remove()
    assert [was_patched for was_patched, _ in seen] == [True, True, False, False]
    assert type(seen[0][1]).__name__ == "RMSNormFunctionBackward"  # the norm's hook runs first
    assert all("forward" not in m.__dict__ for m in patched)
    assert abs(fused.loss.item() - plain.loss.item()) < ATOL
    for name in fg:
        assert torch.allclose(fg[name], pg[name], atol=ATOL), name


def test_fused_loss_under_gradient_checkpointing():
    model = lora_llama()
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask, labels = padded_batch()
    fused, fg = loss_and_grads(model, True, input_ids=ids, attention_mask=mask, labels=labels)
    plain, pg = loss_and_grads(model, False, input_ids=ids, attention_mask=mask, labels=labels)
    assert type(fused).__name__ == "FusedCausalLMOutput"
    assert abs(fused.loss.item() - plain.loss.item()) < ATOL
    for name in fg:
        assert torch.allclose(fg[name], pg[name], atol=ATOL), name


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_loss_of_confident_rows_equals_transformers_and_is_never_negative(autocast):
    """The softmax sees bf16-rounded logits, so the target's logit must be rounded alike: taken exactly, a
    confident row's loss came out as low as -0.25 and the mean 0.03 off transformers' loss."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(64, 64) * 3, torch.randn(500, 64)
    if not autocast:
        hidden, weight = hidden.bfloat16(), weight.bfloat16()
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        logits = hidden @ weight.t()
        targets = logits.float().argmax(1)
        ours = torch.stack([fused_linear_cross_entropy(hidden[i:i + 1], weight, None, targets[i:i + 1])
                            for i in range(64)])
    assert logits.dtype == torch.bfloat16
    ref = F.cross_entropy(logits.float(), targets, reduction="none")
    assert ours.min() >= 0
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
