"""Multi-adapter serving benchmark: mixed-adapter batching vs one adapter at a time vs a single adapter.

    python benchmarks/serve.py [--clients 8] [--adapters 8] [--requests 32] [--max-tokens 32] [--runs 3]

A real `lorakit serve` app (uvicorn on a loopback port, in this process) on the default base model, on the server's
default device (`--device auto`: the GPU if there is one), its weights at the server's default decode precision
(`--decode-precision auto`; the JSON's setup says what it chose).
N closed-loop clients send chat requests (prompts from the demo eval set) over HTTP; each request
picks one of M adapters with Zipf popularity (p(k) ~ 1/k^s, like S-LoRA's workload); greedy decoding
with a fixed output length (ignore_eos). Three scenarios, alternating, medians over --runs:

  mixed        requests for any adapters share each decode batch (one forward, per-row adapters)
  per_adapter  the same request list, but each batch serves one adapter (--scheduling per-adapter):
               the batch drains, then the engine switches to the next adapter
  single       the same prompts, all on one adapter

Adapters: --adapter-dir with trained adapters, else M random ones (r=16 on q,k,v,o, init_lora_weights=False)
saved to a temp dir. Prints JSON: throughput (generated tokens/s), p50/p95 request latency, mean decode
batch size, and the ratios the goals are stated in.

On a machine the weights cannot reach (a lent GPU): `--base DIR --random-weights`, DIR holding the base's
config.json and tokenizer files alone (3.5 MB for SmolLM2: the cached conversion without model.safetensors).
Every request decodes its fixed length either way, so the work per token is the same; the text is not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# benchmarks/ is the script's directory
from train_step import add_random_weights_option, random_base  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "src" / "lorakit" / "demo_data" / "eval.jsonl"


def make_random_adapters(base, count: int, directory: Path, seed: int = 0) -> list[str]:
    import copy

    from lorakit import LoraConfig, get_peft_model

    names = [f"adapter{i}" for i in range(count)]
    config = LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False)
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])  # the copy is thrown away
    for name in names[1:]:
        model.add_adapter(name, config)
    with torch.no_grad():  # small random B: outputs stay language-like; the compute is the same
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.mul_(0.1)
    model.save_pretrained(directory)  # PEFT layout: one sub-folder per (non-"default") adapter name
    return names


def zipf_choices(names: list[str], count: int, s: float, rng: random.Random) -> list[str]:
    weights = [1.0 / (k + 1) ** s for k in range(len(names))]
    return rng.choices(names, weights=weights, k=count)


async def run_load(url: str, jobs: list[tuple[str, str]], clients: int, max_tokens: int, key: str) -> dict:
    """Closed loop: `clients` workers take the next job as soon as their previous one finished."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    latencies, tokens = [], 0

    async def worker(client: httpx.AsyncClient):
        nonlocal tokens
        while True:
            try:
                model, prompt = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True}
            start = time.perf_counter()
            r = await client.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - start)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=3600, headers={"Authorization": f"Bearer {key}"},
                                 limits=httpx.Limits(max_connections=clients)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "p50_latency_s": statistics.median(latencies),
            "p95_latency_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]}


