"""Continuous-batching generation engine for many adapters on one base model.

One background thread owns the model. Each loop iteration it
  1. runs queued commands (new requests, adapter load/unload) between forwards,
  2. admits waiting sequences into free batch rows, prefilling each one on its own,
  3. runs ONE forward for all running sequences: row i feeds its last token at its own position,
     attends only to its own KV-cache slot, and applies its own adapter (`adapter_names=`).
Sequences leave the batch as soon as they finish or their client goes away; the freed row is reused
by the next waiting sequence (continuous batching).

KV cache: a preallocated buffer per layer, [max_batch_size, kv_heads, capacity, head_dim]. Running
sequence i always lives in slot i (a leaving sequence's slot is refilled by moving the last one in),
so the batch's cache is a view, not a copy; each step writes one K/V column per row at that row's
own position and masks everything past it. Prefill uses the model's ordinary cache (exactly what
offline `generate` does) and copies the result into the slot.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence as Seq

import torch

from .detokenize import TokenLogprob, find_stop, prompt_logprobs, sendable_end, token_logprob
from .kv_cache import PrefixCache, SlotCache, cache_layers, fill_past, padded_inputs
from .registry import AdapterRegistry
from .sampling import ChosenLogprob, SamplingParams, logprobs_each, sample_each
from .sequence import Output, Sequence
from .served_model import ServedModel

log = logging.getLogger("lorakit.serve")

SCHEDULING_MODES = ("mixed", "per-adapter")


@dataclass
class EngineConfig:
    max_batch_size: int = 8
    max_model_len: int = 2048
    max_adapters: int = 8
    scheduling: str = "mixed"  # "mixed": any adapters share a batch; "per-adapter": one adapter per batch
    # New prompts admitted together are prefilled in one forward, up to this many (padded) tokens.
    max_prefill_tokens: int = 4096
    # Token budget of the prefix cache (K/V of recent prompts reused by prompts that start the same way).
    prefix_cache_tokens: int = 4096
    # The served base's weights: "nf4" (NF4-rounded, as QLoRA trains) or None (full precision). Unless
    # any_adapter_base, an adapter trained on the other kind of base is refused (it would answer differently).
    base_quantization: Optional[str] = None
    any_adapter_base: bool = False
    # Decode steps of Llama-family models in few operations (serve/decode_step.py); False: the model's forward
    fast_decode: bool = True

    def __post_init__(self):
        if self.scheduling not in SCHEDULING_MODES:
            raise ValueError(f"scheduling must be one of {SCHEDULING_MODES}, got {self.scheduling!r}.")
        if self.max_batch_size < 1:
            raise ValueError("--max-batch-size must be at least 1.")
        if self.max_model_len < 2:
            raise ValueError("--max-model-len must be at least 2.")


class Engine:
    """Owns the model and the decode loop; everything that touches the model runs on its thread."""

    def __init__(self, model, tokenizer, config: EngineConfig, base_name: str = "base",
                 adapter_dirs: Seq[str] = (), metrics=None):
        self.tokenizer = tokenizer
        self.config = config
        self.base_name = base_name
        self.metrics = metrics
        self.served = ServedModel(model, tokenizer, config.max_model_len, config.base_quantization,
                                  config.any_adapter_base, config.fast_decode)
        self.eos_ids, self.pad_id, self.device = self.served.eos_ids, self.served.pad_id, self.served.device
        self.registry = AdapterRegistry(base_name, list(adapter_dirs), config.max_adapters,
                                        load=self._load_adapter, unload=self._unload_adapter,
                                        on_change=self._adapters_changed)
        self.slots: Optional[SlotCache] = None
        self.running: list[Sequence] = []
        self.waiting: collections.deque[Sequence] = collections.deque()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.prefix = PrefixCache(config.prefix_cache_tokens) if config.prefix_cache_tokens > 0 else None
        self.steps = 0
        self.batch_rows = 0  # sum over steps of the batch size (mean batch = batch_rows / steps)
        self.decode_seconds = self.prefill_seconds = 0.0
        self.prefills = 0  # prefill forwards (several prompts may share one)
        self.error: Optional[BaseException] = None

    # -- adapters -------------------------------------------------------------------------------------
    @property
    def model(self):
        return self.served.model

    def _load_adapter(self, name: str, path: Path) -> None:
        self.served.load_adapter(name, path)

    def _unload_adapter(self, name: str) -> None:
        self.served.unload_adapter(name)
        if self.prefix is not None:  # a later adapter of the same name may have other weights
            self.prefix.drop(name)

    def _adapters_changed(self, registry: AdapterRegistry) -> None:
        if self.metrics is not None:
            self.metrics.adapters_changed(len(registry.resident()), registry.loads, registry.evictions)

    # -- public API (any thread) ----------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="lorakit-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """Make the loop look at its queues now (e.g. after a cancel), not after the current wait."""
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run `fn` on the engine thread between two forwards; returns a Future with its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not self.alive:
            future.set_exception(RuntimeError("The generation engine is not running."))
            return future
        self._commands.put((fn, future))
        self._wake.set()
        return future

    def submit(self, seqs: list[Sequence]) -> concurrent.futures.Future:
        """Queue sequences. The Future fails (nothing queued) if an adapter is unknown or fails to load."""
        return self.call(lambda: self._accept(seqs))

    def configure_adapters(self, adapters: dict[str, str]) -> None:
        """Register --adapter NAME=PATH entries and load up to --max-adapters of them (startup)."""
        for name, path in adapters.items():
            self.registry.configure(name, path)
        for name in list(adapters)[: self.config.max_adapters]:
            if self.registry.acquire(name):
                self.registry.release(name)

    def generate(self, prompt_ids: Seq[int], adapter: Optional[str] = None,
                 params: Optional[SamplingParams] = None, timeout: float = 600.0) -> tuple[str, list[int], str]:
        """Blocking helper: (text, token_ids, finish_reason) for one prompt."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        seq = Sequence(prompt_ids, adapter, params or SamplingParams(), events.put)
        self.submit([seq]).result(timeout)
        text, ids = [], []
        deadline = time.monotonic() + timeout
        while True:
            out = events.get(timeout=max(0.0, deadline - time.monotonic()))
            text.append(out.text)
            ids.extend(out.token_ids)
            if out.error is not None:
                raise out.error
            if out.finish_reason is not None:
                return "".join(text), ids, out.finish_reason

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), "steps": self.steps,
                "mean_batch_size": self.batch_rows / self.steps if self.steps else 0.0,
                "prefix_cache_hits": self.prefix.hits if self.prefix else 0,
                "resident_adapters": self.registry.resident()}

    # -- engine thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while not self._stopping:
                self._wake.clear()
                self._run_commands()
                self._reap()
                self._admit()
                if self.running:
                    self._step()
                elif not self._stopping:
                    self._wake.wait(0.5)
        except BaseException as exc:  # a bug here must not leave clients hanging forever
            log.exception("generation engine crashed")
            self.error = exc
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        reason = self.error or RuntimeError("The server is shutting down.")
        for seq in list(self.running) + list(self.waiting):
            self._finish(seq, "error", error=reason)
        self.running.clear()
        self.waiting.clear()
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                break
            future.set_exception(RuntimeError("The server is shutting down."))

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def _accept(self, seqs: list[Sequence]) -> None:
        """Pin each sequence's adapter (loading it now when a slot is free) and queue it."""
        done: list[Sequence] = []
        try:
            for seq in seqs:
                if not 0 < len(seq.prompt_ids) < self.config.max_model_len:
                    raise ValueError(f"A prompt must have 1 to {self.config.max_model_len - 1} tokens "
                                     f"(--max-model-len); this one has {len(seq.prompt_ids)}.")
                if seq.adapter is not None:
                    self.registry.get(seq.adapter)  # raises if unknown
                    seq.pinned = self.registry.acquire(seq.adapter)
                done.append(seq)
        except BaseException:
            for seq in done:
                self._unpin(seq)
            raise
        self.waiting.extend(seqs)
        self._update_gauges()

    def _unpin(self, seq: Sequence) -> None:
        if seq.pinned:
            self.registry.release(seq.adapter)
            seq.pinned = False

    def _reap(self) -> None:
        """Drop cancelled sequences (client went away) from the queue and the batch."""
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self._finish(seq, "cancelled")
        gone = [i for i, s in enumerate(self.running) if s.cancelled]
        for i in reversed(gone):
            self._finish(self.running[i], "cancelled")
            self._remove_row(i)

    def _admit(self) -> None:
        free = self.config.max_batch_size - len(self.running)
        if not self.waiting or free <= 0:
            return
        group = self._admissible_adapter()
        chosen: list[Sequence] = []
        for seq in list(self.waiting):
            if len(chosen) >= free:
                break
            if self.config.scheduling == "per-adapter" and seq.adapter != group:
                continue
            width = max([len(seq.prompt_ids)] + [len(s.prompt_ids) for s in chosen])
            if chosen and width * (len(chosen) + 1) > self.config.max_prefill_tokens:
                break  # the rest is prefilled in a later iteration
            if chosen and (seq.params.prompt_logprobs is not None or chosen[0].params.prompt_logprobs is not None):
                break  # a prompt to score is prefilled alone: its forward keeps every position's logits
            if seq.adapter is not None and not seq.pinned:
                try:
                    seq.pinned = self.registry.acquire(seq.adapter)
                except Exception as exc:
                    self.waiting.remove(seq)
                    self._finish(seq, "error", error=exc)
                    continue
                if not seq.pinned:
                    continue  # every adapter slot is busy; retry after some sequence finishes
            self.waiting.remove(seq)
            chosen.append(seq)
        if chosen:
            self._prefill(chosen)
        self._update_gauges()

    def _admissible_adapter(self) -> Optional[str]:
        """per-adapter mode: the adapter the batch is serving, else the oldest waiting request's."""
        if self.config.scheduling != "per-adapter":
            return None
        if not self.running:
            # The oldest request whose adapter is (or can be made) resident picks the next batch's adapter.
            for seq in self.waiting:
                if seq.adapter is None or seq.pinned:
                    return seq.adapter
            return self.waiting[0].adapter
        current = self.running[0].adapter
        # Once another adapter is waiting, the current batch takes no newcomers and drains (no starvation).
        if any(s.adapter != current for s in self.waiting):
            return object()  # matches nothing
        return current

    def _forward(self, names: list[Optional[str]], **kwargs):
        """One model call, row i with adapter names[i] (None: the base model)."""
        return self.served.forward(names, **kwargs)

    def _decode(self, names: list[Optional[str]], ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step (row i: token ids[i] at positions[i], adapter names[i]); next-token logits [n, vocab]."""
        return self.served.decode(names, ids, positions, self.slots)

    def _prefill(self, seqs: list[Sequence]) -> None:
        """One forward over the new prompts, K/V copied into their slots. Prompts that share a prefix with a
        recent prompt of the same adapter (PrefixCache) only compute the rest; several prompts are padded."""
        from transformers import DynamicCache

        started = time.perf_counter()
        try:
            # A prompt whose own log probabilities are asked for is computed whole, not from the prefix cache.
            scored = [s.params.prompt_logprobs is not None for s in seqs]
            hits = [self.prefix.lookup(s.adapter, s.prompt_ids) if self.prefix and not score else (0, None)
                    for s, score in zip(seqs, scored)]
            past = [length for length, _ in hits]
            suffixes = [s.prompt_ids[length:] for s, (length, _) in zip(seqs, hits)]
            P, S = max(past), max(len(x) for x in suffixes)
            cache = DynamicCache(config=self.served.hf_config)
            # A prompt to score (prefilled alone, see _admit) keeps every position's logits.
            kwargs = {"use_cache": True, "logits_to_keep": 0 if any(scored) else 1, self.served.cache_kw: cache}
            if len(seqs) == 1 and P == 0:  # exactly what offline generate() runs
                kwargs["input_ids"] = torch.tensor([seqs[0].prompt_ids], device=self.device)
            else:
                kwargs.update(padded_inputs(suffixes, past, self.pad_id, self.device))
                if P:
                    fill_past(cache, hits, P)
            out = self._forward([s.adapter for s in seqs], **kwargs)
            keys, values = cache_layers(cache)
            if self.slots is None:
                _, heads, _, dim = keys[0].shape
                self.slots = SlotCache(len(keys), heads, dim, self.config.max_batch_size,
                                       self.config.max_model_len, keys[0].dtype, self.device)
            for i, seq in enumerate(seqs):
                slot = len(self.running) + i
                rows = lambda t: torch.cat([t[i, :, P - past[i]: P], t[i, :, P + S - len(suffixes[i]):]], dim=1)
                row_keys, row_values = [rows(k) for k in keys], [rows(v) for v in values]
                self.slots.write(slot, row_keys, row_values)
                if self.prefix is not None:
                    self.prefix.store(seq.adapter, seq.prompt_ids, row_keys, row_values)
            prompt_scores = [prompt_logprobs(self.tokenizer, seq.prompt_ids, out.logits[i, S - len(seq.prompt_ids):],
                                           seq.params.prompt_logprobs)
                               if score else [] for i, (seq, score) in enumerate(zip(seqs, scored))]
            tokens = sample_each(out.logits[:, -1, :], seqs)  # a row's own failure comes back as its token
            logprobs = logprobs_each(out.logits[:, -1, :], seqs, tokens)
        except Exception as exc:
            log.exception("prefill failed")
            for seq in seqs:
                self._finish(seq, "error", error=exc)
            return
        self.prefills += 1
        self.prefill_seconds += time.perf_counter() - started
        now = time.monotonic()
        self.running.extend(seqs)
        done = []
        for seq, token, logprob, scores in zip(seqs, tokens, logprobs, prompt_scores):
            seq.cache_len = len(seq.prompt_ids)
            seq.first_token_at = now
            if self.metrics is not None:
                self.metrics.first_token(seq.adapter or self.base_name, now - seq.arrival)
            if seq.params.max_tokens == 0:  # the prompt's log probabilities only (echo), nothing generated
                self._finish(seq, "length", prompt_logprobs=scores)
                done.append(self.running.index(seq))
                continue
            if scores:
                self._emit(seq, Output("", None, len(seq.prompt_ids), 0, prompt_logprobs=scores))
            if self._advance_or_fail(seq, token, logprob):
                done.append(self.running.index(seq))
        for i in sorted(done, reverse=True):
            self._remove_row(i)

    def _step(self) -> None:
        seqs = self.running
        n = len(seqs)
        positions = torch.tensor([s.cache_len for s in seqs], device=self.device)
        started = time.perf_counter()
        try:
            ids = torch.tensor([s.output_ids[-1] for s in seqs], device=self.device)
            logits = self._decode([s.adapter for s in seqs], ids, positions)
            tokens = sample_each(logits, seqs)  # a row's own failure comes back as its token
            logprobs = logprobs_each(logits, seqs, tokens)
        except Exception as exc:
            log.exception("decode step failed; failing the %d sequences in the batch", n)
            for seq in seqs:
                self._finish(seq, "error", error=exc)
            self.running = []
            return
        self.steps += 1
        self.batch_rows += n
        self.decode_seconds += time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.step(n)
        finished = []
        for i, (seq, token, logprob) in enumerate(zip(seqs, tokens, logprobs)):
            seq.cache_len += 1
            if self._advance_or_fail(seq, token, logprob):
                finished.append(i)
        for i in reversed(finished):
            self._remove_row(i)

    def _remove_row(self, i: int) -> None:
        """Free batch row i; the last row moves into it so rows stay 0..n-1."""
        last = len(self.running) - 1
        if i != last:
            moving = self.running[last]
            self.slots.move(last, i, moving.cache_len)
            self.running[i] = moving
        self.running.pop()
        self._update_gauges()

    # -- per-token bookkeeping --------------------------------------------------------------------------
    def _advance_or_fail(self, seq: Sequence, token: int | Exception,
                         logprob: Optional[ChosenLogprob] = None) -> bool:
        """_advance, except that a failure of this one sequence (its sampling or its text) ends it alone."""
        try:
            if isinstance(token, Exception):
                raise token
            return self._advance(seq, token, logprob)
        except Exception as exc:
            if seq.finish_reason is None:
                self._finish(seq, "error", error=exc)
            return True

    def _advance(self, seq: Sequence, token: int, logprob: Optional[ChosenLogprob] = None) -> bool:
        """Append a sampled token, emit the new text, and return True if the sequence finished."""
        p = seq.params
        seq.output_ids.append(token)
        finish = None
        text_ids = seq.output_ids
        if token in self.eos_ids and not p.ignore_eos:
            finish, text_ids, logprob = "stop", seq.output_ids[:-1], None  # the end token is not content
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        stop_at = find_stop(text, p.stop, seq.sent)
        if stop_at is not None:
            text, finish = text[:stop_at], "stop"
        if finish is None and (len(seq.output_ids) >= p.max_tokens or seq.total_len >= self.config.max_model_len):
            finish = "length"
        end = sendable_end(text, seq.sent, finish is not None, stop_at is None, p.stop)
        delta = text[seq.sent: end] if end > seq.sent else ""
        seq.sent = max(seq.sent, end)
        logprobs = [token_logprob(self.tokenizer, *logprob)] if logprob is not None else []
        if finish is None:
            self._emit(seq, Output(delta, None, len(seq.prompt_ids), len(seq.output_ids), [token],
                                   logprobs=logprobs))
            return False
        self._finish(seq, finish, delta, [token], logprobs=logprobs)
        return True

    def _finish(self, seq: Sequence, reason: str, text: str = "", token_ids: Optional[list[int]] = None,
                error: Optional[BaseException] = None, logprobs: Optional[list[TokenLogprob]] = None,
                prompt_logprobs: Optional[list[TokenLogprob]] = None) -> None:
        seq.finish_reason = reason
        self._unpin(seq)
        if self.metrics is not None:
            self.metrics.finished(seq.adapter or self.base_name, reason, len(seq.prompt_ids), len(seq.output_ids),
                                  time.monotonic() - seq.arrival)
        self._emit(seq, Output(text, reason, len(seq.prompt_ids), len(seq.output_ids), token_ids or [], error,
                               logprobs or [], prompt_logprobs or []))

    def _emit(self, seq: Sequence, output: Output) -> None:
        try:
            seq.sink(output)
        except Exception:  # the client's event loop is gone: stop generating for it
            seq.cancel()

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue(len(self.running), len(self.waiting))