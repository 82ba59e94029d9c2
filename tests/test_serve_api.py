"""The HTTP server on a loopback port: the official `openai` client for the happy paths, raw httpx for
error bodies, auth, SSE framing, disconnects, adapter loading and metrics."""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import os
import re
import shutil
import subprocess
import threading
import time

import httpx
import openai
import pytest
import torch

from lorakit import PeftModel
from lorakit.serve import ServerThread, add_serve_arguments, build_server
from test_serve_helpers import (chat_ids, offline_ids, offline_text, save_base, save_random_adapter, slowed,
                                tiny_model, tiny_tokenizer)

KEY = "test-key-123"
BASE = "tiny-base"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tok = tiny_tokenizer()
    base = tiny_model(tok)
    save_base(base, tok, root / "base")
    adapters = root / "adapters"
    for i, name in enumerate(["a", "b", "c"]):
        save_random_adapter(base, adapters / name, seed=i + 1)
    # An adapter made for a different base (hidden size 32 instead of 64).
    save_random_adapter(tiny_model(tok, hidden=32), adapters / "otherbase", seed=9)
    outside = root / "outside"
    save_random_adapter(base, outside / "x", seed=5)
    os.symlink(outside / "x", adapters / "linkout")
    # An adapter whose weights file is a link to a file outside the adapter directory.
    (adapters / "filelink").mkdir()
    os.symlink(outside / "x" / "adapter_config.json", adapters / "filelink" / "adapter_config.json")
    os.symlink(outside / "x" / "adapter_model.safetensors", adapters / "filelink" / "adapter_model.safetensors")

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--base", str(root / "base"), "--served-model-name", BASE,
                              "--adapter", f"a={adapters / 'a'}", "--adapter-dir", str(adapters),
                              "--max-adapters", "3", "--max-batch-size", "4", "--max-model-len", "512",
                              "--api-key", KEY, "--decode-precision", "fp32"])  # offline generate's weights
    server = ServerThread(build_server(args)).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    yield {"server": server, "client": client, "http": http, "tok": tok, "base": base, "adapters": adapters,
           "outside": outside}
    http.close()
    server.stop()
    assert not server.thread.is_alive()


