"""`lorakit plan`'s memory estimate vs the measured peak of real training steps. Prints JSON.

    python benchmarks/plan_memory.py [--base smollm2] [--shapes 4x256,8x512] [--steps 2] [--out result.json]

Each case (LoRA and QLoRA, float32 and bf16, at each batch shape) runs in a fresh process: it plans the run
(`lorakit.plan.make_plan`, device "cpu", so the runtime line is that process's own RSS with torch and
transformers loaded), then loads the model exactly as `lorakit train` does (train.prepare_model), trains
`--steps` steps on full-length rows of random tokens (every token labelled, as the plan assumes) with
lorakit's loss, clipping and AdamW, and reports the peak: the process's peak RSS (VmHWM) on the CPU, reset
after loading (glibc's free memory trimmed first), so that the load's transient copies do not count; or
torch.cuda.max_memory_allocated on a GPU (plus the plan's CUDA context line).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from train_step import emit  # benchmarks/ is the script's directory  # noqa: E402


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Drop glibc's cached free memory, then make the peak RSS (VmHWM) restart from the current RSS."""
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def measure(base: str, batch: int, length: int, bf16: bool, quantize: str | None, steps: int,
            targets: list[str], r: int, attention: str | None, gradient_checkpointing: bool = False) -> dict:
    """Plan and measure one case in this process (run it in a fresh one)."""
    import torch

    from lorakit.loss import accumulate_gradients, supports_logits_to_keep
    from lorakit.optim import build_optimizer, clip_gradients
    from lorakit.plan import make_plan
    from lorakit.train import prepare_model
    from lorakit.train_config import TrainConfig, lora_recipe

    config = TrainConfig(base=base, data="-", lora=lora_recipe(r=r, lora_alpha=2 * r, target_modules=targets,
                                                               lora_dropout=0.0),
                         batch_size=batch, max_length=length, bf16=bf16, quantize=quantize, attention=attention,
                         gradient_checkpointing=gradient_checkpointing, device="auto")
    cuda = torch.cuda.is_available()
    plan = make_plan(config, device="cuda" if cuda else "cpu")
    model, tokenizer = prepare_model(config)
    model.train()
    optimizer = build_optimizer(model, config)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, tokenizer.vocab_size, (batch, length), generator=g)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]
    keep = supports_logits_to_keep(model)
    loaded = _status("VmRSS")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated()
    else:
        _reset_peak()
    t0 = time.perf_counter()
    losses = []
    for _ in range(steps):
        losses.append(accumulate_gradients(model, [{k: v.to(device) for k, v in b.items()} for b in batches], bf16,
                                           keep))
        clip_gradients(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated() + plan.memory.overhead
    else:
        peak = _status("VmHWM")
    m = plan.memory
    return {"case": f"{'qlora' if quantize else 'lora'} {'bf16' if bf16 else 'fp32'} {batch}x{length}",
            "device": "cuda" if cuda else "cpu", "estimate_bytes": m.total, "measured_peak_bytes": peak,
            "ratio_estimate_over_measured": round(m.total / peak, 4),
            "estimate_parts": {k: v for k, v in m.to_dict().items() if k != "detail"},
            "measured_after_load_bytes": loaded, "estimated_after_load_bytes": m.frozen_weights + m.overhead,
            "measured_step_bytes": peak - loaded,
            "estimated_step_bytes": m.total - m.frozen_weights - m.overhead,
            "losses": [round(x, 4) for x in losses], "seconds": round(seconds, 2)}


# glibc's default raises its mmap threshold as large blocks are freed (up to 32 MiB), after which freed activations
# stay in the heap and count in RSS; a fixed threshold returns every large block to the system when it is freed, so
# RSS follows the live tensors. Both are measured.
ALLOCATORS = {"glibc default": {}, "mmap threshold 128 KiB": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
CASES = [(q, bf16) for q in (None, "nf4") for bf16 in (False, True)]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2")
    p.add_argument("--shapes", default="4x256,8x512", help="batch x length pairs")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--attention", default=None, help="eager or sdpa (default: transformers' choice, sdpa)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--cases", default=None, help="e.g. lora-fp32,qlora-bf16 (default: all four)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # run one case here: quantize,bf16,batch,length
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    targets = args.targets.split(",")
    if args.one:
        q, bf16, batch, length = args.one.split(",")
        result = measure(args.base, int(batch), int(length), bf16 == "bf16", q if q != "none" else None, args.steps,
                         targets, args.r, args.attention, args.gradient_checkpointing)
        print(json.dumps(result))
        return result
    wanted = set(args.cases.split(",")) if args.cases else None
    rows = []
    for shape in args.shapes.split(","):
        batch, length = (int(x) for x in shape.split("x"))
        for q, bf16 in CASES:
            name = f"{'qlora' if q else 'lora'}-{'bf16' if bf16 else 'fp32'}"
            if wanted and name not in wanted:
                continue
            cmd = [sys.executable, __file__, "--one", f"{q or 'none'},{'bf16' if bf16 else 'fp32'},{batch},{length}",
                   "--base", args.base, "--steps", str(args.steps), "--r", str(args.r), "--targets", args.targets]
            cmd += ["--attention", args.attention] if args.attention else []
            cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
            for allocator, env in ALLOCATORS.items():
                out = subprocess.run(cmd, capture_output=True, text=True,
                                     env={**os.environ, "TQDM_DISABLE": "1", **env})
                if out.returncode:
                    raise RuntimeError(f"{name} {shape} failed:\n{out.stderr[-3000:]}")
                rows.append({"allocator": allocator, **json.loads(out.stdout.strip().splitlines()[-1])})
                print(json.dumps({k: rows[-1][k] for k in ("case", "allocator", "estimate_bytes",
                                                            "measured_peak_bytes", "ratio_estimate_over_measured")}),
                      file=sys.stderr)
    errors = {name: round(max((abs(r["ratio_estimate_over_measured"] - 1) for r in rows if r["allocator"] == name),
                              default=0), 4) for name in ALLOCATORS}
    result = {"base": args.base, "steps": args.steps, "r": args.r, "targets": targets, "cases": rows,
              "max_abs_error_by_allocator": errors}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
