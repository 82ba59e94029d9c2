"""The batch-1 LoRA update's two matrix-vector products, hot and cold (one-off; benchmarks/README.md, 2026-12-08).

    python benchmarks/results/2026-12-08-avx2-zen3/lora_arith_cold.py

x A^T (A: 16 x 576) then out += s (x A^T) B^T (B: 576 x 16 or 192 x 16), as kernels.py computes them for one
token, and the base's 576-input matmul beside them; "cold": a 64 MB buffer is written between calls, as a decode
step streams the other weights through the caches between two calls of a layer. Medians of 300 calls, on a
short-lived thread (see on_short_lived_thread), with 2 and 1 torch threads.
"""

import statistics
import threading
import time

import torch
import torch.nn.functional as F


def run() -> None:
    d, r = 576, 16
    big = torch.randn(16 * 1024 * 1024)
    for out_features in (576, 192):
        a, b, x = torch.randn(r, d), torch.randn(out_features, r), torch.randn(d)
        out, weight = torch.randn(out_features), torch.randn(out_features, d)
        for label, cold in (("hot", False), ("cold", True)):
            times: dict = {"x A^T": [], "+ s h B^T": [], "both": [], "base matmul": []}
            for _ in range(300):
                if cold:
                    big.add_(1.0)
                start = time.perf_counter()
                h = a.mv(x)
                middle = time.perf_counter()
                out.addmv_(b, h, alpha=2.0)
                end = time.perf_counter()
                times["x A^T"].append(middle - start)
                times["+ s h B^T"].append(end - middle)
                times["both"].append(end - start)
                if cold:
                    big.add_(1.0)
                start = time.perf_counter()
                F.linear(x, weight)
                times["base matmul"].append(time.perf_counter() - start)
            print(f"threads {torch.get_num_threads()}, out {out_features}, {label}: "
                  + ", ".join(f"{k} {statistics.median(v) * 1e6:.1f} us" for k, v in times.items()))


if __name__ == "__main__":
    for threads in (2, 1):
        torch.set_num_threads(threads)
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
