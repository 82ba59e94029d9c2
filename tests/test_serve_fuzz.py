"""Fuzzing the server: requests generated from its own /openapi.json (schemathesis, driven by Hypothesis) get a
2xx or an OpenAI-style 4xx, never a 5xx or no answer, and the server keeps serving. A bounded run: the longer
one is benchmarks/fuzz.py."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fuzz  # noqa: E402
from lorakit.models import load_base_model  # noqa: E402
from lorakit.serve import ServerThread  # noqa: E402
from lorakit.serve.app import create_app  # noqa: E402
from lorakit.serve.engine import Engine, EngineConfig  # noqa: E402
from lorakit.serve.metrics import ServerMetrics  # noqa: E402
from test_serve_helpers import save_random_adapter  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
EXAMPLES = 60  # per operation, and 15 raw bodies per POST: about 360 requests in all


@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory):
    """The tiny base (SmolLM2's tokenizer and chat template), three adapters and two slots, 64 tokens a request."""
    base, tokenizer = load_base_model(tiny_base, dtype=torch.float32)
    adapters = tmp_path_factory.mktemp("fuzz-adapters")
    names = ["a", "b", "c"]
    for i, name in enumerate(names):
        save_random_adapter(base, adapters / name, seed=i + 1)
    metrics = ServerMetrics(4)
    engine = Engine(base, tokenizer, EngineConfig(max_batch_size=4, max_model_len=64, max_adapters=2),
                    base_name="base", adapter_dirs=[str(adapters)], metrics=metrics)
    with ServerThread(create_app(engine, metrics)) as running:
        yield running, engine, names


def test_generated_requests_get_a_2xx_or_an_openai_style_4xx_and_the_server_keeps_serving(server):
    running, engine, names = server
    before = fuzz.greedy_probe(running.url, "a", max_tokens=8)
    report = fuzz.fuzz(running.url, ["base"] + names, names, EXAMPLES, timeout=60, max_seconds=240)
    print(f"\nfuzz: {report['bodies']} requests: {report['by_endpoint']}; {report['errors_by_code']}")
    assert not report["stopped_by_time"]
    assert report["operations"] == 10  # every endpoint of the OpenAPI document
    by = report["by_endpoint"]
    assert set(by) == {"GET /", "GET /health", "GET /metrics", "GET /playground", "GET /v1/models",
                       "GET /v1/models/{model_id}", "POST /v1/completions", "POST /v1/chat/completions",
                       "POST /v1/load_lora_adapter", "POST /v1/unload_lora_adapter"}
    assert report["bodies"] >= 6 * EXAMPLES  # the GETs without parameters are one request each
    for endpoint in fuzz.GENERATING + fuzz.ADAPTER_CALLS:  # both kinds of answer were reached
        assert by[f"POST {endpoint}"].get("2xx", 0) > 0 and by[f"POST {endpoint}"].get("4xx", 0) > 0, by
    assert engine.alive and fuzz.server_health(running.url) == "ok"
    assert len(engine.registry.resident()) <= 2
    assert fuzz.greedy_probe(running.url, "a", max_tokens=8) == before


@pytest.mark.parametrize("status,content,problem", [
    (500, b'{"error": {"message": "x", "type": "server_error", "param": null, "code": null}}', "server error"),
    (400, b'{"detail": "bad"}', "not an OpenAI-style error"),
    (422, b'{"error": {"message": "", "type": "t", "param": null, "code": null}}', "not an OpenAI-style error"),
    (404, b"Not Found", "without a JSON body"),
])
def test_the_fuzz_check_fails_on_bad_answers(status, content, problem):
    with pytest.raises(fuzz.Failure, match=problem):
        fuzz.check_answer(status, {"content-type": "application/json"}, content)
    stream = {"content-type": "text/event-stream"}
    with pytest.raises(fuzz.Failure, match="does not end with"):
        fuzz.check_answer(200, stream, b'data: {"choices": []}\n\n')
    with pytest.raises(fuzz.Failure, match="server error"):
        fuzz.check_answer(200, stream, b'data: {"error": {"type": "server_error"}}\n\ndata: [DONE]\n\n')
    assert fuzz.check_answer(200, stream, b'data: {"choices": []}\n\ndata: [DONE]\n\n') == "2xx"