def metric(env, name: str, required: bool = True, **labels) -> float:
    """Sum of a Prometheus sample (matching the given labels) from /metrics."""
    text = env["http"].get("/metrics").text
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(r"^(\w+)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
            found = True
    assert found or not required, f"{name}{labels} not in /metrics"
    return total


def assert_error(response, status: int, param=None, code=None, match=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    if match is not None:
        assert re.search(match, body["error"]["message"]), body["error"]["message"]
    return body["error"]


# -- happy paths with the openai client -----------------------------------------------------------------

def test_model_list(env):
    models = env["client"].models.list()
    ids = [m.id for m in models.data]
    assert ids[0] == BASE
    assert {"a", "b", "c"} <= set(ids)
    assert "linkout" not in ids and "filelink" not in ids  # links to outside are not offered
    assert env["client"].models.retrieve("b").id == "b"


def test_completion_greedy_matches_offline_for_base_and_adapters(env):
    tok, base, adapters = env["tok"], env["base"], env["adapters"]
    prompt = "The weather today"
    ids = tok(prompt)["input_ids"]
    for model, adapter_dir in [(BASE, None), ("a", adapters / "a"), ("b", adapters / "b")]:
        r = env["client"].completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
        assert r.choices[0].text == offline_text(base, tok, ids, adapter_dir, 16)
        assert r.model == model and r.object == "text_completion"
        assert r.usage.prompt_tokens == len(ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.choices[0].finish_reason in ("stop", "length")


def test_concurrent_mixed_adapter_requests_each_match_offline(env):
    tok, base, adapters = env["tok"], env["base"], env["adapters"]
    before = metric(env, "lorakit_batch_size_count") - metric(env, "lorakit_batch_size_bucket", le="2.0")
    jobs = [("a", "Hello there, how"), ("b", "Once upon a time"), ("c", "Numbers: 1 2 3"), (BASE, "abc def ghi")]

    def ask(job):
        model, prompt = job
        r = env["client"].completions.create(model=model, prompt=prompt, max_tokens=60, temperature=0,
                                             extra_body={"ignore_eos": True})
        return r.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(ask, jobs))
    for (model, prompt), text in zip(jobs, texts):
        # ignore_eos: compare with the offline tokens up to the first EOS (the server keeps going after it).
        expected = offline_text(base, tok, tok(prompt)["input_ids"], None if model == BASE else adapters / model, 60)
        assert text.startswith(expected) and len(expected) > 0
    batched = metric(env, "lorakit_batch_size_count") - metric(env, "lorakit_batch_size_bucket", le="2.0")
    assert batched - before > 10  # many decode steps ran 3-4 different models in one forward


def test_chat_completion_and_streaming(env):
    tok, base, adapters = env["tok"], env["base"], env["adapters"]
    messages = [{"role": "user", "content": "What is LoRA?"}]
    expected = offline_text(base, tok, chat_ids(tok, "What is LoRA?"), adapters / "b", 20)
    r = env["client"].chat.completions.create(model="b", messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.object == "chat.completion" and r.usage.prompt_tokens == len(chat_ids(tok, "What is LoRA?"))

    stream = env["client"].chat.completions.create(model="b", messages=messages, max_tokens=20, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def offline_logprobs(base, prompt_ids: list[int], out_ids: list[int], adapter_dir=None) -> torch.Tensor:
    """log_softmax of the model's logits at each generated position: [len(out_ids), vocab]."""
    model = copy.deepcopy(base)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + out_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(out_ids)]


def test_completion_logprobs_are_the_models(env):
    tok, base, adapters = env["tok"], env["base"], env["adapters"]
    ids = tok("The weather today")["input_ids"]
    for model, adapter_dir in [(BASE, None), ("a", adapters / "a")]:
        r = env["client"].completions.create(model=model, prompt="The weather today", max_tokens=12,
                                             temperature=0, logprobs=3, extra_body={"ignore_eos": True})
        lp = r.choices[0].logprobs
        out_ids = offline_ids(base, tok, ids, adapter_dir, 12)
        assert len(out_ids) == 12  # no early end: every token is content
        expected = offline_logprobs(base, ids, out_ids, adapter_dir)
        # ignore_eos: special tokens are generated like any other; their text is in tokens, not in the text
        assert lp.tokens == [tok.decode([i]) for i in out_ids]
        special = set(tok.all_special_ids)
        assert "".join(t for t, i in zip(lp.tokens, out_ids) if i not in special) == r.choices[0].text
        assert lp.token_logprobs == pytest.approx(expected[torch.arange(12), out_ids].tolist(), abs=1e-4)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(12)]
        for step, top in enumerate(lp.top_logprobs):
            best = expected[step].topk(3)
            assert list(top) == [tok.decode([i]) for i in best.indices.tolist()]
            assert list(top.values()) == pytest.approx(best.values.tolist(), abs=1e-4)
            assert list(top.values())[0] == pytest.approx(lp.token_logprobs[step], abs=1e-6)  # greedy: the best
    stream = env["client"].completions.create(model="a", prompt="The weather today", max_tokens=12, temperature=0,
                                              logprobs=3, stream=True, extra_body={"ignore_eos": True})
    parts = [c.choices[0].logprobs for c in stream if c.choices[0].logprobs is not None]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [o for p in parts for o in p.text_offset] == lp.text_offset  # offsets run on across chunks
    assert [v for p in parts for v in p.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-5)
    sampled = env["client"].completions.create(model="a", prompt="The weather today", max_tokens=8, temperature=1.5,
                                               seed=7, logprobs=0, extra_body={"ignore_eos": True})
    lp = sampled.choices[0].logprobs
    id_of = {tok.decode([i]): i for i in range(len(tok))}  # one id per text in this tokenizer
    out_ids = [id_of[t] for t in lp.tokens]
    expected = offline_logprobs(base, ids, out_ids, adapters / "a")  # the model's, not the tempered ones
    assert lp.token_logprobs == pytest.approx(expected[torch.arange(len(out_ids)), out_ids].tolist(), abs=1e-4)
    assert lp.top_logprobs == [{}] * len(out_ids)
    plain = env["client"].completions.create(model="a", prompt="The weather today", max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_echo_gives_the_prompt_and_its_log_probabilities(env):
    """Scoring a text without generating (echo, logprobs, max_tokens 0), and echo with a completion."""
    tok, base, adapters = env["tok"], env["base"], env["adapters"]
    prompt = "The weather today is sunny"
    ids = tok(prompt)["input_ids"]
    scored = env["client"].completions.create(model="a", prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                              temperature=0)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
    assert lp.tokens == [tok.decode([i]) for i in ids]
    expected = offline_logprobs(base, ids[:1], ids[1:], adapters / "a")  # token j given tokens before it
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected[torch.arange(len(ids) - 1), ids[1:]].tolist(), abs=1e-4)
    assert [list(top) for top in lp.top_logprobs[1:]] == [[tok.decode([int(row.argmax())])] for row in expected]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]

    both = env["client"].completions.create(model="a", prompt=prompt, max_tokens=5, echo=True, logprobs=2,
                                            temperature=0, extra_body={"ignore_eos": True})
    out_ids = offline_ids(base, tok, ids, adapters / "a", 5)
    assert both.choices[0].text == prompt + tok.decode(out_ids)
    assert both.choices[0].logprobs.tokens == [tok.decode([i]) for i in ids + out_ids]
    assert both.choices[0].logprobs.token_logprobs[:len(ids)] == pytest.approx(lp.token_logprobs, abs=1e-5)
    stream = env["client"].completions.create(model="a", prompt=prompt, max_tokens=5, echo=True, logprobs=2,
                                              temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = [c.choices[0] for c in stream]
    assert chunks[0].text == prompt and "".join(c.text for c in chunks) == both.choices[0].text
    parts = [c.logprobs for c in chunks if c.logprobs is not None]
    assert [t for p in parts for t in p.tokens] == both.choices[0].logprobs.tokens
    assert [o for p in parts for o in p.text_offset] == both.choices[0].logprobs.text_offset

    plain = env["client"].completions.create(model=BASE, prompt=ids, max_tokens=4, echo=True, temperature=0)
    assert plain.choices[0].text == tok.decode(ids) + offline_text(base, tok, ids, None, 4)
    assert plain.choices[0].logprobs is None


def test_chat_logprobs_streamed_and_not(env):
    tok, base, adapters = env["tok"], env["base"], env["adapters"]
    messages = [{"role": "user", "content": "What is LoRA?"}]
    ask = dict(model="b", messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    r = env["client"].chat.completions.create(**ask)
    content = r.choices[0].logprobs.content
    prompt_ids = chat_ids(tok, "What is LoRA?")
    out_ids = offline_ids(base, tok, prompt_ids, adapters / "b", 10)
    out_ids = out_ids[:out_ids.index(tok.eos_token_id)] if tok.eos_token_id in out_ids else out_ids
    expected = offline_logprobs(base, prompt_ids, out_ids, adapters / "b")
    assert [c.token for c in content] == [tok.decode([i]) for i in out_ids]  # the end token is not content
    assert "".join(c.token for c in content) == r.choices[0].message.content
    assert [c.logprob for c in content] == pytest.approx(expected[torch.arange(len(out_ids)), out_ids].tolist(),
                                                         abs=1e-4)
    assert all(c.bytes == list(c.token.encode()) and len(c.top_logprobs) == 2 for c in content)
    assert [c.top_logprobs[0].token for c in content] == [c.token for c in content]

    chunks = list(env["client"].chat.completions.create(**ask, stream=True))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [(c.token, c.bytes, [t.token for t in c.top_logprobs]) for c in streamed] == \
        [(c.token, c.bytes, [t.token for t in c.top_logprobs]) for c in content]
    # the same within float noise (the second request reuses the first one's prompt K/V from the prefix cache)
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-5)
    plain = env["client"].chat.completions.create(model="b", messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_completion_streaming_and_raw_sse_format(env):
    tok, base, adapters = env["tok"], env["base"], env["adapters"]
    expected = offline_text(base, tok, tok("Once upon a time")["input_ids"], adapters / "c", 24)
    stream = env["client"].completions.create(model="c", prompt="Once upon a time", max_tokens=24, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected

    body = {"model": "c", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "stream": True}
    with env["http"].stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert "".join(p["choices"][0]["text"] for p in payloads) == expected
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(p["choices"][0]["finish_reason"] is None for p in payloads[:-1])
    assert set(payloads[0]) >= {"id", "object", "created", "model", "choices"}


def test_stop_sequences_trim_output(env):
    tok, base, adapters = env["tok"], env["base"], env["adapters"]
    full = offline_text(base, tok, tok("The weather today")["input_ids"], adapters / "a", 30)
    stop = full[5:8]
    assert full.find(stop) == 5
    r = env["client"].completions.create(model="a", prompt="The weather today", max_tokens=30, temperature=0,
                                         stop=[stop, "never-appears"])
    assert r.choices[0].text == full[:5] and r.choices[0].finish_reason == "stop"
    stream = env["client"].completions.create(model="a", prompt="The weather today", max_tokens=30, temperature=0,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in stream) == full[:5]


def test_seed_reproducible_n_choices_and_length(env):
    client = env["client"]
    kwargs = dict(model="a", prompt="Hello there, how", max_tokens=20, temperature=1.0, top_p=0.95,
                  extra_body={"ignore_eos": True})
    first = client.completions.create(seed=7, **kwargs).choices[0].text
    again = client.completions.create(seed=7, **kwargs).choices[0].text
    other = client.completions.create(seed=8, **kwargs).choices[0].text
    assert first == again and first != other
    r = client.completions.create(seed=7, n=2, **kwargs)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == first and r.choices[1].text == other  # choice i uses seed + i
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 40 and r.usage.prompt_tokens == len(env["tok"]("Hello there, how")["input_ids"])


def test_tiny_temperatures_are_greedy_not_a_server_error(env):
    http = env["http"]
    greedy = http.post("/v1/completions", json={"model": "a", "prompt": "The weather today", "max_tokens": 12,
                                                "temperature": 0}).json()["choices"][0]["text"]
    for temperature in (1e-40, 5e-324):
        r = http.post("/v1/completions", json={"model": "a", "prompt": "The weather today", "max_tokens": 12,
                                               "temperature": temperature, "seed": 3})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy


def test_prompt_tokens_count_every_prompt_once(env):
    hello = len(env["tok"]("Hello")["input_ids"])
    for n in (1, 2):
        r = env["http"].post("/v1/completions", json={"model": BASE, "prompt": ["Hello", "Hello"], "max_tokens": 1,
                                                      "n": n})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == 2 * hello  # two prompts; n copies do not add to it


def test_logit_bias_steers_tokens(env):
    client, tok = env["client"], env["tok"]
    z = tok.convert_tokens_to_ids("z")
    forced = client.completions.create(model="a", prompt="The weather today", max_tokens=5, temperature=0,
                                       logit_bias={str(z): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == "zzzzz"
    greedy = client.completions.create(model="a", prompt="The weather today", max_tokens=1, temperature=0)
    first = tok(greedy.choices[0].text)["input_ids"][0]
    banned = client.completions.create(model="a", prompt="The weather today", max_tokens=1, temperature=0,
                                       logit_bias={str(first): -100})
    assert banned.choices[0].text != greedy.choices[0].text
    chat = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0.7, seed=1, logit_bias={str(z): 100})
    assert chat.choices[0].message.content == "zzz"


def test_penalties_reach_the_sampler(env):
    client = env["client"]
    # A "z" forced by logit_bias repeats; a frequency penalty larger than the bias stops the repeats
    z = str(env["tok"].convert_tokens_to_ids("z"))
    free = {"max_tokens": 4, "temperature": 0, "extra_body": {"ignore_eos": True}}
    repeated = client.completions.create(model="a", prompt="The weather today", logit_bias={z: 50}, **free)
    assert repeated.choices[0].text == "zzzz"
    penalised = client.completions.create(model="a", prompt="The weather today", logit_bias={z: 50},
                                          frequency_penalty=2.0, **{**free, "extra_body": {"ignore_eos": True,
                                                                                         "repetition_penalty": 10.0}})
    assert penalised.choices[0].text.startswith("z") and penalised.choices[0].text != "zzzz"
    sampled = client.completions.create(model="a", prompt="The weather today", max_tokens=3, temperature=1.0,
                                        seed=3, extra_body={"top_k": 1})
    greedy = client.completions.create(model="a", prompt="The weather today", max_tokens=3, temperature=0)
    assert sampled.choices[0].text == greedy.choices[0].text  # top_k=1 is greedy at any temperature


@pytest.mark.parametrize("path,extra", [
    ("/v1/completions", {"logprobs": None, "echo": False, "logit_bias": {}, "response_format": {"type": "text"}}),
    ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 0, "tool_choice": "none", "logit_bias": {},
                              "response_format": {"type": "text"}}),
])
def test_default_values_of_unimplemented_parameters_are_accepted(env, path, extra):
    body = {"model": "a", "max_tokens": 2, "temperature": 0, **extra}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
    r = env["http"].post(path, json=body)
    assert r.status_code == 200, r.text


# -- errors ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,status,param,code", [
    ('{"model": "a", "prompt": "hi", ', 400, None, "invalid_json"),
    ('[1, 2]', 400, None, None),
    ('{"model": "a", "prompt": "hi", "max_tokens": "5"}', 400, "max_tokens", "invalid_type"),
    ('{"model": "a", "prompt": "hi", "temperature": "hot"}', 400, "temperature", "invalid_type"),
    ('{"model": "a", "prompt": "hi", "temperature": 3}', 400, "temperature", "invalid_value"),
    ('{"model": "a", "prompt": "hi", "temperature": 2.5}', 400, "temperature", "invalid_value"),
    ('{"model": "a", "prompt": "hi", "top_p": 0}', 400, "top_p", "invalid_value"),
    ('{"model": "a", "prompt": "hi", "n": 0}', 400, "n", "invalid_value"),
    ('{"model": "a", "prompt": "hi", "stream": "yes"}', 400, "stream", "invalid_type"),
    ('{"model": "a", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop", "invalid_value"),
    ('{"model": "a", "prompt": 42}', 400, "prompt", "invalid_type"),
    ('{"prompt": "hi"}', 400, "model", "missing_field"),
    ('{"model": "nope", "prompt": "hi"}', 404, "model", "model_not_found"),
    ('{"model": "a", "prompt": "hi", "max_tokens": 0}', 400, "max_tokens", "invalid_value"),
    ('{"model": "a", "prompt": "hi", "max_tokens": 100000}', 400, "max_tokens", "context_length_exceeded"),
    ('{"model": "a", "prompt": [1, 2, 99999]}', 400, "prompt", "invalid_value"),
    ('{"model": "a", "prompt": "hi", "logprobs": 21}', 400, "logprobs", "invalid_value"),
    ('{"model": "a", "prompt": "hi", "logprobs": -1}', 400, "logprobs", "invalid_value"),
    ('{"model": "a", "prompt": "hi", "response_format": {"type": "json_object"}}', 400, "response_format",
     "unsupported_parameter"),
    ('{"model": "a", "prompt": "hi", "response_format": "json"}', 400, "response_format", "invalid_type"),
    ('{"model": "a", "prompt": "hi", "logit_bias": {"abc": 5}}', 400, "logit_bias", "invalid_value"),
    ('{"model": "a", "prompt": "hi", "logit_bias": {"99999": 5}}', 400, "logit_bias", "invalid_value"),
    ('{"model": "a", "prompt": "hi", "logit_bias": {"5": 100.5}}', 400, "logit_bias", "invalid_value"),
    ('{"model": "a", "prompt": "hi", "logit_bias": {"5": "up"}}', 400, "logit_bias.5", "invalid_type"),
    ('{"model": "a", "prompt": "hi", "max_tokens": 0, "echo": false}', 400, "max_tokens", "invalid_value"),
    ('{"model": "a", "prompt": "hi", "max_tokens": -1, "echo": true}', 400, "max_tokens", "invalid_value"),
    ('{"model": "a", "prompt": "hi", "suffix": "end"}', 400, "suffix", "unsupported_parameter"),
    ('{"model": "a", "prompt": "hi", "best_of": 3}', 400, "best_of", "unsupported_parameter"),
    ('{"model": "a", "prompt": "hi", "frequency_penalty": 2.5}', 400, "frequency_penalty", "invalid_value"),
    ('{"model": "a", "prompt": "hi", "repetition_penalty": 0}', 400, "repetition_penalty", "invalid_value"),
    ('{"model": "a", "prompt": "hi", "top_k": -2}', 400, "top_k", "invalid_value"),
    ('{"model": "a", "prompt": "hi", "n": 17}', 400, "n", None),
    ('{"model": "a", "prompt": ["x", "y", "z", "w", "v"], "n": 16}', 400, "prompt", "invalid_value"),
    ('{"model": "a", "prompt": "' + "x" * (9 << 20) + '"}', 413, None, "body_too_large"),
])
def test_completion_errors(env, body, status, param, code):
    r = env["http"].post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert_error(r, status, param, code)


def test_chat_errors_and_prompt_too_long(env):
    http = env["http"]
    assert_error(http.post("/v1/chat/completions", json={"model": "a"}), 400, "messages", "missing_field")
    assert_error(http.post("/v1/chat/completions", json={"model": "a", "messages": [{"role": "robot",
                                                                                     "content": "x"}]}),
                 400, "messages.0.role", "invalid_value")
    assert_error(http.post("/v1/chat/completions", json={"model": "a", "messages": []}), 400, "messages",
                 "invalid_value")
    assert_error(http.post("/v1/chat/completions", json={"model": "a", "messages": "hi"}), 400, "messages",
                 "invalid_type")
    hello = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    assert_error(http.post("/v1/chat/completions", json={"model": "a", "messages": hello, "tools": [tool]}),
                 400, "tools", "unsupported_parameter", match="Tool calling")
    assert_error(http.post("/v1/chat/completions", json={"model": "a", "messages": hello, "top_logprobs": 2}),
                 400, "top_logprobs", "invalid_value", match="needs 'logprobs'")
    assert_error(http.post("/v1/chat/completions", json={"model": "a", "messages": hello, "logprobs": True,
                                                         "top_logprobs": 21}), 400, "top_logprobs", "invalid_value")
    for extra, param in [({"tool_choice": "required"}, "tool_choice"),
                         ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
                          "response_format")]:
        assert_error(http.post("/v1/chat/completions", json={"model": "a", "messages": hello, **extra}),
                     400, param, "unsupported_parameter")
    long = "word " * 200  # 1000 tokens > --max-model-len 512
    assert_error(http.post("/v1/chat/completions", json={"model": "a", "messages": [{"role": "user",
                                                                                     "content": long}]}),
                 400, "messages", "context_length_exceeded", match="maximum context length is 512")
    assert_error(http.post("/v1/completions", json={"model": "a", "prompt": long}), 400, "prompt",
                 "context_length_exceeded")
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get("/v1/completions"), 405)
    # ... and the server keeps serving everyone else.
    r = env["client"].chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_messages_need_content_and_a_known_role_as_in_openai(env):
    http, hi = env["http"], {"role": "user", "content": "hi"}
    for message, param, code in [({"role": "user"}, "messages.1.content", "missing_field"),
                                 ({"role": "system", "content": None}, "messages.1.content", "invalid_type"),
                                 ({"content": "hi"}, "messages.1.role", "missing_field"),
                                 ({"role": 5, "content": "hi"}, "messages.1.role", "invalid_value"),
                                 ({"role": "user", "content": [{"type": "image_url"}]}, "messages.1.content.0.type",
                                  "invalid_value"),
                                 ("hi", "messages.1", "invalid_type")]:
        r = http.post("/v1/chat/completions", json={"model": "a", "messages": [hi, message], "max_tokens": 1})
        assert_error(r, 400, param, code)
    # an assistant turn may leave its content out (OpenAI: when it called tools)
    r = http.post("/v1/chat/completions", json={"model": "a", "max_tokens": 1,
                                                "messages": [hi, {"role": "assistant"}, hi]})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
                                  "/v1/unload_lora_adapter"])
