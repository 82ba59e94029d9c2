"""add_weighted_adapter: build a new adapter from a weighted combination of existing ones."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional, Sequence

import torch

from .layers import LoraEmbedding, LoraLayer, ModulesToSaveWrapper

COMBINATIONS = ("linear", "cat", "svd")


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) of one adapter, whatever the layer type."""
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _set_factors(layer: LoraLayer, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    target_A, target_B = _factors(layer, name)
    with torch.no_grad():
        target_A.copy_(A.to(target_A.dtype))
        target_B.copy_(B.to(target_B.dtype))


def _combined_rank(layer: LoraLayer, present: list[str], combination: str, svd_rank: Optional[int],
                   max_rank: int) -> int:
    """The new adapter's rank on `layer`; svd's default is the largest rank of the adapters anywhere, so a
    layer where they have a smaller rank (rank_pattern) still holds their sum exactly, as PEFT's does."""
    ranks = [layer.r[n] for n in present]
    if combination == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type='linear' needs adapters of equal rank, got {ranks}; "
                             "use 'cat' or 'svd'.")
        return ranks[0]
    if combination == "cat":
        return sum(ranks)
    return svd_rank or max_rank


def _modules_saved_whole(lora_model, adapters: list[str]) -> dict[str, tuple]:
    """{module name: (its ModulesToSaveWrapper, the adapters that keep a trained copy of it)}."""
    found = {}
    for name, module in lora_model.model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            holders = [a for a in adapters if a in module.modules_to_save]
            if holders:
                found[name] = (module, holders)
    return found


def add_weighted_adapter(lora_model, adapters: Sequence[str], weights: Sequence[float],
                         adapter_name: str, combination_type: str = "svd", svd_rank: Optional[int] = None) -> None:
    """linear: A = sum sqrt(w s) A_i, B = sum sqrt(w s) B_i; cat: stacked along the rank, exactly
    sum w_i s_i B_i A_i; svd: the best rank-k approximation of sum w_i s_i B_i A_i."""
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type={combination_type!r} is not supported; choose one of {COMBINATIONS}.")
    adapters, weights = list(adapters), [float(w) for w in weights]
    if not adapters or len(adapters) != len(weights):
        raise ValueError("add_weighted_adapter needs one weight per adapter and at least one adapter.")
    lora_model.check_adapters(adapters)
    if adapter_name in lora_model.peft_config:
        raise ValueError(f"An adapter named {adapter_name!r} already exists.")
    configs = [lora_model.peft_config[a] for a in adapters]
    if len({c.use_dora for c in configs}) > 1 or configs[0].use_dora:
        raise ValueError("add_weighted_adapter does not combine DoRA adapters (their magnitudes do not add).")

    saved_whole = _modules_saved_whole(lora_model, adapters)
    shared = [name for name, (_, holders) in saved_whole.items() if len(holders) > 1]
    if shared:
        raise ValueError(f"add_weighted_adapter cannot combine modules that several of these adapters train whole "
                         f"(modules_to_save): {', '.join(shared)}. Only LoRA factors can be weighted.")

    layers = [(name, layer) for name, layer in lora_model.lora_layers() if any(a in layer.r for a in adapters)]
    max_rank = max(layer.r[a] for _, layer in layers for a in adapters if a in layer.r)
    plans = {}
    for name, layer in layers:
        present = [a for a in adapters if a in layer.r]
        plans[name] = (layer, present, _combined_rank(layer, present, combination_type, svd_rank, max_rank))
    ranks = {name: plan[2] for name, plan in plans.items()}
    base_rank = max(ranks.values())
    pattern = {f"^{name}$".replace(".", r"\."): rank for name, rank in ranks.items() if rank != base_rank}
    targets = sorted(set(plans))
    config = replace(configs[0], r=base_rank, lora_alpha=base_rank, use_rslora=False,
                     rank_pattern={k[1:-1]: v for k, v in pattern.items()},
                     alpha_pattern={k[1:-1]: v for k, v in pattern.items()},
                     target_modules=targets, exclude_modules=None, layers_to_transform=None, layers_pattern=None,
                     modules_to_save=sorted({c for config in configs for c in config.modules_to_save or []}) or None,
                     init_lora_weights=True, inference_mode=True)
    lora_model.add_adapter(adapter_name, config)
    # A module one adapter trains whole cannot be weighted: the new adapter takes that adapter's copy.
    for wrapper, holders in saved_whole.values():
        if adapter_name in wrapper.modules_to_save:
            wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[holders[0]].state_dict())

    for layer, present, rank in plans.values():
        pairs = [(_factors(layer, a), weights[adapters.index(a)] * layer.scaling[a]) for a in present]
        if combination_type == "linear":
            A = sum(math.copysign(math.sqrt(abs(w)), w) * a for (a, _), w in pairs)
            B = sum(math.sqrt(abs(w)) * b for (_, b), w in pairs)
        elif combination_type == "cat":
            A = torch.cat([math.copysign(math.sqrt(abs(w)), w) * a for (a, _), w in pairs], dim=0)
            B = torch.cat([math.sqrt(abs(w)) * b for (_, b), w in pairs], dim=1)
        else:
            delta = sum(w * (b.float() @ a.float()) for (a, b), w in pairs)
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            k = min(rank, S.numel())
            B = torch.zeros(delta.shape[0], rank, dtype=delta.dtype, device=delta.device)
            A = torch.zeros(rank, delta.shape[1], dtype=delta.dtype, device=delta.device)
            B[:, :k] = U[:, :k] * S[:k]
            A[:k] = Vh[:k]
        _set_factors(layer, adapter_name, A, B)
