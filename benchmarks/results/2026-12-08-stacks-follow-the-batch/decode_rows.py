"""The server's decode step by rows and adapters (one-off; benchmarks/README.md, 2026-12-08).

    python benchmarks/results/2026-12-08-stacks-follow-the-batch/decode_rows.py [--precision auto] [--profile]

SmolLM2-135M at `lorakit serve`'s decode precision, 8 random adapters (r=16 on q,k,v,o, as benchmarks/serve.py
makes them), a slot cache of random K/V 60-67 positions long. Times ServedModel.decode for 1-8 rows on one
adapter, 8 rows on 8 adapters, and 2 and 8 rows of the base, alternating, medians of 15 rounds; then what stacking
the tables of 2 or 3 adapters adds to the first step of a batch that uses them. Everything that
runs PyTorch's parallel ops runs on one thread (or on short-lived ones), as in the server: a second OpenMP team
would make every op wait (benchmarks/README.md, "The engine thread").
"""

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
from serve import make_random_adapters  # noqa: E402

from lorakit.models import load_base_model  # noqa: E402
from lorakit.serve.kv_cache import SlotCache  # noqa: E402
from lorakit.serve.served_model import ServedModel  # noqa: E402
from lorakit.serve.server import on_short_lived_thread  # noqa: E402
from lorakit.weight_only import prepare_for_decode  # noqa: E402

CASES = [(1, "one"), (2, "one"), (4, "one"), (8, "one"), (8, "mixed"), (2, "base"), (8, "base")]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--precision", default="auto")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's table for 2 and 8 rows")
    args = p.parse_args()
    on_short_lived_thread(torch.set_num_threads, 2)

    def load():
        base, tokenizer = load_base_model("smollm2")
        folder = Path(tempfile.mkdtemp())
        names = make_random_adapters(base, 8, folder)
        precision = prepare_for_decode(base, args.precision)
        served = ServedModel(base, tokenizer, 1024)
        for name in names:
            served.load_adapter(name, folder / name)
        cfg = served.hf_model.config
        slots = SlotCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                          8, 1024, torch.float32, torch.device("cpu"))
        generator = torch.Generator().manual_seed(0)
        for buffers in (slots.k, slots.v):
            for buffer in buffers:
                buffer.copy_(torch.randn(buffer.shape, generator=generator))
        return served, names, precision, slots

    served, names, precision, slots = on_short_lived_thread(load)
    print("decode precision", precision)

    def case(rows: int, kind: str):
        adapters = {"one": [names[0]] * rows, "mixed": [names[i % 8] for i in range(rows)], "base": [None] * rows}
        ids = torch.tensor([(37 * i) % 1000 for i in range(rows)])
        positions = torch.tensor([60 + i for i in range(rows)])

        def step():
            with torch.no_grad():
                served.decode(adapters[kind], ids, positions, slots)
        return step

    steps = {c: case(*c) for c in CASES}
    times: dict = {c: [] for c in CASES}
    stacking: dict = {}

    def run():
        for c in CASES:
            for _ in range(3):
                steps[c]()
        for _ in range(15):
            for c in CASES:
                start = time.perf_counter()
                steps[c]()
                times[c].append(time.perf_counter() - start)
        # A batch of k of the 8 adapters (k <= 3: fewer than half, so the step stacks the batch's own) whose stack
        # is not kept: its first step stacks them; the difference to the same step warm is the stacking.
        for k in (2, 3):
            first, warm = [], []
            for i in range(8):  # eight different sets; 4 stacks are kept, so each is new when it comes
                chosen = [names[(i + j * 3) % 8] for j in range(k)]
                adapters = [chosen[r % k] for r in range(8)]
                ids, positions = torch.arange(8), torch.tensor([60 + r for r in range(8)])
                with torch.no_grad():
                    start = time.perf_counter()
                    served.decode(adapters, ids, positions, slots)
                    first.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    served.decode(adapters, ids, positions, slots)
                    warm.append(time.perf_counter() - start)
            stacking[k] = statistics.median(first) - statistics.median(warm)
        if args.profile:
            from torch.profiler import profile
            for c in [(2, "one"), (8, "mixed")]:
                with profile(record_shapes=True) as prof:
                    for _ in range(10):
                        steps[c]()
                print(c, "10 steps")
                print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    for c in CASES:
        print(f"{c[0]} rows, {c[1]:5s} {1000 * statistics.median(times[c]):6.2f} ms")
    for k, seconds in stacking.items():
        print(f"stacking {k} adapters (first step of a new set minus the same step warm): {1000 * seconds:6.2f} ms")


if __name__ == "__main__":
    main()