def test_bodies_that_are_not_json_objects_are_400s_in_openais_format(env, path):
    http = env["http"]
    json_type = {"Content-Type": "application/json"}
    assert_error(http.post(path, content="", headers=json_type), 400, code="missing_field", match="body is empty")
    assert_error(http.post(path, content="[1, 2]", headers=json_type), 400, code="invalid_type",
                 match="must be a JSON object, got an array")
    assert_error(http.post(path, content='{"model": ', headers=json_type), 400, code="invalid_json",
                 match="not valid JSON")
    assert_error(http.post(path, content=b'{"model": "\xff"}', headers=json_type), 400, code="invalid_json",
                 match="not UTF-8")
    # curl -d sends application/x-www-form-urlencoded: JSON is read only when declared (a web page cannot post
    # JSON to a server on loopback without the browser asking the server first)
    for headers in ({"Content-Type": "application/x-www-form-urlencoded"}, {"Content-Type": "text/plain"}):
        assert_error(http.post(path, content='{"model": "a", "prompt": "hi"}', headers=headers), 400,
                     code="invalid_content_type", match="Content-Type: application/json")


def test_openapi_describes_every_endpoint_with_its_body(env):
    r = httpx.get(env["server"].url + "/openapi.json", timeout=30)  # no key needed: it holds no data
    assert r.status_code == 200
    spec = r.json()
    bodies = {path: ops["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
              for path, ops in spec["paths"].items() if "post" in ops}
    assert bodies == {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest",
                      "/v1/load_lora_adapter": "LoadAdapterRequest", "/v1/unload_lora_adapter": "UnloadAdapterRequest"}
    assert {"/health", "/metrics", "/v1/models", "/v1/models/{model_id}"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert schemas["UserMessage"]["required"] == ["role", "content"]
    assert set(schemas["ChatCompletionRequest"]["required"]) == {"model", "messages"}
    assert schemas["CompletionRequest"]["properties"]["temperature"]["anyOf"][0] == {"type": "number", "minimum": 0.0,
                                                                                    "maximum": 2.0}


def test_unknown_model_error_through_openai_client(env):
    with pytest.raises(openai.NotFoundError) as info:
        env["client"].completions.create(model="missing-adapter", prompt="hi", max_tokens=2)
    assert "missing-adapter" in str(info.value)


def test_auth(env):
    url = env["server"].url
    with httpx.Client(base_url=url, timeout=30) as anon:
        assert anon.get("/health").status_code == 200
        assert anon.get("/playground").status_code == 200
        assert_error(anon.get("/v1/models"), 401, code="invalid_api_key")
        assert_error(anon.post("/v1/completions", json={"model": "a", "prompt": "hi"}), 401)
        assert_error(anon.get("/metrics"), 401)
        assert_error(anon.post("/v1/load_lora_adapter", json={"lora_name": "z", "lora_path": "a"}), 401)
        assert_error(anon.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(anon.get("/v1/models", headers={"Authorization": KEY}), 401)  # no "Bearer"
        assert anon.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_playground_page(env):
    r = httpx.get(env["server"].url + "/playground", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "lorakit playground" in r.text and "/v1/chat/completions" in r.text


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the playground's JavaScript")
def test_playground_leaves_out_empty_number_fields(env):
    page = env["http"].get("/playground").text
    function = re.search(r"^function requestBody\(.*?^}$", page, re.M | re.S)
    assert function, "the playground builds its request body in requestBody()"
    script = function.group(0) + """
const empty = {temperature: "", max_tokens: "", seed: "", prompt: "hi"};
const full = {temperature: "0.5", max_tokens: "64", seed: "3", prompt: "hi"};
console.log(JSON.stringify([requestBody("a", true, empty), requestBody("a", false, full)]));"""
    empty, full = json.loads(subprocess.run(["node", "-e", script], capture_output=True, text=True, check=True,
                                            timeout=30).stdout)
    assert not {"max_tokens", "temperature", "seed"} & set(empty) and empty["messages"][0]["content"] == "hi"
    assert (full["max_tokens"], full["temperature"], full["seed"], full["prompt"]) == (64, 0.5, 3, "hi")
    r = env["http"].post("/v1/chat/completions", json={**empty, "model": "a"})  # the server takes it as sent
    assert r.status_code == 200 and "data: [DONE]" in r.text


# -- adapters at run time --------------------------------------------------------------------------------

def test_load_and_unload_adapter(env):
    http, client, tok, base, adapters = env["http"], env["client"], env["tok"], env["base"], env["adapters"]
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "b-copy", "lora_path": "b"})
    assert r.status_code == 200, r.text
    assert "b-copy" in [m.id for m in client.models.list().data]
    out = client.completions.create(model="b-copy", prompt="abc def ghi", max_tokens=12, temperature=0)
    assert out.choices[0].text == offline_text(base, tok, tok("abc def ghi")["input_ids"], adapters / "b", 12)
    # Absolute paths inside the adapter directory work too.
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "c-abs",
                                                    "lora_path": str(adapters / "c")}).status_code == 200
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "c-abs"}).status_code == 200
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "b-copy"})
    assert r.status_code == 200, r.text
    assert_error(http.post("/v1/completions", json={"model": "b-copy", "prompt": "hi"}), 404,
                 code="model_not_found")
    assert_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "b-copy"}), 404)
    assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": "bad name!", "lora_path": "b"}), 400,
                 match="Invalid adapter name")
    assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": BASE, "lora_path": "b"}), 400)
    assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": "z"}), 400, "lora_path")


