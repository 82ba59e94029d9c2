"""Adapter churn, small: a server that loads and evicts adapters one after another keeps its memory (the model's
tensors exactly, the process's RSS within 10%), and forgets evicted adapters. benchmarks/churn.py runs 200 on
SmolLM2 in a child process."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import churn  # noqa: E402
from load import make_adapter_dir, rss_mb  # noqa: E402
from lorakit.models import load_base_model  # noqa: E402
from lorakit.serve import ServerThread  # noqa: E402
from lorakit.serve.app import create_app  # noqa: E402
from lorakit.serve.engine import Engine, EngineConfig  # noqa: E402
from lorakit.serve.metrics import ServerMetrics  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
ADAPTERS, SLOTS = 60, 4


def model_bytes(engine) -> int:
    model = engine.served.model
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def test_loading_and_evicting_adapters_in_turn_keeps_memory_flat(tiny_base, tmp_path):
    names = make_adapter_dir(tiny_base, ADAPTERS, tmp_path / "adapters", distinct=4)
    base, tokenizer = load_base_model(tiny_base, dtype=torch.float32)
    metrics = ServerMetrics(4)
    engine = Engine(base, tokenizer, EngineConfig(max_batch_size=4, max_model_len=64, max_adapters=SLOTS),
                    base_name="base", adapter_dirs=[str(tmp_path / "adapters")], metrics=metrics)
    import os

    with ServerThread(create_app(engine, metrics)) as server:
        first = churn.churn(server.url, names[:20], 20, lambda: rss_mb(os.getpid()))
        bytes_after_20 = model_bytes(engine)
        report = churn.churn(server.url, names[20:], 20, lambda: rss_mb(os.getpid()))
        assert model_bytes(engine) == bytes_after_20  # no adapter's tensors left behind
        assert len(engine.served.model.peft_config) == len(engine.registry.resident()) == SLOTS
        assert set(engine.served.model.peft_config) == set(names[-SLOTS:])
    assert (report["adapter_loads"], report["adapter_evictions"]) == (ADAPTERS, ADAPTERS - SLOTS)
    assert report["resident_at_end"] == SLOTS
    assert report["rss_mb_last"] / first["rss_mb_last"] - 1 < churn.GOAL, (first, report)
