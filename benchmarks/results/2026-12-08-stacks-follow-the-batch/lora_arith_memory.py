"""How much of an unmerged adapter's cost at batch 1 is its weights coming from memory (one-off; 2026-12-08).

    python benchmarks/results/2026-12-08-stacks-follow-the-batch/lora_arith_memory.py

120 layers: each a 576 x 576 base matmul of one token (the weights stream through the caches, as decoding
does), then lorakit's decode arithmetic for one token (kernels._accumulate: A x, then s B (A x) added in place).
Three variants alternate, medians of 100 rounds: the base alone, 120 distinct adapters (A and B come from memory
after the base weights passed), and one adapter pair reused by every layer (A and B stay in cache).
"""

import statistics
import time

import torch
import torch.nn.functional as F

LAYERS = 120
torch.manual_seed(0)
weights = [torch.randn(576, 576) for _ in range(LAYERS)]
a_all = [torch.randn(16, 576) for _ in range(LAYERS)]
b_all = [torch.randn(576, 16) for _ in range(LAYERS)]
x = torch.randn(1, 1, 576)


def run(a_list, b_list, adapter=True):
    for w, a, b in zip(weights, a_list, b_list):
        out = F.linear(x, w)
        if adapter:
            out.view(-1).addmv_(b, a.mv(x.view(-1)), alpha=2.0)


variants = {"base": lambda: run(a_all, b_all, adapter=False), "distinct_adapters": lambda: run(a_all, b_all),
            "one_pair_reused": lambda: run([a_all[0]] * LAYERS, [b_all[0]] * LAYERS)}
times = {k: [] for k in variants}
with torch.no_grad():
    for _ in range(100):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
median = {k: statistics.median(v) for k, v in times.items()}
print({k: f"{v * 1e3:.3f} ms" for k, v in median.items()})
print("over the base: distinct", round(median["distinct_adapters"] / median["base"], 3),
      "reused", round(median["one_pair_reused"] / median["base"], 3))