@pytest.mark.parametrize("path_of", [
    lambda env: str(env["outside"] / "x"),  # absolute, outside
    lambda env: "../outside/x",  # '..'
    lambda env: "b/../../outside/x",
    lambda env: "linkout",  # a symlink inside the dir that points outside
    lambda env: str(env["adapters"] / "linkout"),
    lambda env: "filelink",  # adapter files that are links to outside
    lambda env: "/etc",
])
def test_load_refuses_paths_outside_adapter_dirs(env, path_of):
    r = env["http"].post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": path_of(env)})
    assert_error(r, 403, "lora_path", "adapter_path_not_allowed")
    assert "evil" not in [m.id for m in env["client"].models.list().data]


def model_cards(env) -> dict:
    return {card["id"]: card for card in env["http"].get("/v1/models").json()["data"]}


def test_adapter_for_another_base_is_refused_with_the_mismatch(env):
    for model in ("a", "b", "c"):  # fill the three slots (--max-adapters 3) with healthy adapters
        env["client"].completions.create(model=model, prompt="hi", max_tokens=1, temperature=0)
    loaded = {name for name, card in model_cards(env).items() if card.get("status") == "loaded"}
    assert loaded == {"a", "b", "c"}
    evictions = metric(env, "lorakit_adapter_evictions_total")
    r = env["http"].post("/v1/load_lora_adapter", json={"lora_name": "ob", "lora_path": "otherbase"})
    err = assert_error(r, 400, code="adapter_error")
    assert re.search(r"tensor '.*(q|k|v|o)_proj\.lora_A\.weight' has shape \(8, 32\) .* expects \(8, 64\)",
                     err["message"]), err["message"]
    # On demand (folder name in the adapter dir) it is refused the same way, and nothing is left behind.
    r = env["http"].post("/v1/completions", json={"model": "otherbase", "prompt": "hi", "max_tokens": 2})
    assert_error(r, 400, code="adapter_error", match="shape")
    # Neither failed load cost a healthy adapter its slot, and the model list says what is wrong.
    cards = model_cards(env)
    assert {name for name, card in cards.items() if card.get("status") == "loaded"} == loaded
    assert metric(env, "lorakit_adapter_evictions_total") == evictions
    assert cards["otherbase"]["status"] == "error" and "shape" in cards["otherbase"]["error"]
    assert "ob" not in cards
    r = env["client"].completions.create(model="a", prompt="hi", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("damage,match", [
    ("truncated", r"adapter_model\.safetensors is corrupt or truncated"),
    ("rank", r"gives rank 4 to .* but the tensor .* has rank 8"),
    ("pickle", r"adapter_model\.bin cannot be read safely \(Trying to load unsupported GLOBAL"),
])
def test_broken_adapter_files_from_elsewhere_are_a_400_that_evicts_nothing(env, damage, match):
    folder = env["adapters"] / f"broken-{damage}"
    shutil.copytree(env["adapters"] / "b", folder)
    weights = folder / "adapter_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "rank":
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    else:
        weights.unlink()
        torch.save({"x": os.system}, folder / "adapter_model.bin")  # a pickle naming a function: never loaded
    for model in ("a", "b", "c"):
        env["client"].completions.create(model=model, prompt="hi", max_tokens=1, temperature=0)
    evictions = metric(env, "lorakit_adapter_evictions_total")
    r = env["http"].post("/v1/completions", json={"model": folder.name, "prompt": "hi", "max_tokens": 2})
    assert_error(r, 400, code="adapter_error", match=match)
    assert metric(env, "lorakit_adapter_evictions_total") == evictions
    assert model_cards(env)[folder.name]["status"] == "error"
    assert env["client"].completions.create(model="a", prompt="hi", max_tokens=2, temperature=0).choices


def test_bad_adapter_that_waited_for_a_slot_is_still_a_400(env):
    http, engine = env["http"], env["server"].app.state.engine
    _wait_idle(env)
    bad = {"model": "otherbase", "prompt": "hi", "max_tokens": 2}

    def streamed_events(body) -> list:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]

    def wait_queued(commands: int) -> None:
        deadline = time.monotonic() + 30
        while engine._commands.qsize() < commands:
            assert time.monotonic() < deadline, "requests did not reach the engine"
            time.sleep(0.01)

    gate = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        held = engine.call(lambda: gate.wait(60))  # park the engine thread, so the order of arrival is ours
        while not held.running():
            time.sleep(0.01)
        longs = [pool.submit(http.post, "/v1/completions", json={"model": model, "prompt": "Once upon a time",
                                                                 "max_tokens": 40, "ignore_eos": True})
                 for model in ("a", "b", "c")]
        wait_queued(3)  # accepted first, these pin all three adapter slots (--max-adapters 3)...
        plain = pool.submit(http.post, "/v1/completions", json=bad)
        streamed = pool.submit(streamed_events, {**bad, "stream": True})
        wait_queued(5)  # ...so these wait for a slot, and load (and fail) only when one frees up
        gate.set()
        held.result(60)
        assert [r.result(60).status_code for r in longs] == [200, 200, 200]
        assert_error(plain.result(60), 400, code="adapter_error", match="shape")
        events = streamed.result(60)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "adapter_error" and error["type"] == "invalid_request_error" and "shape" in error["message"]


