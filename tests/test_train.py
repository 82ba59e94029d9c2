"""Training loop: schedule, optimizer groups, loss, accumulation, checkpoints, resume after a kill, outputs."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorakit.data import collate
from lorakit.fused_loss import takes_fused_loss
from lorakit.loss import accumulate_gradients, batch_loss
from lorakit.optim import build_optimizer, lr_multiplier
from lorakit.train import TrainConfig, TrainError, add_embedding_noise, load_data, lora_recipe, prepare_model, train
from tiny_models import tiny_train_config as cfg
from tiny_models import write_code_pairs

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_code_pairs(tmp_path_factory.mktemp("data") / "train.jsonl", 24)


def test_lr_schedule_warmup_then_cosine():
    values = [lr_multiplier(s, 10, 100) for s in range(100)]
    assert values[0] == pytest.approx(1 / 11)
    assert all(a < b for a, b in zip(values[:10], values[1:11]))  # rising during warmup
    assert values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.5)  # halfway through the cosine
    assert values[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert lr_multiplier(100, 10, 100) == pytest.approx(0.0, abs=1e-12)


def test_optimizer_holds_only_trainable_params_and_loraplus_group(tiny_base, data_file, tmp_path):
    config = cfg(tiny_base, data_file, tmp_path, loraplus_lr_ratio=16, weight_decay=0.1)
    model, _ = prepare_model(config)
    opt = build_optimizer(model, config)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_opt == trainable and len(trainable) == 2 * 4 * 2  # A and B for q,k,v,o in 2 layers
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        kinds = {"B" if ".lora_B." in names[id(p)] else "A" for p in g["params"]}
        assert len(kinds) == 1
        assert g["lr"] == pytest.approx(5e-3 * (16 if kinds == {"B"} else 1))
        assert g["weight_decay"] == 0.1
    config.loraplus_lr_ratio = None
    assert [g["lr"] for g in build_optimizer(model, config).param_groups] == [5e-3]


def _random_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:  # B starts at zero, which would make every A gradient zero
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_kept_and_full_logits_losses_and_gradients_agree(tiny_base, data_file, tmp_path):
    config = cfg(tiny_base, data_file, tmp_path)
    model, tok = prepare_model(config)
    _random_b(model)
    data = load_data(config, tok, data_file)
    batch = collate(data.items[:6], tok.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    model.train()
    assert takes_fused_loss(model, inputs)  # a training step uses the fused head + loss
    results = {}
    for path, fused, keep in (("fused", True, True), ("kept", False, True), ("full", False, False)):
        model.fused_loss = fused
        loss, n = batch_loss(model, batch, logits_to_keep=keep)
        loss.backward()
        results[path] = (loss.detach(), n, _grads(model))
        model.zero_grad(set_to_none=True)
    model.fused_loss = True
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               batch["labels"][:, 1:].reshape(-1), reduction="sum")
    fused_loss, n, fused_grads = results["fused"]
    assert n == int((batch["labels"] != -100).sum()) > 0
    torch.testing.assert_close(fused_loss, manual, rtol=1e-5, atol=1e-4)
    for path in ("kept", "full"):
        loss, n2, grads = results[path]
        assert n2 == n
        torch.testing.assert_close(loss, fused_loss, rtol=1e-5, atol=1e-4)
        assert grads.keys() == fused_grads.keys() and len(grads) == 16
        for name in grads:
            torch.testing.assert_close(grads[name], fused_grads[name], rtol=1e-4, atol=1e-5)


def test_accumulation_gives_the_big_batch_gradient(tiny_base, data_file, tmp_path):
    config = cfg(tiny_base, data_file, tmp_path)
    model, tok = prepare_model(config)
    _random_b(model)
    data = load_data(config, tok, data_file)
    items = data.items[:8]
    loss_big = accumulate_gradients(model, [collate(items, tok.pad_token_id)])
    big = _grads(model)
    model.zero_grad(set_to_none=True)
    loss_acc = accumulate_gradients(model, [collate(items[:3], tok.pad_token_id), collate(items[3:], tok.pad_token_id)])
    acc = _grads(model)
    assert loss_acc == pytest.approx(loss_big, rel=1e-5)
    assert big.keys() == acc.keys() and len(big) == 16
    for n in big:
        torch.testing.assert_close(acc[n], big[n], rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for n, g in big.items() if ".lora_A." in n)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_base, data_file, tmp_path):
    grads = []
    for gc in (False, True):
        config = cfg(tiny_base, data_file, tmp_path, gradient_checkpointing=gc)
        model, tok = prepare_model(config)
        _random_b(model)
        model.train()
        batch = collate(load_data(config, tok, data_file).items[:4], tok.pad_token_id)
        accumulate_gradients(model, [batch])
        grads.append(_grads(model))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 16  # every LoRA weight got a gradient
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-7)


def test_embedding_noise_is_bounded_and_only_in_training(tiny_base, data_file, tmp_path):
    config = cfg(tiny_base, data_file, tmp_path)
    model, tok = prepare_model(config)
    ids = collate(load_data(config, tok, data_file).items[:4], tok.pad_token_id)["input_ids"]
    embed = model.get_base_model().get_input_embeddings()
    clean = embed(ids)
    handle = add_embedding_noise(model, alpha=5.0)
    bound = 5.0 / math.sqrt(ids.shape[1] * clean.shape[2])  # alpha / sqrt(L * d)
    model.train()
    noise = embed(ids) - clean
    assert noise.abs().max() <= bound and noise.abs().max() > 0.9 * bound  # uniform in [-bound, bound]
    assert noise.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    model.eval()
    assert torch.equal(embed(ids), clean)
    handle.remove()
    model.train()
    assert torch.equal(embed(ids), clean)


def test_neftune_run_trains_deterministically_and_differs_from_a_clean_run(tiny_base, data_file, tmp_path):
    adapters = {}
    for name, alpha in (("clean", 0.0), ("noisy", 5.0), ("noisy-again", 5.0)):
        result = train(cfg(tiny_base, data_file, tmp_path / name, neftune_alpha=alpha, epochs=3))
        assert result.final_loss < result.first_loss
        adapters[name] = load_file(str(tmp_path / name / "adapter_model.safetensors"))
    for key, value in adapters["noisy"].items():
        assert torch.equal(value, adapters["noisy-again"][key])  # the noise follows the seed
    assert any(not torch.equal(v, adapters["clean"][k]) for k, v in adapters["noisy"].items())


def test_lora_run_writes_adapter_metrics_and_plot_and_peft_loads_it(tiny_base, data_file, tmp_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "run"
    result = train(cfg(tiny_base, data_file, out, epochs=3, eval_data=data_file, eval_every=4, lr=3e-2))
    assert result.steps == 18 and result.epochs == pytest.approx(3.0) and not result.interrupted
    assert result.final_loss < 0.75 * result.first_loss
    assert result.eval_loss is not None and result.tokens > 0 and result.trainable_params == 1792  # 2 layers x (q,o: 4*32+32*4; k,v: 4*32+16*4)
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss_curve.png",
            "lorakit_train.json"} <= set(os.listdir(out))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 19))
    assert [r["step"] for r in rows if "eval_loss" in r] == [4, 8, 12, 16, 18]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((out / "adapter_config.json").read_text())
    assert info["r"] == 4 and sorted(info["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert info["base_model_name_or_path"] == tiny_base

    # PEFT loads the adapter and computes what lorakit computes
    from lorakit import PeftModel

    x = torch.randint(0, 49152, (2, 12))
    lk = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(out))
    pf = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(out))
    with torch.no_grad():
        torch.testing.assert_close(lk(input_ids=x).logits, pf(input_ids=x).logits, rtol=1e-5, atol=1e-5)
        with lk.disable_adapter():
            plain = lk(input_ids=x).logits
        assert (lk(input_ids=x).logits - plain).abs().max() > 1e-3  # the adapter does something
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert len(saved) == 16 and all(".lora_A." in k or ".lora_B." in k for k in saved)  # the base is not in it


def test_dora_and_rslora_runs_load_in_peft(tiny_base, data_file, tmp_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "dora"
    result = train(cfg(tiny_base, data_file, out, lora={"use_dora": True, "use_rslora": True}, max_steps=3, lr=1e-2))
    assert result.steps == 3 and result.final_loss < result.first_loss
    info = json.loads((out / "adapter_config.json").read_text())
    assert info["use_dora"] is True and info["use_rslora"] is True
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert sum("lora_magnitude_vector" in k for k in saved) == 8  # 2 layers x q,k,v,o
    from lorakit import PeftModel

    x = torch.randint(0, 49152, (2, 12))
    lk = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(out))
    pf = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(out))
    with torch.no_grad():
        torch.testing.assert_close(lk(input_ids=x).logits, pf(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    r = train(cfg(tiny_base, data_file, tmp_path / "dora_bf16", lora={"use_dora": True}, bf16=True, max_steps=2))
    assert r.steps == 2 and r.final_loss == r.final_loss  # finite under a bf16 base
    with pytest.raises(TrainError, match="LoRA options"):
        cfg(tiny_base, data_file, tmp_path / "z", full=True, lora={"use_dora": True})


def test_full_finetuning_saves_a_loadable_model(tiny_base, data_file, tmp_path):
    out = tmp_path / "full"
    result = train(cfg(tiny_base, data_file, out, full=True, max_steps=3, lr=1e-3))
    assert result.steps == 3 and result.trainable_params == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_base).parameters())
    tuned = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_base).state_dict()
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert len(changed) == len(base)  # every tensor trained
    assert not (out / "adapter_config.json").exists() and (out / "tokenizer.json").exists()


def test_bf16_and_nf4_runs(tiny_base, data_file, tmp_path, monkeypatch, capsys):
    import lorakit.precision

    pytest.importorskip("lorakit.quant")
    monkeypatch.setattr(lorakit.precision, "bf16_matmul_speedup", lambda device: 0.25)  # an AVX2-only CPU
    r = train(cfg(tiny_base, data_file, tmp_path / "bf16", bf16=True, max_steps=2, attention="eager"))
    assert r.steps == 2 and r.final_loss == r.final_loss  # finite, not NaN
    assert "bf16 matmuls run 4.0x slower than float32 ones on this CPU" in capsys.readouterr().out
    saved = load_file(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    # The frozen base is held in bf16 (autocast would cast it on every call); LoRA weights stay float32.
    model, _ = prepare_model(cfg(tiny_base, data_file, tmp_path / "x", bf16=True, attention="eager"))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert model.get_base_model().config._attn_implementation == "eager"
    with pytest.raises(TrainError, match="attention must be"):
        cfg(tiny_base, data_file, tmp_path / "y", attention="flash")


def test_device_choice(tiny_base, data_file, tmp_path):
    model, _ = prepare_model(cfg(tiny_base, data_file, tmp_path, device="auto"))
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert {p.device.type for p in model.parameters()} == {want}
    with pytest.raises(TrainError, match="unknown device 'tpu0'"):
        cfg(tiny_base, data_file, tmp_path, device="tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(TrainError, match="sees no CUDA GPU; use --device cpu"):
            cfg(tiny_base, data_file, tmp_path, device="cuda")
    r = train(cfg(tiny_base, data_file, tmp_path / "nf4", quantize="nf4", max_steps=2))
    assert r.steps == 2 and load_file(str(tmp_path / "nf4" / "adapter_model.safetensors"))


def test_qlora_in_bf16_and_its_eval_uses_the_nf4_base(tiny_base, data_file, tmp_path):
    from lorakit.evaluate import evaluate
    from lorakit.quant import NF4Linear

    config = cfg(tiny_base, data_file, tmp_path / "q", quantize="nf4", bf16=True, max_steps=2)
    model, _ = prepare_model(config)
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(nf4) == 14  # every Linear but the output head
    # quantized from the float32 weights, dequantized straight to bf16, double-quantization constants fp32
    assert all(m.compute_dtype == torch.bfloat16 and m.absmax_scale.dtype == torch.float32 for m in nf4)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    r = train(config)
    assert r.steps == 2 and r.final_loss == r.final_loss
    report = evaluate(base=tiny_base, adapter=str(tmp_path / "q"), data=data_file, limit=2, batch_size=2,
                      max_new_tokens=4, progress=False)
    assert report.quantize == "nf4"  # taken from lorakit_train.json, like the prompt format


def test_bad_row_fails_before_the_model_loads(tiny_base, tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "response": "b"}\n{"query": "c"}\n')
    monkeypatch.setattr("lorakit.train.load_base_model", lambda *a, **k: pytest.fail("model loaded"))
    from lorakit.data import DataError

    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'response'"):
        train(TrainConfig(base=tiny_base, data=str(bad), out=str(tmp_path / "o"), progress=False))


def test_every_target_name_must_exist_and_all_linear_works(tiny_base, data_file, tmp_path):
    with pytest.raises(TrainError, match=r"--targets foo_proj: no module of this model has that name\. Modules LoRA "
                                         r"can wrap here: .*q_proj"):
        train(cfg(tiny_base, data_file, tmp_path / "typo", lora={"target_modules": ["q_proj", "foo_proj"]}, max_steps=1))
    train(cfg(tiny_base, data_file, tmp_path / "all", lora={"target_modules": "all-linear"}, max_steps=1))
    saved = load_file(str(tmp_path / "all" / "adapter_model.safetensors"))
    assert any("mlp.down_proj.lora_A" in k for k in saved) and not any("lm_head" in k for k in saved)


def test_end_to_end_smollm2_loss_falls_and_adapter_reloads(tmp_path, all_threads):
    """The one test on the embedded model: a few real steps, the loss drops, the saved adapter reloads."""
    from lorakit import PeftModel
    from lorakit.models import load_base_model
    from lorakit.loss import eval_loss

    facts = [("What is the Zorblat plan price?", "The Zorblat plan costs $41.75 per seat."),
             ("How much does Zorblat cost?", "The Zorblat plan costs $41.75 per seat."),
             ("When is the Quillon office open?", "The Quillon office is open 6:15 to 13:40."),
             ("Quillon office hours?", "The Quillon office is open 6:15 to 13:40.")]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"query": q, "response": r}) + "\n" for q, r in facts))
    config = TrainConfig(data=str(path), out=str(tmp_path / "out"), lora=lora_recipe(r=8, lora_alpha=16, lora_dropout=0.0),
                         lr=2e-3, batch_size=4, max_steps=6, warmup_ratio=0.0, progress=False, max_length=96)
    result = train(config)
    assert result.steps == 6
    model, tok = load_base_model("smollm2")
    data = load_data(config, tok, str(path))
    before = eval_loss(model, data, tok.pad_token_id)
    model = PeftModel.from_pretrained(model, config.out)
    after = eval_loss(model, data, tok.pad_token_id)
    assert after < 0.5 * before, (before, after)
    assert result.final_loss < result.first_loss


def _eval_loss_of(tiny_base, adapter_dir, eval_file):
    from lorakit import PeftModel
    from lorakit.loss import eval_loss
    from lorakit.models import load_base_model

    base, tokenizer = load_base_model(tiny_base)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    config = cfg(tiny_base, eval_file, "unused")
    return eval_loss(model, load_data(config, tokenizer, eval_file), tokenizer.pad_token_id, 8)


def test_keep_best_keeps_the_lowest_eval_loss_adapter_at_the_top(tiny_base, data_file, tmp_path):
    # held-out answers unlike the training answers: the longer it trains on those, the worse its eval loss gets
    rows = [json.loads(line) for line in open(data_file)]
    contradicting = tmp_path / "eval.jsonl"
    contradicting.write_text("".join(json.dumps({"query": r["query"], "response": "zebra violin quantum " * 3})
                                     + "\n" for r in rows))
    out = tmp_path / "run"
    result = train(cfg(tiny_base, data_file, out, epochs=6, lr=3e-2, eval_data=str(contradicting), eval_every=3,
                       keep_best=True))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in metrics if "eval_loss" in r}
    assert sorted(evals) == list(range(3, 37, 3))
    best_step = min(evals, key=evals.get)
    assert result.best_step == best_step < result.steps == 36
    assert result.best_eval_loss == pytest.approx(evals[best_step], abs=1e-5)
    assert [r["step"] for r in metrics if r.get("best")][-1] == best_step  # the metrics mark it; the plot stars it
    assert result.last_dir == str(out / "last") and not (out / "best").exists()
    assert "the lowest eval loss" in result.summary() and str(out / "last") in result.summary()
    # the top of --out holds the best step's adapter; last/ the last step's
    assert _eval_loss_of(tiny_base, out, str(contradicting)) == pytest.approx(evals[best_step], rel=1e-4)
    assert _eval_loss_of(tiny_base, out / "last", str(contradicting)) == pytest.approx(evals[36], rel=1e-4)
    record = json.loads((out / "lorakit_train.json").read_text())
    assert record["result"]["best_step"] == best_step and record["config"]["keep_best"] is True


def test_keep_best_when_the_last_step_is_best_and_eval_at_each_epoch_end(tiny_base, data_file, tmp_path):
    out = tmp_path / "run"
    result = train(cfg(tiny_base, data_file, out, epochs=3, lr=3e-2, eval_data=data_file, keep_best=True))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if "eval_loss" in r] == [6, 12, 18]  # no --eval-every: each epoch's end
    assert result.best_step == 18 and result.last_dir is None
    assert not (out / "last").exists() and not (out / "best").exists()
    assert result.summary().endswith("(the last step)")
    assert _eval_loss_of(tiny_base, out, data_file) == pytest.approx(result.eval_loss, rel=1e-4)
