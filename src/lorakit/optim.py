"""The optimizer and the learning-rate schedule of a training run."""

from __future__ import annotations

import math

import torch

from lorakit.errors import TrainError
from lorakit.train_config import TrainConfig


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, scheduler: str = "cosine") -> float:
    """Multiplier of the peak lr at `step`: a linear warmup from 0 over `warmup_steps`, then "cosine" or "linear"
    decay to 0 at `total_steps`, or "constant"."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if scheduler == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(config: TrainConfig, total_steps: int) -> int:
    """The warmup in steps: warmup_steps if given, else warmup_ratio of the run's steps (rounded down)."""
    return config.warmup_steps or int(config.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    warmup = warmup_steps(config, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup, total_steps, config.lr_scheduler))


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters only; with LoRA+, B matrices get their own (higher) lr."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise TrainError("the model has no trainable parameters")
    ratio = None if config.full else config.loraplus_lr_ratio
    is_b = (lambda n: ".lora_B." in n or ".lora_embedding_B." in n) if ratio else (lambda n: False)
    decay = lambda n, p: p.ndim >= 2  # no weight decay on norms and biases
    groups = []
    for b_matrix in (False, True):
        for with_decay in (True, False):
            chosen = [p for n, p in params if is_b(n) == b_matrix and decay(n, p) == with_decay]
            if chosen:
                groups.append({"params": chosen, "lr": config.lr * (ratio if b_matrix else 1.0),
                               "weight_decay": config.weight_decay if with_decay else 0.0})
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)


def clip_gradients(parameters, max_norm: float) -> torch.Tensor:
    """The gradients' total norm, after clipping them to `max_norm` (0: measured, not clipped)."""
    params = [p for p in parameters if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
