"""The adapter of each batch row, for one model call.

A mixed batch (row i runs adapter names[i]) passes its names down with the call, through a context variable,
instead of writing them onto every layer: `with row_adapters(names): model(...)`. Layers read them with
`current_row_adapters()`; outside such a block every row runs the layer's active adapters.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional, Sequence

import torch

BASE_ADAPTER = "__base__"  # the row-adapter name that means "no adapter"


class RowAdapters:
    """Which adapter each batch row runs in one model call (None: the base model)."""

    def __init__(self, names: Sequence[Optional[str]]):
        self.names = tuple(None if n in (None, BASE_ADAPTER) else n for n in names)
        # The adapter every row runs, when they all run the same one: layers then take their one-adapter path.
        self.sole: Optional[str] = self.names[0] if self.names and len(set(self.names)) == 1 else None
        self._masks: dict = {}

    def masks(self, batch: int, device: torch.device) -> dict[Optional[str], torch.Tensor]:
        """{adapter or None: bool [batch] of its rows}. A batch of k times as many rows (generate's
        num_return_sequences or beams) repeats each name k times."""
        key = (batch, device)
        masks = self._masks.get(key)
        if masks is None:
            names = self.names
            if batch != len(names):
                if batch % len(names):
                    raise ValueError(f"adapter_names has {len(names)} entries but the batch has {batch} rows; "
                                     "pass one adapter name per row.")
                names = tuple(n for n in names for _ in range(batch // len(names)))
            masks = self._masks[key] = {n: torch.tensor([m == n for m in names], device=device)
                                        for n in dict.fromkeys(names)}
        return masks


_ROW_ADAPTERS: contextvars.ContextVar[Optional[RowAdapters]] = contextvars.ContextVar("lorakit_row_adapters",
                                                                                      default=None)


# The row adapters of the call running now (None outside a mixed-batch call). A bound method rather than a
# function: layers call it on every forward, and this saves a Python frame per call.
current_row_adapters = _ROW_ADAPTERS.get


@contextlib.contextmanager
def row_adapters(names: Optional[Sequence[Optional[str]]]) -> Iterator[None]:
    """Within the block (this thread or task only), batch row i of a forward runs adapter names[i]."""
    token = _ROW_ADAPTERS.set(RowAdapters(names) if names is not None else None)
    try:
        yield
    finally:
        _ROW_ADAPTERS.reset(token)


def rows_of_owned_adapters(rows: RowAdapters, batch: int, device: torch.device, owned) -> list[tuple[str, torch.Tensor]]:
    """(adapter, its rows) for the batch's adapters that this layer has (`owned`); other rows run the base."""
    return [(name, mask) for name, mask in rows.masks(batch, device).items() if name is not None and name in owned]