def main(argv: list[str] | None = None) -> dict:
    from lorakit.weight_only import DECODE_PRECISIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2")
    p.add_argument("--adapter-dir", default=None, help="trained adapters (one per sub-folder); default: random")
    p.add_argument("--adapters", type=int, default=8, help="M: adapters the requests are spread over")
    p.add_argument("--clients", type=int, default=8, help="N: concurrent closed-loop clients")
    p.add_argument("--requests", type=int, default=32, help="requests per scenario and run")
    p.add_argument("--max-tokens", type=int, default=32, help="fixed output length per request")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s of adapter popularity")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=1024, help="as `lorakit serve --max-model-len`")
    p.add_argument("--decode-precision", choices=DECODE_PRECISIONS, default="auto",
                   help="the base's weights while decoding, as `lorakit serve --decode-precision` (default auto)")
    p.add_argument("--device", default="auto", help="where the model runs, as `lorakit serve --device` (default auto)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the base's dtype as loaded, as `lorakit serve --dtype` (default float32)")
    add_random_weights_option(p)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    from lorakit.serve.server import on_short_lived_thread

    if args.threads:  # from a thread that ends: the main thread keeps no OpenMP team (see on_short_lived_thread)
        on_short_lived_thread(torch.set_num_threads, args.threads)

    from lorakit.models import load_base_model, load_tokenizer, resolve_device
    from lorakit.serve import ServerThread
    from lorakit.serve.app import create_app
    from lorakit.serve.engine import Engine, EngineConfig
    from lorakit.serve.metrics import ServerMetrics
    from lorakit.weight_only import prepare_for_decode

    device = resolve_device(args.device)
    tmp = tempfile.TemporaryDirectory(prefix="lorakit-serve-bench-")
    if args.adapter_dir:
        adapter_dir = Path(args.adapter_dir)
        names = sorted(d.name for d in adapter_dir.iterdir() if (d / "adapter_config.json").is_file())[: args.adapters]
        if len(names) < args.adapters:
            sys.exit(f"--adapter-dir {adapter_dir} has {len(names)} adapters, fewer than --adapters {args.adapters}")
    else:
        adapter_dir = Path(tmp.name)
        names = None
    key = "bench"
    metrics = ServerMetrics(args.max_batch_size)
    precisions: list[str] = []

    def load(given: list[str] | None) -> tuple[Engine, list[str]]:
        """As `lorakit serve` does: the PyTorch work before the engine starts runs on a thread of its own."""
        dtype = getattr(torch, args.dtype)
        if args.random_weights:
            base, tokenizer = random_base(args.base, dtype, device), load_tokenizer(args.base)
        else:
            base, tokenizer = load_base_model(args.base, dtype=dtype, device=device)
        adapters = given if given is not None else make_random_adapters(base, args.adapters, adapter_dir, args.seed)
        # after the adapters, which are made on the weights as loaded
        precisions.append(prepare_for_decode(base, args.decode_precision))
        config = EngineConfig(max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
                              max_adapters=len(adapters))
        return Engine(base, tokenizer, config, base_name=args.base, adapter_dirs=[str(adapter_dir)],
                      metrics=metrics), adapters

    engine, names = on_short_lived_thread(load, names)
    server = ServerThread(create_app(engine, metrics, api_key=key)).start()

    rng = random.Random(args.seed)
    prompts = [json.loads(line)["query"] for line in EVAL.read_text().splitlines() if line.strip()]
    scenarios = ["mixed", "per_adapter", "single"]
    results: dict[str, list[dict]] = {s: [] for s in scenarios}
    try:
        # Warm-up (not timed): every adapter loaded, each scenario's code paths and buffers exercised once.
        warm = zipf_choices(names, 2 * args.clients, args.zipf, random.Random(args.seed + 1))
        for scheduling, models in (("mixed", names + warm), ("per-adapter", warm), ("mixed", [names[0]] * 8)):
            engine.config.scheduling = scheduling
            asyncio.run(run_load(server.url, [(m, rng.choice(prompts)) for m in models], args.clients, 8, key))
        for run in range(args.runs):
            chosen = [rng.choice(prompts) for _ in range(args.requests)]
            adapters = zipf_choices(names, args.requests, args.zipf, rng)
            order = scenarios[run % 3:] + scenarios[: run % 3]  # alternate which scenario goes first
            for scenario in order:
                engine.config.scheduling = "per-adapter" if scenario == "per_adapter" else "mixed"
                jobs = list(zip([names[0]] * args.requests if scenario == "single" else adapters, chosen))
                before = (engine.steps, engine.batch_rows, engine.decode_seconds, engine.prefill_seconds,
                          engine.prefills)
                result = asyncio.run(run_load(server.url, jobs, args.clients, args.max_tokens, key))
                steps, rows, decode_s, prefill_s, prefills = (a - b for a, b in zip(
                    (engine.steps, engine.batch_rows, engine.decode_seconds, engine.prefill_seconds,
                     engine.prefills), before))
                result["mean_batch_size"] = rows / max(1, steps)
                result["decode_ms_per_step"] = 1000 * decode_s / max(1, steps)
                result["prefill_seconds"] = prefill_s
                result["prefill_forwards"] = prefills
                result["distinct_adapters"] = len({m for m, _ in jobs})
                results[scenario].append(result)
                print(f"run {run} {scenario:12s} {result['tokens_per_s']:7.1f} tok/s  "
                      f"p50 {result['p50_latency_s']:.2f}s  p95 {result['p95_latency_s']:.2f}s  "
                      f"batch {result['mean_batch_size']:.2f}  step {result['decode_ms_per_step']:.0f} ms  "
                      f"prefill {prefill_s:.1f}s/{prefills}", file=sys.stderr, flush=True)
    finally:
        server.stop()
        tmp.cleanup()

    def median(scenario: str, key_: str) -> float:
        return statistics.median(r[key_] for r in results[scenario])

    summary = {s: {k: round(median(s, k), 3) for k in ("tokens_per_s", "p50_latency_s", "p95_latency_s",
                                                         "mean_batch_size", "decode_ms_per_step")} for s in scenarios}
    report = {
        "benchmark": "serve",
        "setup": {"base": args.base, "random_weights": args.random_weights, "dtype": args.dtype,
                  "adapters": len(names), "adapter_source": args.adapter_dir or "random r=16 q,k,v,o",
                  "clients": args.clients, "requests_per_run": args.requests, "max_tokens": args.max_tokens,
                  "zipf_s": args.zipf, "max_batch_size": args.max_batch_size, "runs": args.runs,
                  "decode_precision": precisions[0], "device": str(device),
                  "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                  "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "median": summary,
        "ratios": {
            "mixed_vs_per_adapter_throughput": round(summary["mixed"]["tokens_per_s"]
                                                     / summary["per_adapter"]["tokens_per_s"], 2),
            "mixed_vs_single_adapter_throughput": round(summary["mixed"]["tokens_per_s"]
                                                        / summary["single"]["tokens_per_s"], 2),
        },
        # The same ratios within each run (the three scenarios ran back to back), then their median: less
        # sensitive to other load on the machine drifting between runs.
        "ratios_median_of_runs": {
            "mixed_vs_per_adapter_throughput": round(statistics.median(
                m["tokens_per_s"] / p["tokens_per_s"] for m, p in zip(results["mixed"], results["per_adapter"])), 2),
            "mixed_vs_single_adapter_throughput": round(statistics.median(
                m["tokens_per_s"] / s["tokens_per_s"] for m, s in zip(results["mixed"], results["single"])), 2),
        },
        "goals": {"mixed_vs_per_adapter_throughput": ">= 3.0", "mixed_vs_single_adapter_throughput": ">= 0.8"},
        "runs": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
