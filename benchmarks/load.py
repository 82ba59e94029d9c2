"""Load benchmark: `lorakit serve` under many concurrent clients, faults and bad input, on loopback.

    nice -n 5 python benchmarks/load.py [--clients 16,64] [--requests-per-client 6] [--adapters 8]
                                        [--max-adapters 4] [--max-seconds 240] [--out FILE]

Starts `lorakit serve` as a child process (so that its memory is its own) on a loopback port, with
--adapters random adapters in an --adapter-dir and fewer --max-adapters slots, so the LRU loads and evicts
all the time. Then, for each client count N, N concurrent clients each send --requests-per-client
requests, one after another: chat and completions, streamed and not, greedy and sampled, on the base or
any adapter; --hangup of the streams are cut by the client after their first tokens; --bad of the requests
are malformed in one of the BAD_REQUESTS ways. A phase stops taking new requests after --max-seconds.

Reports per phase: requests ok, 4xx, 5xx (must be 0), bad requests answered 2xx (must be 0), failed or
hung requests (must be 0); p50/p99 latency of complete answers and time to first token of streams;
generated tokens/s; adapter loads and evictions (from /metrics); the server's RSS after warm-up and after
the phase (growth must stay under 15%); and whether a greedy probe gives the same text before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "src" / "lorakit" / "demo_data" / "eval.jsonl"
HELLO = [{"role": "user", "content": "hi"}]
# (name, body or raw text, content type): each must get a 4xx with an OpenAI-style error object.
BAD_REQUESTS = [
    ("invalid_json", '{"model": "base", "messages": [', "application/json"),
    ("body_is_a_list", "[1, 2, 3]", "application/json"),
    ("not_utf8", b'{"model": "\xff\xfe"}', "application/json"),
    ("form_content_type", '{"model": "base", "prompt": "hi"}', "application/x-www-form-urlencoded"),
    ("missing_model", {"messages": HELLO}, None),
    ("unknown_model", {"model": "no-such-adapter", "messages": HELLO}, None),
    ("user_message_without_content", {"model": "base", "messages": [{"role": "user"}]}, None),
    ("empty_messages", {"model": "base", "messages": []}, None),
    ("unknown_role", {"model": "base", "messages": [{"role": "robot", "content": "hi"}]}, None),
    ("temperature_a_string", {"model": "base", "messages": HELLO, "temperature": "hot"}, None),
    ("temperature_out_of_range", {"model": "base", "messages": HELLO, "temperature": 7}, None),
    ("max_tokens_zero", {"model": "base", "prompt": "hi", "max_tokens": 0}, "completions"),
    ("max_tokens_past_the_context", {"model": "base", "prompt": "hi", "max_tokens": 10 ** 6}, "completions"),
    ("n_too_large", {"model": "base", "messages": HELLO, "n": 1000}, None),
    ("token_id_out_of_range", {"model": "base", "prompt": [1, 2, 10 ** 9]}, "completions"),
    ("too_many_stops", {"model": "base", "messages": HELLO, "stop": list("abcdefgh")}, None),
    ("tools_unsupported", {"model": "base", "messages": HELLO, "tools": [{"type": "function",
                                                                        "function": {"name": "f"}}]}, None),
    ("logit_bias_not_a_token", {"model": "base", "messages": HELLO, "logit_bias": {"word": 5}}, None),
]


def rss_mb(pid: int) -> float:
    """Resident set size of process `pid` in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def make_adapter_dir(base: str, count: int, directory: Path, distinct: int = 8, seed: int = 0) -> list[str]:
    """`count` adapters in `directory` (adapter0...): `distinct` random ones (r=16 on q,k,v,o), the rest links to them
    under their own names (each name is loaded, evicted and reloaded on its own, as a distinct adapter would be)."""
    import gc

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serve import make_random_adapters

    from lorakit.models import load_base_model

    model, _ = load_base_model(base)
    real = make_random_adapters(model, min(count, distinct), directory, seed)
    del model
    gc.collect()
    names = list(real)
    for i in range(len(real), count):
        name = f"adapter{i}"
        os.symlink(directory / real[i % len(real)], directory / name)
        names.append(name)
    return names


