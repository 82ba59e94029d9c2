"""The K/V caches of the decode loop: one slot per running sequence (SlotCache), the padded inputs of a
prefill over several prompts, and the K/V of recent prompts that new prompts starting the same way reuse
(PrefixCache)."""

from __future__ import annotations

import collections
from typing import Optional

import torch

class SlotCache:
    """Per-layer K/V buffers, one slot per batch row, plus the HF `Cache.update` hook for a decode step."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, slots: int, max_len: int,
                 dtype: torch.dtype, device: torch.device):
        self.max_len, self.slots = max_len, slots
        self.capacity = min(max_len, 256)
        shape = (slots, kv_heads, self.capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._flat = None
        self._n = self._kv_len = 0

    def reserve(self, length: int) -> None:
        """Grow (doubling) so every slot can hold `length` positions."""
        if length <= self.capacity:
            return
        new = self.capacity
        while new < length:
            new *= 2
        new = min(new, self.max_len)
        for buffers in (self.k, self.v):
            for i, old in enumerate(buffers):
                grown = old.new_zeros(*old.shape[:2], new, old.shape[3])
                grown[:, :, : self.capacity] = old
                buffers[i] = grown
        self.capacity = new

    def write(self, slot: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Store a prefilled sequence ([kv_heads, T, head_dim] per layer) in `slot`."""
        length = keys[0].shape[-2]
        self.reserve(length)
        for layer, (k, v) in enumerate(zip(keys, values)):
            self.k[layer][slot, :, :length] = k
            self.v[layer][slot, :, :length] = v

    def move(self, src: int, dst: int, length: int) -> None:
        for buffers in (self.k, self.v):
            for buf in buffers:
                buf[dst, :, :length] = buf[src, :, :length]

    def begin_step(self, positions: torch.Tensor) -> None:
        """Rows 0..n-1 write their new K/V at `positions[i]` in the coming forward."""
        self._n = positions.shape[0]
        self._kv_len = int(positions.max()) + 1
        self.reserve(self._kv_len)
        # where row i, head h, position positions[i] lies in a layer's buffer seen as [slots * heads * capacity, hd]
        heads = self.k[0].shape[1]
        rows = torch.arange(self._n, device=positions.device)[:, None] * heads
        self._flat = ((rows + torch.arange(heads, device=positions.device)) * self.capacity + positions[:, None]).reshape(-1)

    # -- the part of transformers' Cache interface the attention layers call --------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write each row's new K and V ([n, kv_heads, 1, hd]); return the batch's cache up to the longest row."""
        k, v = self.k[layer_idx], self.v[layer_idx]
        dim = k.shape[-1]
        k.view(-1, dim).index_copy_(0, self._flat, key_states.reshape(-1, dim))
        v.view(-1, dim).index_copy_(0, self._flat, value_states.reshape(-1, dim))
        return k[: self._n, :, : self._kv_len], v[: self._n, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len - 1


def cache_layers(cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """K and V per layer from a transformers DynamicCache (new `layers` API or the older lists)."""
    if hasattr(cache, "layers"):
        return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
    return list(cache.key_cache), list(cache.value_cache)


def padded_inputs(suffixes: list[list[int]], past: list[int], pad_id: int, device) -> dict:
    """Inputs for one prefill of several prompts: row i has `past[i]` tokens already in the cache (left-padded
    to max(past)) and feeds `suffixes[i]` (left-padded to the longest). Each row gets its own positions and a
    mask over [past | suffix] that hides both paddings; a pad query sees only itself (no empty softmax row)."""
    n, P, S = len(suffixes), max(past), max(len(x) for x in suffixes)
    ids = torch.full((n, S), pad_id, dtype=torch.long)
    for i, suffix in enumerate(suffixes):
        ids[i, S - len(suffix):] = torch.tensor(suffix)
    p = torch.tensor(past)
    start = torch.tensor([S - len(x) for x in suffixes])  # first real suffix column
    q = torch.arange(S)
    real_q = q[None, :] >= start[:, None]  # [n, S]
    positions = torch.where(real_q, p[:, None] + q[None, :] - start[:, None], torch.zeros_like(real_q, dtype=torch.long))
    past_ok = torch.arange(P)[None, :] >= (P - p)[:, None]  # [n, P]
    own = (q[None, None, :] <= q[None, :, None]) & (q[None, None, :] >= start[:, None, None])  # [n, S, S]
    own = (own & real_q[:, :, None]) | (torch.eye(S, dtype=torch.bool)[None] & ~real_q[:, :, None])
    mask = torch.cat([past_ok[:, None, :] & real_q[:, :, None], own], dim=-1)
    return {"input_ids": ids.to(device), "position_ids": positions.to(device), "attention_mask": mask[:, None].to(device)}


class PrefixCache:
    """K/V of recent prompts, per adapter. A new prompt reuses the longest token prefix it shares with a
    stored one (causal attention: a prefix's K/V do not depend on what follows), e.g. the system prompt the
    chat template puts in front of every conversation. LRU, bounded by stored tokens."""

    MIN_REUSE = 4  # shorter common prefixes are not worth the bookkeeping
    PER_ADAPTER = 8  # entries kept per adapter, so busy adapters cannot push out the rare ones' prefixes

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.entries: collections.OrderedDict = collections.OrderedDict()  # (adapter, ids) -> (keys, values)
        self.tokens = 0
        self.hits = self.reused_tokens = 0

    def lookup(self, adapter: Optional[str], ids: list[int]) -> tuple[int, Optional[tuple]]:
        """(length, (keys, values)) of the longest stored prefix of `ids` (at most len(ids) - 1 tokens)."""
        best, found, limit = 0, None, len(ids) - 1
        for key in reversed(self.entries):
            if key[0] != adapter:
                continue
            stored = key[1]
            n = 0
            for a, b in zip(stored, ids[:limit]):
                if a != b:
                    break
                n += 1
            if n > best:
                best, found = n, key
        if found is None or best < self.MIN_REUSE:
            return 0, None
        self.entries.move_to_end(found)
        self.hits += 1
        self.reused_tokens += best
        keys, values = self.entries[found]
        return best, ([k[:, :best] for k in keys], [v[:, :best] for v in values])

    def store(self, adapter: Optional[str], ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]):
        key = (adapter, tuple(ids))
        if key in self.entries or len(ids) > self.max_tokens:
            return
        own = [k for k in self.entries if k[0] == adapter]
        if len(own) >= self.PER_ADAPTER:
            self._evict(own[0])  # this adapter's least recently used entry
        self.entries[key] = ([k.clone() for k in keys], [v.clone() for v in values])
        self.tokens += len(ids)
        while self.tokens > self.max_tokens:
            self._evict(next(iter(self.entries)))

    def _evict(self, key) -> None:
        del self.entries[key]
        self.tokens -= len(key[1])

    def drop(self, adapter: Optional[str]) -> None:
        for key in [k for k in self.entries if k[0] == adapter]:
            self._evict(key)


def fill_past(cache, hits, P: int) -> None:
    """Put the reused prefixes (left-padded to P) into a fresh transformers cache, layer by layer."""
    n = len(hits)
    sample = next(kv for length, kv in hits if length)
    for layer in range(len(sample[0])):
        ref = sample[0][layer]
        k = ref.new_zeros(n, ref.shape[0], P, ref.shape[2])
        v = torch.zeros_like(k)
        for i, (length, kv) in enumerate(hits):
            if length:
                k[i, :, P - length:] = kv[0][layer]
                v[i, :, P - length:] = kv[1][layer]
        cache.update(k, v, layer)
