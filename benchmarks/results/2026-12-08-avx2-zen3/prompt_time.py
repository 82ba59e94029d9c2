"""Reading a prompt (a prefill forward) at decode precisions int4, int4+bf16 and fp32 (one-off; benchmarks/README.md,
2026-12-08).

    python benchmarks/results/2026-12-08-avx2-zen3/prompt_time.py

SmolLM2-135M as `lorakit serve` prepares it (prepare_for_decode) on three copies of the base; prompts of 40 and 530
random tokens, one forward each keeping the last position's logits, the copies alternating, medians of 5 after one
warm-up, on a short-lived thread with torch's default threads.
"""

import copy
import statistics
import threading
import time

import torch

from lorakit.models import load_base_model
from lorakit.weight_only import prepare_for_decode


def run() -> None:
    base, _ = load_base_model("smollm2")
    models = {}
    for precision in ("int4", "int4+bf16", "fp32"):
        models[precision] = copy.deepcopy(base)
        prepare_for_decode(models[precision], precision)
    with torch.no_grad():
        for length in (40, 530):
            ids = torch.randint(100, 40000, (1, length))
            times: dict = {p: [] for p in models}
            for model in models.values():
                model(input_ids=ids, logits_to_keep=1)
            for _ in range(5):
                for precision, model in models.items():
                    start = time.perf_counter()
                    model(input_ids=ids, logits_to_keep=1)
                    times[precision].append(time.perf_counter() - start)
            print(f"{length} tokens: " + ", ".join(f"{p} {statistics.median(v):.3f} s" for p, v in times.items()),
                  flush=True)


if __name__ == "__main__":
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