class ServerProcess:
    """`lorakit serve` in a child process on a free loopback port."""

    def __init__(self, args: list[str], log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        command = [sys.executable, "-m", "lorakit", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--log-level", "warning", *args]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the server did not start in time")

    def rss_mb(self) -> float:
        return rss_mb(self.process.pid)

    def stop(self) -> int:
        self.process.terminate()
        try:
            code = self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.log.close()
        return code


def metric_total(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


async def adapter_counters(client) -> dict:
    text = (await client.get("/metrics")).text
    return {"loads": metric_total(text, "lorakit_adapter_loads_total"),
            "evictions": metric_total(text, "lorakit_adapter_evictions_total")}


def is_openai_error(status: int, content: bytes) -> bool:
    try:
        body = json.loads(content)
    except ValueError:
        return False
    error = body.get("error") if isinstance(body, dict) else None
    return (400 <= status < 600 and set(body) == {"error"} and isinstance(error, dict)
            and set(error) == {"message", "type", "param", "code"} and bool(error["message"]))


class Tally:
    """What one phase saw."""

    def __init__(self):
        self.status = {"2xx": 0, "4xx": 0, "5xx": 0}
        self.bad_sent = 0
        self.bad_answered_2xx: list[str] = []
        self.bad_without_error_object: list[str] = []
        self.good_answered_4xx: list[str] = []
        self.failures: list[str] = []  # connection errors, timeouts (hung requests), error events in streams
        self.hangups = 0
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.tokens = 0
        self.kinds: dict[str, int] = {}

    def count(self, status: int) -> None:
        self.status[f"{status // 100}xx"] = self.status.get(f"{status // 100}xx", 0) + 1


def good_request(rng: random.Random, models: list[str], prompts: list[str], max_tokens: int,
                 hangup: float) -> tuple[str, dict, Optional[int], str]:
    """(path, body, hang up after this many events or None, kind) of a well-formed request."""
    chat, stream, greedy = rng.random() < 0.5, rng.random() < 0.5, rng.random() < 0.5
    body = {"model": rng.choice(models), "max_tokens": rng.randint(max(1, max_tokens // 4), max_tokens),
            "temperature": 0 if greedy else 0.8}
    if not greedy:
        body.update(top_p=0.95, seed=rng.randrange(1 << 30))
    prompt = rng.choice(prompts)
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = f"Question: {prompt}\nAnswer:"
    cut = None
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
        if rng.random() < hangup:
            cut = rng.randint(1, 4)
    kind = f"{'chat' if chat else 'completions'}/{'stream' if stream else 'json'}/{'greedy' if greedy else 'sampled'}"
    return ("/v1/chat/completions" if chat else "/v1/completions"), body, cut, kind


async def send_good(client, tally: Tally, path: str, body: dict, cut: Optional[int]) -> None:
    import httpx

    start = time.perf_counter()
    if not body.get("stream"):
        r = await client.post(path, json=body)
        tally.count(r.status_code)
        if r.status_code != 200:
            tally.good_answered_4xx.append(f"{r.status_code} {r.text[:200]}")
            return
        tally.latencies.append(time.perf_counter() - start)
        tally.tokens += r.json()["usage"]["completion_tokens"]
        return
    events, first = 0, None
    async with client.stream("POST", path, json=body) as r:
        tally.count(r.status_code)
        if r.status_code != 200:
            tally.good_answered_4xx.append(f"{r.status_code} {(await r.aread())[:200]!r}")
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                tally.latencies.append(time.perf_counter() - start)
                return
            chunk = json.loads(data)
            if "error" in chunk:
                tally.failures.append(f"error event in a stream: {data[:200]}")
                return
            if chunk.get("usage") and not chunk["choices"]:
                tally.tokens += chunk["usage"]["completion_tokens"]
            text = "".join(c.get("text") or (c.get("delta") or {}).get("content") or "" for c in chunk["choices"])
            if text and first is None:
                first = time.perf_counter() - start
                tally.ttfts.append(first)
            events += 1
            if cut is not None and events >= cut:
                tally.hangups += 1
                return  # leaving the block closes the connection mid-stream
        tally.failures.append("a stream that ended without [DONE]")


async def send_bad(client, tally: Tally, rng: random.Random) -> None:
    name, body, how = rng.choice(BAD_REQUESTS)
    path = "/v1/completions" if how == "completions" or (isinstance(body, dict) and "prompt" in body) \
        else "/v1/chat/completions"
    if isinstance(body, dict):
        r = await client.post(path, json=body)
    else:
        r = await client.post(path, content=body.encode() if isinstance(body, str) else body,
                              headers={"Content-Type": how})
    tally.bad_sent += 1
    tally.count(r.status_code)
    if r.status_code < 400:
        tally.bad_answered_2xx.append(f"{name}: {r.status_code}")
    elif not is_openai_error(r.status_code, r.content):
        tally.bad_without_error_object.append(f"{name}: {r.status_code} {r.text[:200]}")


async def run_phase(url: str, clients: int, per_client: int, models: list[str], prompts: list[str],
                    args, seed: int) -> Tally:
    import httpx

    tally = Tally()
    deadline = time.monotonic() + args.max_seconds

    async def client_loop(index: int, client) -> None:
        rng = random.Random(seed * 1000 + index)
        for _ in range(per_client):
            if time.monotonic() > deadline:
                return
            try:
                if rng.random() < args.bad:
                    await send_bad(client, tally, rng)
                    continue
                path, body, cut, kind = good_request(rng, models, prompts, args.max_tokens, args.hangup)
                tally.kinds[kind] = tally.kinds.get(kind, 0) + 1
                await send_good(client, tally, path, body, cut)
            except httpx.TimeoutException:
                tally.failures.append(f"no answer within {args.timeout:g} s (hung)")
            except httpx.HTTPError as exc:
                tally.failures.append(f"{type(exc).__name__}: {exc}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
    return tally


def percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 3)


async def probe(url: str, model: str) -> str:
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 24,
            "temperature": 0}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        r = await client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]


async def warm_up(url: str, models: list[str]) -> None:
    """Every adapter once, each kind of request once: buffers, caches and code paths exist before RSS is taken."""
    import httpx

    tally, rng = Tally(), random.Random(7)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for i, model in enumerate(models):
            path, body, _, _ = good_request(rng, [model], ["Say hello."], 8, 0.0)
            await send_good(client, tally, path, body, None)
        for chat in (True, False):
            for stream in (True, False):
                body = {"model": models[0], "max_tokens": 8, "stream": stream}
                body.update({"messages": HELLO} if chat else {"prompt": "hi"})
                await send_good(client, tally, "/v1/chat/completions" if chat else "/v1/completions", body, None)
    if tally.failures or tally.good_answered_4xx:
        raise RuntimeError(f"warm-up failed: {tally.failures or tally.good_answered_4xx}")


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2")
    p.add_argument("--clients", default="16,64", help="client counts, one phase each (comma-separated)")
    p.add_argument("--requests-per-client", type=int, default=6)
    p.add_argument("--adapters", type=int, default=8, help="adapters the requests are spread over")
    p.add_argument("--max-adapters", type=int, default=4, help="the server's slots: fewer than --adapters")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=24, help="most tokens a request asks for")
    p.add_argument("--bad", type=float, default=0.2, help="share of malformed requests")
    p.add_argument("--hangup", type=float, default=0.33, help="share of streams the client cuts mid-way")
    p.add_argument("--max-seconds", type=float, default=240, help="a phase takes no new request after this")
    p.add_argument("--timeout", type=float, default=300, help="a request unanswered this long counts as hung")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    client_counts = [int(c) for c in str(args.clients).split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="lorakit-load-"))
    try:
        names = make_adapter_dir(args.base, args.adapters, tmp / "adapters", seed=args.seed)
        prompts = [json.loads(line)["query"] for line in EVAL.read_text().splitlines() if line.strip()]
        server = ServerProcess(["--base", args.base, "--served-model-name", "base", "--adapter-dir",
                                str(tmp / "adapters"), "--max-adapters", str(args.max_adapters),
                                "--max-batch-size", str(args.max_batch_size)], tmp / "server.log")
        try:
            server.wait_ready()
            started_mb = server.rss_mb()
            asyncio.run(warm_up(server.url, ["base"] + names))
            before = asyncio.run(probe(server.url, names[0]))
            warm_mb = server.rss_mb()
            phases = []
            for n, clients in enumerate(client_counts):
                counters = asyncio.run(_counters(server.url))
                start = time.perf_counter()
                tally = asyncio.run(run_phase(server.url, clients, args.requests_per_client, ["base"] + names,
                                              prompts, args, args.seed + n))
                wall = time.perf_counter() - start
                after_counters = asyncio.run(_counters(server.url))
                phases.append(phase_report(clients, tally, wall, counters, after_counters, warm_mb, server.rss_mb()))
                print(json.dumps(phases[-1]), file=sys.stderr, flush=True)
            after = asyncio.run(probe(server.url, names[0]))
            final_mb = server.rss_mb()
        finally:
            exit_code = server.stop()
        log = (tmp / "server.log").read_text()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    growth = (final_mb - warm_mb) / warm_mb
    result = {
        "benchmark": "load",
        "setup": {"base": args.base, "adapters": args.adapters, "max_adapters": args.max_adapters,
                  "max_batch_size": args.max_batch_size, "requests_per_client": args.requests_per_client,
                  "max_tokens": args.max_tokens, "bad_share": args.bad, "hangup_share_of_streams": args.hangup,
                  "bad_kinds": len(BAD_REQUESTS), "max_seconds_per_phase": args.max_seconds,
                  "cpu_count": os.cpu_count()},
        "phases": phases,
        "rss_mb": {"started": round(started_mb), "after_warm_up": round(warm_mb), "end": round(final_mb),
                   "growth_after_warm_up": round(growth, 4)},
        "probe": {"before": before, "after": after, "same": before == after},
        "server_exit_code": exit_code,
        "server_log_errors": [line for line in log.splitlines() if "Traceback" in line or " ERROR " in line][:10],
    }
    result["ok"] = (all(ph["status"]["5xx"] == 0 and not ph["bad_answered_2xx"] and not ph["failures"]
                        and not ph["good_answered_4xx"] and not ph["bad_without_error_object"] for ph in phases)
                    and growth < 0.15 and result["probe"]["same"] and not result["server_log_errors"])
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result


