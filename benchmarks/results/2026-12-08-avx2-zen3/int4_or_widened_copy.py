"""One layer's matmul by rows: the int4 kernel, the bf16 copy widened to float32, the bf16 copy as is (one-off;
benchmarks/README.md, 2026-12-08): where the copy multiplied in float32 overtakes int4 on a CPU without bf16 units.

    python benchmarks/results/2026-12-08-avx2-zen3/int4_or_widened_copy.py

SmolLM2-135M's fused shapes (q,k,v 960x576; gate,up 3072x576; down 576x1536; o 576x576), random weights; rows
already in bfloat16 as Int4Linear rounds them. Medians of 7 calls after 2, on a short-lived thread.
"""

import statistics
import threading
import time

import torch
from torch import nn

from lorakit.weight_only import Int4Linear


def timed(fn, calls: int = 7) -> str:
    for _ in range(2):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return f"{statistics.median(times) * 1e6:.0f} us"


def run() -> None:
    torch.manual_seed(0)
    for out_features, in_features in ((960, 576), (3072, 576), (576, 1536), (576, 576)):
        layer = Int4Linear.from_linear(nn.Linear(in_features, out_features, bias=False))
        copy = layer.dequantize().bfloat16()
        for rows in (8, 16, 32, 64, 512):
            x = torch.randn(rows, in_features).bfloat16()
            result = {"int4": timed(lambda: layer._matmul(x)),
                      "copy in float32": timed(lambda: x.float() @ copy.float().T),
                      "copy in bf16": timed(lambda: x @ copy.T)}
            print(f"{out_features}x{in_features}, {rows} rows: {result}", flush=True)


if __name__ == "__main__":
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
