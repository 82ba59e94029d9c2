"""Mixed-adapter LoRA for the decode loop: per layer, one concatenated A and B for the adapters in the batch.

For the adapters a_1..a_k that a step uses, each LoRA layer gets A_cat = [A_1; ...; A_k] (sum(r) x in)
and B_cat = [s_1 B_1, ..., s_k B_k] (out x sum(r)). Row i's update is ((x_i A_cat^T) * m_i) B_cat^T, where
the 0/1 mask m_i keeps only the rank columns of row i's adapter (all zero for a base-model row). That is
two small matmuls and a multiply per layer whatever the mix of adapters, with no per-row copy of weights
(the generic `adapter_names=` path stacks and gathers every adapter's A and B in every layer on every
call). The concatenations are cached per set of adapters; the set changes only when a request for a new
adapter joins the batch or the last request of one leaves.

The LoRA layers run with adapters disabled (base weights only) and a forward hook adds the update, so
nothing in lorakit's layers changes. Adapters this cannot express (DoRA, LoRA on embeddings,
modules_to_save) make `supports()` false and the engine uses the generic path.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Iterator, Optional, Sequence

import torch


class MixedLora:
    def __init__(self, model, max_cached_sets: int = 8):
        self.model = model  # a lorakit PeftModel
        self.max_cached_sets = max_cached_sets
        self._plans: collections.OrderedDict = collections.OrderedDict()
        self._step: Optional[dict] = None  # id(layer) -> (A_cat, B_cat, mask) during one forward
        self._handles: list = []
        self._layers: list = []
        self._plain: dict[str, bool] = {}
        self.refresh()

    def refresh(self) -> None:
        """Call after adapters are loaded or deleted: re-scan the layers, drop cached concatenations."""
        from lorakit.layers import LoraLayer, LoraLinear, ModulesToSaveWrapper

        for handle in self._handles:
            handle.remove()
        self._plans.clear()
        self._layers = [m for m in self.model.modules() if isinstance(m, LoraLinear)]
        # Every module that applies an adapter, switched off for a forward of the base weights. (The model's
        # disable_adapter() walks the whole module tree twice, ~10 ms per call here: too slow per step.)
        self._switches = [m for m in self.model.modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper))]
        self._handles = [layer.register_forward_hook(self._hook) for layer in self._layers]
        others = [m for m in self.model.modules() if isinstance(m, LoraLayer) and not isinstance(m, LoraLinear)]
        plain = {}
        for name, config in self.model.peft_config.items():
            plain[name] = (not getattr(config, "modules_to_save", None)
                           and not any(layer.use_dora.get(name) for layer in self._layers)
                           and not any(name in layer.r for layer in others))
        self._plain = plain

    def supports(self, names: Sequence[Optional[str]]) -> bool:
        return all(n is None or self._plain.get(n, False) for n in names)

    @contextlib.contextmanager
    def rows(self, names: Sequence[Optional[str]]) -> Iterator[None]:
        """Within the block, a forward of the model applies adapter names[i] to batch row i."""
        used = tuple(sorted({n for n in names if n is not None}))
        plan = self._plan(used)
        masks: dict[tuple, torch.Tensor] = {}
        step = {}
        for key, (layout, A, B) in plan.items():
            mask = masks.get(layout)
            if mask is None:
                mask = masks[layout] = _row_mask(layout, names, A.dtype, A.device)
            step[key] = (A, B, mask)
        self._step = step
        try:
            with self.base_only():
                yield
        finally:
            self._step = None

    @contextlib.contextmanager
    def base_only(self) -> Iterator[None]:
        """Within the block, the model's own adapter code is off (the base weights alone run)."""
        for module in self._switches:
            module.disable_adapters = True
        try:
            yield
        finally:
            for module in self._switches:
                module.disable_adapters = False

    def _plan(self, used: tuple[str, ...]) -> dict:
        plan = self._plans.get(used)
        if plan is not None:
            self._plans.move_to_end(used)
            return plan
        plan = {}
        with torch.no_grad():
            for layer in self._layers:
                here = [n for n in used if n in layer.r]
                if not here:
                    continue
                # Stored transposed ([in, R] and [R, out]) for plain row-major matmuls.
                A_t = torch.cat([layer.lora_A[n].weight for n in here]).t().contiguous()
                B_t = torch.cat([layer.lora_B[n].weight * layer.scaling[n] for n in here], dim=1).t().contiguous()
                plan[id(layer)] = (tuple((n, layer.r[n]) for n in here), A_t, B_t)
        self._plans[used] = plan
        while len(self._plans) > self.max_cached_sets:
            self._plans.popitem(last=False)
        return plan

    def _hook(self, layer, inputs, output):
        step = self._step
        if step is None:
            return None
        entry = step.get(id(layer))
        if entry is None:
            return None
        A_t, B_t, mask = entry
        x = inputs[0]
        h = x.reshape(-1, x.shape[-1]).to(A_t.dtype) @ A_t  # [rows * tokens, R]
        h.view(mask.shape[0], -1, h.shape[-1]).mul_(mask[:, None, :])
        if output.dtype == B_t.dtype and output.is_contiguous():  # the base output is ours: add in place
            output.view(-1, output.shape[-1]).addmm_(h, B_t)
            return output
        return output + (h @ B_t).view(output.shape).to(output.dtype)


def _row_mask(layout: tuple, names: Sequence[Optional[str]], dtype, device) -> torch.Tensor:
    """[rows, sum(r)]: 1 on the rank columns of each row's adapter in `layout`, else 0."""
    offsets, total = {}, 0
    for name, r in layout:
        offsets[name] = (total, total + r)
        total += r
    mask = torch.zeros(len(names), total, dtype=dtype, device=device)
    for i, name in enumerate(names):
        span = offsets.get(name)
        if span is not None:
            mask[i, span[0]: span[1]] = 1
    return mask
