"""Numeric precision: whether bf16 pays on this machine (measured, not assumed), and autocast."""

from __future__ import annotations

import contextlib
import functools
import time

import torch

DTYPES = ("float32", "bfloat16", "float16")  # what --dtype accepts, for torch.float32 and so on

# Train in bf16 (the demo, examples/train_and_eval.py) where bf16 matmuls are at least this much faster.
BF16_MIN_SPEEDUP = 1.2


def bf16_matmul_speedup(device: str | torch.device = "cpu") -> float:
    """How many times faster a bfloat16 matmul runs than a float32 one on `device` (measured in under a second).

    CPUs differ by far: with AVX512-BF16 or AMX units bf16 ran about 1.7x faster, on an AVX2-only CPU 5-8x
    slower (oneDNN has no fast bf16 kernels for it). On a GPU that supports bf16 it is taken as faster.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return 2.0 if torch.cuda.is_bf16_supported() else 0.5
    return _cpu_bf16_speedup() if device.type == "cpu" else 1.0


@functools.lru_cache(maxsize=1)
def _cpu_bf16_speedup() -> float:
    """Measured once per process: the demo's choice, then train's and eval's warnings, agree and cost one timing."""
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(256, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
        best = float("inf")
        for _ in range(4):  # the first call also warms the kernel up
            start = time.perf_counter()
            a @ b.t()
            best = min(best, time.perf_counter() - start)
        timings[dtype] = best
    return timings[torch.float32] / timings[torch.bfloat16]


def slow_bf16_warning(device: torch.device, instead: str = "without --bf16") -> str | None:
    """A warning to print when bf16 was asked for on a CPU where it runs slower than float32, else None;
    `instead` names the options that avoid it."""
    if device.type != "cpu":
        return None
    speedup = bf16_matmul_speedup(device)
    if speedup >= 1:
        return None
    return (f"lorakit: warning: bf16 matmuls run {1 / speedup:.1f}x slower than float32 ones on this CPU (it has no "
            f"bf16 units, such as AVX512-BF16 or AMX): {instead} this will be faster")


def autocast(bf16: bool, device_type: str = "cpu"):
    """bf16 autocast on `device_type` when `bf16`, else a context that does nothing."""
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