async def _counters(url: str) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await adapter_counters(client)


def phase_report(clients: int, tally: Tally, wall: float, before: dict, after: dict, warm_mb: float,
                 rss_after: float) -> dict:
    return {
        "clients": clients,
        "requests": sum(tally.status.values()),
        "status": tally.status,
        "bad_sent": tally.bad_sent,
        "bad_answered_2xx": tally.bad_answered_2xx,
        "bad_without_error_object": tally.bad_without_error_object,
        "good_answered_4xx": tally.good_answered_4xx[:10],
        "failures": tally.failures[:10],
        "hangups": tally.hangups,
        "kinds": dict(sorted(tally.kinds.items())),
        "seconds": round(wall, 1),
        "latency_s": {"p50": percentile(tally.latencies, 0.5), "p99": percentile(tally.latencies, 0.99),
                      "complete_answers": len(tally.latencies)},
        "ttft_s": {"p50": percentile(tally.ttfts, 0.5), "p99": percentile(tally.ttfts, 0.99),
                   "streams": len(tally.ttfts)},
        "generated_tokens": tally.tokens,
        "tokens_per_s": round(tally.tokens / wall, 1),
        "adapter_loads": int(after["loads"] - before["loads"]),
        "adapter_evictions": int(after["evictions"] - before["evictions"]),
        "rss_mb_after": round(rss_after),
        "rss_growth_after_warm_up": round((rss_after - warm_mb) / warm_mb, 4),
    }


if __name__ == "__main__":
    main()