def test_lru_eviction_and_on_demand_reload(env):
    client, tok, base, adapters = env["client"], env["tok"], env["base"], env["adapters"]
    evictions = metric(env, "lorakit_adapter_evictions_total")
    texts = {}
    for model in ["a", "b", "c", "a", "b", "c"]:  # 3 adapters + the ones earlier tests loaded; max 3 resident
        texts.setdefault(model, []).append(
            client.completions.create(model=model, prompt="Numbers: 1 2 3", max_tokens=10, temperature=0)
            .choices[0].text)
    assert metric(env, "lorakit_resident_adapters") <= 3
    resident = {m.id for m in client.models.list().data if getattr(m, "status", None) == "loaded"}
    assert len(resident) <= 3
    for model, outs in texts.items():
        expected = offline_text(base, tok, tok("Numbers: 1 2 3")["input_ids"], adapters / model, 10)
        assert outs == [expected, expected]
    # Fill the slots with other adapters so 'a' must be evicted, then use it again.
    env["http"].post("/v1/load_lora_adapter", json={"lora_name": "b2", "lora_path": "b"})
    env["http"].post("/v1/load_lora_adapter", json={"lora_name": "c2", "lora_path": "c"})
    env["http"].post("/v1/load_lora_adapter", json={"lora_name": "b3", "lora_path": "b"})
    assert metric(env, "lorakit_adapter_evictions_total") >= evictions + 3
    again = client.completions.create(model="a", prompt="Numbers: 1 2 3", max_tokens=10, temperature=0)
    assert again.choices[0].text == texts["a"][0]
    for name in ("b2", "c2", "b3"):
        env["http"].post("/v1/unload_lora_adapter", json={"lora_name": name})


