"""`lorakit serve`'s base: the one the adapters were trained on (NF4-rounded for QLoRA), or as --quantize says."""

from __future__ import annotations

import argparse
import json
import shutil
import threading

import httpx
import pytest
import torch
from tiny_models import tiny_train_config, write_code_pairs

from lorakit.models import ModelLoadError
from lorakit.quant import NF4Linear
from lorakit.serve import ServerThread, add_serve_arguments, build_server
from lorakit.train import train


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    """A QLoRA adapter `q` and a plain one `p` (in an adapter directory), each trained for one step."""
    root = tmp_path_factory.mktemp("serve_base")
    data = write_code_pairs(root / "pairs.jsonl", 8)
    train(tiny_train_config(tiny_base, data, root / "q", quantize="nf4", max_steps=1))
    train(tiny_train_config(tiny_base, data, root / "dir" / "p", max_steps=1))
    return root


def serve(tiny_base, adapters, *extra: str) -> ServerThread:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--base", tiny_base, "--adapter", f"q={adapters / 'q'}", "--adapter-dir",
                              str(adapters / "dir"), "--max-model-len", "128", *extra])
    return ServerThread(build_server(args)).start()


def ask(server: ServerThread, model: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": "What does code 3 mean?",
                                                           "max_tokens": 3, "temperature": 0}, timeout=60)


def test_auto_serves_the_nf4_rounded_base_and_refuses_an_adapter_trained_on_another(tiny_base, adapters):
    server = serve(tiny_base, adapters)
    try:
        engine = server.app.state.engine
        assert engine.served.base_quantization == "nf4"
        assert not any(isinstance(m, NF4Linear) for m in engine.model.modules())  # rounded, held in float32
        assert ask(server, "q").status_code == 200
        refused = ask(server, "p")
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "adapter_error"
        message = refused.json()["error"]["message"]
        assert "trained on the full-precision base" in message and "--quantize" in message
        assert ask(server, "q").status_code == 200  # and the server goes on serving
    finally:
        server.stop()


def test_quantize_nf4_keeps_a_4bit_base_and_serves_every_adapter_on_it(tiny_base, adapters, tmp_path):
    server = serve(tiny_base, adapters, "--quantize", "nf4")
    try:
        engine = server.app.state.engine
        assert sum(isinstance(m, NF4Linear) for m in engine.model.modules()) == 14  # 2 layers x 7 projections
        assert ask(server, "q").status_code == 200 and ask(server, "p").status_code == 200
    finally:
        server.stop()


def test_a_plain_adapter_alone_gets_the_full_precision_base(tiny_base, adapters, tmp_path):
    shutil.copytree(adapters / "dir" / "p", tmp_path / "p")
    record = json.loads((tmp_path / "p" / "lorakit_train.json").read_text())
    assert record["config"]["quantize"] is None
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    server = ServerThread(build_server(parser.parse_args(["--base", tiny_base, "--adapter", f"p={tmp_path / 'p'}",
                                                          "--max-model-len", "128"]))).start()
    try:
        assert server.app.state.engine.served.base_quantization is None and ask(server, "p").status_code == 200
    finally:
        server.stop()


def test_device_says_where_the_model_runs_and_a_missing_gpu_is_named(tiny_base, adapters):
    server = serve(tiny_base, adapters, "--device", "cpu")
    try:
        assert {p.device.type for p in server.app.state.engine.model.parameters()} == {"cpu"}
        assert ask(server, "q").status_code == 200
    finally:
        server.stop()
    with pytest.raises(ModelLoadError, match="unknown device 'gpu0': use auto, cpu, cuda or cuda:N"):
        serve(tiny_base, adapters, "--device", "gpu0")
    if not torch.cuda.is_available():  # tests/test_cuda.py serves on the GPU where there is one
        with pytest.raises(ModelLoadError, match="sees no CUDA GPU; use --device cpu"):
            serve(tiny_base, adapters, "--device", "cuda")


@pytest.mark.parametrize("speedup", [0.2, 1.7])  # an AVX2-only CPU; one with bf16 units
def test_bf16_weights_on_a_cpu_without_bf16_units_warn_with_the_option_that_avoids_them(tiny_base, monkeypatch, capsys,
                                                                                       speedup):
    from lorakit.serve.server import load_engine_model

    for module in ("precision", "weight_only"):
        monkeypatch.setattr(f"lorakit.{module}.bf16_matmul_speedup", lambda device: speedup)
    warning = "lorakit: warning: bf16 matmuls run 5.0x slower than float32 ones on this CPU"
    for dtype, precision, instead in (("bfloat16", "auto", "with --dtype float32"), ("float32", "auto", None),
                                      ("bfloat16", "fp32", "with --dtype float32"), ("bfloat16", "int8", None),
                                      ("float32", "int4+bf16", None)):  # its copy is multiplied in float32 there
        args = argparse.Namespace(dtype=dtype, device="cpu", decode_precision=precision)
        model, _, _, chosen = load_engine_model(args, tiny_base, [])
        assert chosen == ("fp32" if precision == "auto" else precision)
        assert model.dtype == getattr(torch, dtype)
        err = capsys.readouterr().err
        expected = f"{warning} (it has no bf16 units, such as AVX512-BF16 or AMX): {instead} this will be faster"
        assert (expected in err) is (instead is not None and speedup < 1), (dtype, precision, err)
        assert (warning in err) is (expected in err)


def test_on_short_lived_thread_returns_the_result_and_raises_the_error_of_a_thread_that_has_ended():
    from lorakit.serve.server import on_short_lived_thread

    seen = []

    def work(x, y=1):
        seen.append(threading.current_thread())
        return x + y

    assert on_short_lived_thread(work, 2, y=3) == 5
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()
    with pytest.raises(ZeroDivisionError):
        on_short_lived_thread(lambda: 1 / 0)


def test_build_server_loads_the_model_off_the_calling_thread(tiny_base, adapters, monkeypatch):
    """The engine thread must be the only long-lived thread that has run PyTorch's parallel ops (see
    on_short_lived_thread): the model is loaded, and the startup adapters read, on a thread that then ends."""
    import lorakit.models
    import lorakit.serve.served_model

    loaders = []
    for module, name in ((lorakit.models, "load_base_for_adapters"), (lorakit.serve.served_model.ServedModel,
                                                                       "load_adapter")):
        real = getattr(module, name)

        def spy(*args, _real=real, **kwargs):
            loaders.append(threading.current_thread())
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    build_server(parser.parse_args(["--base", tiny_base, "--adapter", f"q={adapters / 'q'}", "--max-model-len", "128"]))
    assert len(loaders) == 2 and threading.current_thread() not in loaders
