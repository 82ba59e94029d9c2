"""A generation request inside the engine (Sequence) and the events it sends its client (Output)."""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence as Seq

import torch

from .detokenize import TokenLogprob
from .sampling import SamplingParams


@dataclass
class Output:
    """One event for one sequence: new text since the last event, and the finish reason at the end."""

    text: str
    finish_reason: Optional[str]  # None while running; "stop", "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    error: Optional[BaseException] = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # for the tokens of this event, when asked
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # in the first event, when asked


_ids = itertools.count()


class Sequence:
    """One generation: prompt, adapter, sampling state, its own RNG, and where its KV cache lives."""

    def __init__(self, prompt_ids: Seq[int], adapter: Optional[str], params: SamplingParams,
                 sink: Callable[[Output], None]):
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.adapter = adapter  # None: the base model
        self.params = params
        self.sink = sink
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed % (1 << 63))
        self.output_ids: list[int] = []
        self.cache_len = 0  # tokens whose K/V sit in the cache
        self.sent = 0  # characters of the output text already emitted
        self.finish_reason: Optional[str] = None
        self.cancelled = False  # set from any thread; the engine frees the row at its next step
        self.pinned = False  # holds a reference on its adapter in the registry
        self.arrival = time.monotonic()
        self.first_token_at: Optional[float] = None

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)
