"""Adapter churn: does a server that loads and evicts adapters all day keep its memory?

    nice -n 5 python benchmarks/churn.py [--adapters 200] [--max-adapters 4] [--every 20] [--out FILE]

`lorakit serve` runs as a child process with --adapters adapters in an --adapter-dir and --max-adapters slots.
One request after another names the next adapter (adapter0, adapter1, ...), so each is loaded from disk,
used for a short greedy completion, and evicted --max-adapters requests later. The server's RSS is read
every --every adapters. The goal: RSS after the last adapter within 10% of RSS after the first 20.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import ServerProcess, make_adapter_dir, metric_total  # noqa: E402
from train_step import emit  # benchmarks/ is the script's directory  # noqa: E402

GOAL = 0.10  # RSS after all adapters over RSS after the first `--every`, minus one


def churn(url: str, names: list[str], every: int, rss, max_tokens: int = 2) -> dict:
    """Request each adapter in turn; RSS (MiB, from `rss()`) after every `every` adapters."""
    import httpx

    curve = {}
    with httpx.Client(base_url=url, timeout=600) as client:
        start = time.perf_counter()
        for i, name in enumerate(names, 1):
            r = client.post("/v1/completions", json={"model": name, "prompt": "The capital of France is",
                                                     "max_tokens": max_tokens, "temperature": 0})
            if r.status_code != 200:
                raise RuntimeError(f"request {i} ({name}) failed: {r.status_code} {r.text[:300]}")
            if i % every == 0 or i == len(names):
                curve[i] = round(rss(), 1)
        seconds = time.perf_counter() - start
        metrics = client.get("/metrics").text
        resident = len(client.get("/health").json()["resident_adapters"])
    first, last = curve[min(curve)], curve[max(curve)]
    return {"rss_mb_by_adapters": curve, "rss_mb_first": first, "rss_mb_last": last,
            "growth": round(last / first - 1, 4), "goal": f"< {GOAL:.0%}", "ok": last / first - 1 < GOAL,
            "adapter_loads": int(metric_total(metrics, "lorakit_adapter_loads_total")),
            "adapter_evictions": int(metric_total(metrics, "lorakit_adapter_evictions_total")),
            "resident_at_end": resident, "seconds": round(seconds, 1)}


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2")
    p.add_argument("--adapters", type=int, default=200)
    p.add_argument("--distinct", type=int, default=8, help="random adapters made; the others are links to them, "
                   "each loaded under its own name")
    p.add_argument("--max-adapters", type=int, default=4)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="lorakit-churn-"))
    try:
        names = make_adapter_dir(args.base, args.adapters, tmp / "adapters", distinct=args.distinct)
        server = ServerProcess(["--base", args.base, "--adapter-dir", str(tmp / "adapters"),
                                "--max-adapters", str(args.max_adapters)], tmp / "server.log")
        try:
            server.wait_ready()
            report = churn(server.url, names, args.every, server.rss_mb)
        finally:
            server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"benchmark": "churn", "base": args.base, "adapters": args.adapters, "distinct": args.distinct,
              "max_adapters": args.max_adapters, **report}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
