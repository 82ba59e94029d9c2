"""Prometheus metrics for the server (one registry per server, so several can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the /metrics route)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class ServerMetrics:
    def __init__(self, max_batch_size: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lorakit_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.sequences = Counter("lorakit_sequences_finished", "Generated sequences, by model and finish reason",
                                 ["model", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("lorakit_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.latency = Histogram("lorakit_request_latency_seconds", "Arrival to last token, per sequence",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("lorakit_time_to_first_token_seconds", "Arrival to first token, per sequence",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        buckets = sorted({1, 2, 4, 8, 16, 32, 64, max_batch_size})
        self.batch_size = Histogram("lorakit_batch_size", "Sequences decoded together in one forward",
                                    buckets=[b for b in buckets if b <= max_batch_size], registry=r)
        self.running = Gauge("lorakit_running_sequences", "Sequences in the decode batch", registry=r)
        self.waiting = Gauge("lorakit_waiting_sequences", "Sequences queued for a batch slot", registry=r)
        self.resident = Gauge("lorakit_resident_adapters", "Adapters loaded in memory", registry=r)
        self.adapter_loads = Counter("lorakit_adapter_loads", "Adapter loads into memory", registry=r)
        self.adapter_evictions = Counter("lorakit_adapter_evictions", "LRU adapter evictions", registry=r)
        self._loads = self._evictions = 0

    # Called from the engine thread; prometheus_client is thread-safe.
    def step(self, batch: int) -> None:
        self.batch_size.observe(batch)

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.labels(model).observe(seconds)

    def finished(self, model: str, reason: str, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        self.sequences.labels(model, reason).inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)
        if reason in ("stop", "length"):
            self.latency.labels(model).observe(seconds)

    def queue(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def adapters_changed(self, resident: int, loads: int, evictions: int) -> None:
        self.resident.set(resident)
        self.adapter_loads.inc(loads - self._loads)
        self.adapter_evictions.inc(evictions - self._evictions)
        self._loads, self._evictions = loads, evictions

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
