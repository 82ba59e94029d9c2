"""Fuzzing the server's API: generated requests to every endpoint of its own /openapi.json.

    python benchmarks/fuzz.py [--base smollm2|DIR] [--examples 500] [--max-seconds 900] [--out FILE]

A real `lorakit serve` app (uvicorn on a loopback port, in this process) with random adapters in an
--adapter-dir and fewer --max-adapters than adapters. For every operation of the app's OpenAPI document,
schemathesis generates requests that fit the schema (positive) and requests that break it (negative:
wrong types, missing fields, values out of range); Hypothesis drives the search and shrinks a failure to
its smallest form. Half of the generated bodies name a model the server has, so they reach generation.
Raw bodies that are not JSON, or JSON that is not an object, or JSON sent with another Content-Type go to
every POST endpoint too.

Every answer must be a 2xx, or a 4xx whose body is an OpenAI-style error object {"error": {message, type,
param, code}}; never a 5xx, never a request that hangs (no answer within --timeout seconds); a streamed
answer must end with [DONE] and carry no server_error event. Afterwards the server must still serve: the
same greedy probe answer as before, /health ok. Prints JSON: bodies sent per endpoint, by status class.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
GENERATING = ("/v1/completions", "/v1/chat/completions")
ADAPTER_CALLS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
ERROR_FIELDS = {"message", "type", "param", "code"}


class Failure(AssertionError):
    """An answer the server must never give (Hypothesis shrinks the request that caused it)."""


def check_answer(status: int, headers, content: bytes) -> str:
    """The answer's status class ('2xx', '4xx'), or a Failure saying what is wrong with it."""
    if status >= 500:
        raise Failure(f"server error {status}: {content[:500]!r}")
    if status >= 400:
        try:
            body = json.loads(content)
        except ValueError:
            raise Failure(f"{status} without a JSON body: {content[:200]!r}") from None
        error = body.get("error") if isinstance(body, dict) else None
        if set(body) != {"error"} or not isinstance(error, dict) or set(error) != ERROR_FIELDS \
                or not isinstance(error["message"], str) or not error["message"]:
            raise Failure(f"{status} whose body is not an OpenAI-style error object: {content[:300]!r}")
        return "4xx"
    if status < 200 or status >= 300:
        raise Failure(f"unexpected status {status}")
    if headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[len("data: "):] for line in content.decode().split("\n") if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            raise Failure(f"a stream that does not end with [DONE]: {content[-300:]!r}")
        for event in events[:-1]:
            chunk = json.loads(event)
            if "error" in chunk and chunk["error"].get("type") == "server_error":
                raise Failure(f"a stream that ended with a server error: {event[:300]}")
    elif headers.get("content-type", "").startswith("application/json"):
        json.loads(content)
    return "2xx"


