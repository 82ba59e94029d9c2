"""`lorakit serve`: command-line options, building the engine from them, and running uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
import threading
import time
from typing import Callable, Optional, TypeVar

from lorakit.models import DEVICE_HELP
from lorakit.precision import DTYPES, slow_bf16_warning
from lorakit.weight_only import DECODE_PRECISION_HELP, DECODE_PRECISIONS

QUANTIZE_CHOICES = ("auto", "nf4", "none")
T = TypeVar("T")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lorakit serve` (the CLI's serve subcommand calls this, then run_server)."""
    parser.add_argument("--base", default="smollm2",
                        help="base model: 'smollm2' (embedded default), a local model directory or a hub id")
    parser.add_argument("--served-model-name", default=None,
                        help="name clients use for the base model (default: the --base value)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="serve the adapter saved in PATH as model NAME (repeatable)")
    parser.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                        help="directory of adapters (one sub-folder each), loadable on demand by folder name "
                             "and through /v1/load_lora_adapter; nothing outside these is loaded at run time "
                             "(repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    parser.add_argument("--max-adapters", type=int, default=8,
                        help="adapters kept in memory at once; the least recently used is evicted (default 8)")
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="sequences decoded together in one forward (default 8)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="prompt + completion tokens per request (default: min(2048, the model's limit))")
    parser.add_argument("--prefix-cache-tokens", type=int, default=4096,
                        help="token budget for reusing the K/V of recent prompts' shared prefixes, e.g. the "
                             "chat template's system prompt (0 disables; default 4096)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="dtype of the base weights (default %(default)s)")
    parser.add_argument("--device", default="auto", help=f"where the model runs: {DEVICE_HELP}")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="auto",
                        help="the base's weights: 'auto' (default) serves the base the --adapter adapters were trained "
                             "on (NF4-rounded for QLoRA adapters) and refuses adapters trained on another; 'nf4' "
                             "keeps a 4-bit base in memory (about a quarter of the bytes); 'none' full precision. "
                             "With nf4 or none, every adapter is served on that base")
    parser.add_argument("--decode-precision", choices=DECODE_PRECISIONS, default="auto", help=DECODE_PRECISION_HELP)
    parser.add_argument("--api-key", default=os.environ.get("LORAKIT_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every endpoint but /health and /playground "
                             "(default: $LORAKIT_API_KEY, else no key)")
    parser.add_argument("--scheduling", choices=("mixed", "per-adapter"), default="mixed",
                        help="'mixed' (default): requests for any adapters share a batch; 'per-adapter': one "
                             "adapter per batch (a baseline for benchmarks)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="server log level (default %(default)s)")


def on_short_lived_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) run on a new thread that ends when it returns; its result, or its exception raised here.

    The engine runs the model on its own thread. A thread that has run PyTorch's parallel CPU ops keeps a team
    of OpenMP threads for as long as it lives; with a second team in the process there are more OpenMP threads
    than cores, GNU OpenMP then stops spinning between parallel regions, and every op of a decode step waits for
    its sleeping threads to wake, which costs several times a small op's work. Loading the model (and anything
    else heavy before the engine starts) on a thread that then ends frees that team, so the engine's is the only
    one. The thread that called this stays free of OpenMP work.
    """
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="lorakit-load", daemon=True)  # Ctrl-C during a load exits
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]


def build_server(args: argparse.Namespace):
    """Load the base model, register the adapters, and return the ASGI app (engine not yet started).

    The loading runs on a short-lived thread (see on_short_lived_thread)."""
    return on_short_lived_thread(_build_server, args)


def load_engine_model(args: argparse.Namespace, base: str, adapter_paths: list[str], **quantize_options):
    """The model the engine decodes with, from the options serve, generate and chat share: the base these adapters
    were trained on (models.load_base_for_adapters; `quantize_options` go to it) at --dtype on --device, its
    weights prepared for --decode-precision. Returns (model, tokenizer, base quantization, decode precision)."""
    import torch

    from lorakit.models import load_base_for_adapters, resolve_device
    from lorakit.weight_only import prepare_for_decode

    device = resolve_device(args.device)
    model, tokenizer, quantization = load_base_for_adapters(base, adapter_paths, dtype=getattr(torch, args.dtype),
                                                            device=device, **quantize_options)
    precision = prepare_for_decode(model, args.decode_precision)
    # bf16 weights kept as loaded ("fp32": not quantized) make every matmul a bf16 one (int4+bf16 multiplies its
    # copy in float32 where that is faster)
    warning = slow_bf16_warning(device, "with --dtype float32") \
        if precision == "fp32" and args.dtype == "bfloat16" else None
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return model, tokenizer, quantization, precision


def _build_server(args: argparse.Namespace):
    from lorakit.adapter_folder import checked_adapter_specs
    from lorakit.models import QUANTIZE_AUTO

    from .app import create_app
    from .engine import Engine, EngineConfig
    from .metrics import ServerMetrics

    adapters = dict(checked_adapter_specs(args.adapter))
    quantize = {"auto": QUANTIZE_AUTO, "none": None}.get(args.quantize, args.quantize)
    model, tokenizer, quantization, precision = load_engine_model(args, args.base, list(adapters.values()),
                                                                  quantize=quantize, keep_4bit=args.quantize == "nf4")
    logging.getLogger("lorakit.serve").info("decode precision: %s", precision)
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    max_len = args.max_model_len or min(2048, limit)
    metrics = ServerMetrics(args.max_batch_size)
    config = EngineConfig(max_batch_size=args.max_batch_size, max_model_len=max_len,
                          max_adapters=args.max_adapters, scheduling=args.scheduling,
                          prefix_cache_tokens=args.prefix_cache_tokens, base_quantization=quantization,
                          any_adapter_base=args.quantize != "auto")
    engine = Engine(model, tokenizer, config, base_name=args.served_model_name or args.base,
                    adapter_dirs=args.adapter_dir, metrics=metrics)
    engine.configure_adapters(adapters)
    return create_app(engine, metrics, api_key=args.api_key)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_server(args: argparse.Namespace) -> None:
    """Serve until interrupted."""
    import uvicorn

    from lorakit.errors import LoraKitError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = build_server(args)
    except (LoraKitError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"lorakit serve: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if not _is_loopback(args.host) and not args.api_key:
        logging.getLogger("lorakit.serve").warning(
            "listening on %s without --api-key: anyone who can reach this port can use the server", args.host)
    print(f"lorakit serve: http://{args.host}:{args.port}/v1  (playground: http://{args.host}:{args.port}/playground)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


class ServerThread:
    """Run an app with uvicorn in a background thread on a loopback port (tests and benchmarks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        if not _is_loopback(host):
            raise ValueError("ServerThread only listens on loopback addresses.")
        self.app, self.host, self.port = app, host, port
        self.server = None
        self.thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name="lorakit-uvicorn")
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
