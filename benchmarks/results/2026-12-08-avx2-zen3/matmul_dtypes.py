"""F.linear of SmolLM2-135M's shapes for 1-16 rows, float32 against bfloat16 (one-off; benchmarks/README.md,
2026-12-08): on a CPU without bf16 units the bf16 matmul's time grows with the rows, float32's hardly.

    python benchmarks/results/2026-12-08-avx2-zen3/matmul_dtypes.py

Medians of 15 calls after 3, weights hot, on a short-lived thread with torch's default threads.
"""

import statistics
import threading
import time

import torch
import torch.nn.functional as F


def run() -> None:
    for out_features, in_features in ((1536, 576), (576, 1536), (49152, 576)):
        weight32 = torch.randn(out_features, in_features)
        weight16 = weight32.bfloat16()
        for rows in (1, 2, 4, 7, 8, 16):
            result = {}
            for name, weight in (("float32", weight32), ("bfloat16", weight16)):
                x = torch.randn(rows, in_features, dtype=weight.dtype)
                for _ in range(3):
                    F.linear(x, weight)
                times = []
                for _ in range(15):
                    start = time.perf_counter()
                    F.linear(x, weight)
                    times.append(time.perf_counter() - start)
                result[name] = f"{statistics.median(times) * 1e6:.0f} us"
            print(f"{out_features}x{in_features}, {rows} rows: {result}", flush=True)


if __name__ == "__main__":
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