def fuzz(url: str, models: list[str], adapter_paths: list[str], examples: int, headers: Optional[dict] = None,
         timeout: float = 60.0, max_seconds: float = 600.0) -> dict:
    """Run the fuzz against a live server; returns counts per endpoint. Raises Failure (shrunk) on a bad answer."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    headers = dict(headers or {})
    spec = requests.get(url + "/openapi.json", timeout=timeout).json()
    schema = schemathesis.openapi.from_dict(spec)
    counts: dict[str, Counter] = defaultdict(Counter)
    codes: Counter = Counter()  # the 4xx answers by status and error code
    deadline = time.monotonic() + max_seconds
    session = requests.Session()

    def send(label: str, method: str, path: str, **kwargs) -> None:
        try:
            r = session.request(method, url + path, headers={**headers, **kwargs.pop("headers", {})},
                                timeout=timeout, **kwargs)
        except requests.Timeout:
            raise Failure(f"{method} {path}: no answer within {timeout:g} s (a hung request)") from None
        counts[label][check_answer(r.status_code, r.headers, r.content)] += 1
        if r.status_code >= 400:
            codes[f"{r.status_code} {r.json()['error']['code']}"] += 1

    def steer(path: str, body: Any, data) -> Any:
        """Point most bodies at things the server has: a valid request with some of the generated fields on top,
        so that generated values get past 'no such model' and into generation and adapter loading."""
        if not isinstance(body, dict) or path not in GENERATING + ADAPTER_CALLS \
                or data.draw(st.integers(0, 3), label="steer") == 3:  # the simplest draw, 0, steers
            return body
        keep = data.draw(st.sets(st.sampled_from(sorted(body))), label="keep") if body else set()
        if path in GENERATING:
            valid = {"model": data.draw(st.sampled_from(models), label="model"), "max_tokens": 4}
            valid.update({"prompt": "Hello"} if path == GENERATING[0] else
                         {"messages": [{"role": "user", "content": "Hello"}]})
        else:
            valid = {"lora_name": data.draw(st.sampled_from(["fz-a", "fz-b"] + models[1:]), label="name"),
                     "lora_path": data.draw(st.sampled_from(adapter_paths), label="path")}
        return {**valid, **{k: body[k] for k in keep}}

    raw_bodies = st.one_of(st.binary(max_size=64),
                           st.sampled_from([b"", b"null", b"[]", b"42", b'"text"', b"{", b'{"model": NaN}',
                                            b'{"model": "x", "temperature": Infinity}', b"\xff\xfe"]))
    content_types = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""])
    operations = [op.ok() for op in schema.get_all_operations()]
    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"
        cases = st.one_of(operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                          operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))

        @settings(max_examples=examples, database=None, derandomize=True, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=cases, data=st.data())
        def one(case, data):
            kwargs = case.as_transport_kwargs(base_url=url)
            if "json" in kwargs:  # sent as text: lone surrogates and NaN go out as Python's json writes them
                kwargs["data"] = json.dumps(steer(operation.path, kwargs.pop("json"), data)).encode()
                kwargs["headers"] = {**kwargs.get("headers", {}), "Content-Type": "application/json"}
            if time.monotonic() > deadline:  # after the draws: Hypothesis needs a case to draw the same each time
                return
            kwargs["headers"] = {k: v for k, v in kwargs.get("headers", {}).items() if k.lower() != "authorization"}
            send(label, kwargs.pop("method"), kwargs.pop("url")[len(url):], **kwargs)

        one()
        if operation.method.lower() == "post":  # bodies that are not JSON objects, or not declared as JSON
            @settings(max_examples=max(examples // 4, 1), database=None, derandomize=True, deadline=None,
                      suppress_health_check=list(HealthCheck))
            @given(content=raw_bodies, content_type=content_types)
            def raw(content, content_type):
                if time.monotonic() > deadline:
                    return
                send(label, "POST", operation.path, data=content,
                     headers={"Content-Type": content_type} if content_type else {})

            raw()
    return {"bodies": sum(sum(c.values()) for c in counts.values()),
            "by_endpoint": {label: dict(c) for label, c in sorted(counts.items())},
            "errors_by_code": dict(codes.most_common()), "operations": len(operations),
            "stopped_by_time": time.monotonic() > deadline}


def greedy_probe(url: str, model: str, headers: Optional[dict] = None, max_tokens: int = 16) -> str:
    import requests

    body = {"model": model, "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": max_tokens,
            "temperature": 0}
    r = requests.post(url + "/v1/chat/completions", json=body, headers=headers or {}, timeout=300)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2", help="'smollm2' (embedded), a model directory")
    p.add_argument("--adapters", type=int, default=4, help="random adapters in the --adapter-dir")
    p.add_argument("--max-adapters", type=int, default=2)
    p.add_argument("--max-model-len", type=int, default=96, help="small, so generated bodies generate little")
    p.add_argument("--examples", type=int, default=500, help="generated requests per operation (and a quarter "
                   "as many raw bodies per POST operation)")
    p.add_argument("--max-seconds", type=float, default=900, help="stop generating after this long")
    p.add_argument("--timeout", type=float, default=120, help="an answer later than this is a hung request")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serve import make_random_adapters

    from lorakit.models import load_base_model
    from lorakit.serve import ServerThread
    from lorakit.serve.app import create_app
    from lorakit.serve.engine import Engine, EngineConfig
    from lorakit.serve.metrics import ServerMetrics

    base, tokenizer = load_base_model(args.base)
    with tempfile.TemporaryDirectory(prefix="lorakit-fuzz-") as tmp:
        names = make_random_adapters(base, args.adapters, Path(tmp))
        metrics = ServerMetrics(4)
        config = EngineConfig(max_batch_size=4, max_model_len=args.max_model_len, max_adapters=args.max_adapters)
        engine = Engine(base, tokenizer, config, base_name="base", adapter_dirs=[tmp], metrics=metrics)
        with ServerThread(create_app(engine, metrics)) as server:
            before = greedy_probe(server.url, names[0])
            start = time.perf_counter()
            failure = None
            try:
                report = fuzz(server.url, ["base"] + names, names, args.examples, timeout=args.timeout,
                              max_seconds=args.max_seconds)
            except Failure as exc:  # Hypothesis has shrunk it: report the smallest request that fails
                report, failure = {}, str(exc)
            seconds = time.perf_counter() - start
            after = greedy_probe(server.url, names[0])
            health = server_health(server.url)
    result = {"benchmark": "fuzz", "base": args.base, "examples_per_operation": args.examples, **report,
              "failure": failure, "seconds": round(seconds, 1), "probe_same_after": before == after,
              "health_after": health, "adapter_loads": engine.registry.loads,
              "adapter_evictions": engine.registry.evictions,
              "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result


def server_health(url: str) -> str:
    import requests

    return requests.get(url + "/health", timeout=30).json().get("status", "?")


if __name__ == "__main__":
    main()
