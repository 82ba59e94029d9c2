"""int4 packed vs bf16 copy per row count, SmolLM2-135M's fused shapes; alternating, medians."""
import json, statistics, time, torch
from torch import nn
from lorakit.weight_only import Int4Linear, Int8Linear
torch.manual_seed(0); torch.set_num_threads(2)
shapes = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)}
layers = {}
for name, (i, o) in shapes.items():
    lin = nn.Linear(i, o, bias=False)
    q = Int4Linear.from_linear(lin); q.keep_bf16_copy(10**9)
    layers[name] = q
head = Int8Linear.from_linear(nn.Linear(576, 49152, bias=False)); head.keep_bf16_copy(10**9)
def t(fn, reps):
    s = time.perf_counter()
    for _ in range(reps): fn()
    return (time.perf_counter() - s) / reps * 1e6
out = {}
with torch.no_grad():
    for rows in (1, 2, 4, 6, 8, 12, 16):
        res = {"int4_body": [], "bf16_body": [], "int8_head": [], "bf16_head": []}
        xs = {n: torch.randn(rows, l.in_features).bfloat16() for n, l in layers.items()}
        xh = torch.randn(rows, 576).bfloat16()
        for _ in range(9):
            # one layer's worth of body x 30 layers ~ per decode step
            res["int4_body"].append(sum(t(lambda: l._matmul(xs[n]), 30) for n, l in layers.items()) * 30)
            res["bf16_body"].append(sum(t(lambda: xs[n] @ l.batch_weight.T, 30) for n, l in layers.items()) * 30)
            res["int8_head"].append(t(lambda: head._matmul(xh), 5))
            res["bf16_head"].append(t(lambda: xh @ head.batch_weight.T, 5))
        out[rows] = {k: round(statistics.median(v) / 1000, 2) for k, v in res.items()}  # ms per step
        print(rows, out[rows], flush=True)
print(json.dumps(out))