# -- disconnects, health, metrics ------------------------------------------------------------------------

def _wait_idle(env, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = env["http"].get("/health").json()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        time.sleep(0.02)
    raise AssertionError(f"server still busy: {stats}")


@pytest.fixture
def slow_decode(env, monkeypatch):
    """Each decode step takes at least 10 ms, so a 480-token request outlives the client on any machine."""
    engine = env["server"].app.state.engine
    monkeypatch.setattr(engine, "_decode", slowed(engine._decode))


def test_client_disconnect_mid_stream_frees_the_slot(env, slow_decode):
    cancelled = metric(env, "lorakit_sequences_finished_total", False, finish_reason="cancelled")
    tokens = metric(env, "lorakit_generation_tokens_total", False)
    body = {"model": "c", "prompt": "Once upon a time", "max_tokens": 480, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with env["http"].stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        seen = [next(lines) for _ in range(4)]  # a couple of chunks, then hang up
        assert any(line.startswith("data: ") for line in seen)
    _wait_idle(env)
    assert metric(env, "lorakit_sequences_finished_total", False, finish_reason="cancelled") == cancelled + 1
    assert metric(env, "lorakit_generation_tokens_total") - tokens < 480  # stopped early


def test_client_timeout_on_non_streaming_request_frees_the_slot(env, slow_decode):
    cancelled = metric(env, "lorakit_sequences_finished_total", False, finish_reason="cancelled")
    body = {"model": "b", "prompt": "Once upon a time", "max_tokens": 480, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=env["server"].url, headers={"Authorization": f"Bearer {KEY}"}) as short:
        with pytest.raises(httpx.ReadTimeout):
            short.post("/v1/completions", json=body, timeout=0.3)
    _wait_idle(env)
    assert metric(env, "lorakit_sequences_finished_total", False, finish_reason="cancelled") == cancelled + 1


def test_health_and_metrics(env):
    r = httpx.get(env["server"].url + "/health", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    text = env["http"].get("/metrics").text
    for name in ("lorakit_requests_total", "lorakit_prompt_tokens_total", "lorakit_generation_tokens_total",
                 "lorakit_batch_size_bucket", "lorakit_request_latency_seconds_bucket",
                 "lorakit_time_to_first_token_seconds_bucket", "lorakit_resident_adapters",
                 "lorakit_running_sequences", "lorakit_adapter_loads_total"):
        assert name in text, name
    assert metric(env, "lorakit_requests_total", endpoint="/v1/completions", status="200") > 5
    assert metric(env, "lorakit_requests_total", endpoint="/v1/completions", status="404") >= 1
    assert metric(env, "lorakit_generation_tokens_total", model="a") > 0
    assert metric(env, "lorakit_request_latency_seconds_count", model="b") > 0
