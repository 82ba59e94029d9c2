"""The loss over response tokens: of one batch, of a training step (with its backward), of a whole eval set."""

from __future__ import annotations

import inspect
import math
from typing import Optional

import torch
import torch.nn.functional as F

from lorakit import distributed
from lorakit.data import IGNORE_INDEX, TokenizedData, collate
from lorakit.fused_loss import takes_fused_loss
from lorakit.model import PeftModel, unwrapped
from lorakit.precision import autocast


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def supports_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(unwrapped(model).forward).parameters


def batch_loss(model, batch: dict[str, torch.Tensor], logits_to_keep: bool = True,
               runner: Optional[torch.nn.Module] = None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over response tokens, and how many response tokens there are.

    `runner` is what is called for the forward when it is not `model` itself (DDP around it).
    """
    runner = model if runner is None else runner
    device = model_device(model)
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    labels = batch["labels"]
    targets = labels != IGNORE_INDEX
    n = int(targets.sum())
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if n and isinstance(model, PeftModel) and takes_fused_loss(model, {**inputs, "labels": labels}):
        # The fused head + cross-entropy (lorakit.fused_loss): no logit is formed for a prompt token, and
        # none is kept for the backward. Its loss is the sum over targets / num_items_in_batch.
        loss = runner(**inputs, labels=labels, num_items_in_batch=n).loss
        return loss * n, n
    start = 0
    kwargs = {}
    if logits_to_keep and n:
        # The vocabulary projection is the costliest single matmul of a small model; skip it for the
        # prompt positions that no label looks at.
        start = max(0, int(targets.any(0).nonzero()[0]) - 1)
        kwargs["logits_to_keep"] = labels.shape[1] - start
    logits = runner(**inputs, **kwargs).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, start + 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, n


def accumulate_gradients(model, batches: list[dict[str, torch.Tensor]], bf16: bool = False,
                         logits_to_keep: bool = True, parallel: Optional[torch.nn.Module] = None,
                         n_targets: Optional[int] = None) -> float:
    """Backpropagate the mean response-token loss over all micro-batches of one step; returns that loss.

    Under torchrun (`parallel`: DDP around `model`, or `model` sharded by FSDP), `batches` are this
    process's shares of the step, `n_targets` counts the response tokens of the whole step on all
    processes, and the value returned is this process's part of the mean (the parts sum to the loss).
    """
    # Normalising by the response tokens of the whole step (not of each micro-batch, nor of each
    # process's share) makes accumulation and DDP give the same gradient as one big batch.
    if n_targets is None:
        n_targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    n_targets = max(1, n_targets)
    # DDP and FSDP average the processes' gradients; scaling by their number turns that into the sum.
    scale = torch.distributed.get_world_size() if parallel is not None else 1
    total = 0.0
    for i, batch in enumerate(batches):
        with distributed.no_sync(parallel, i < len(batches) - 1):  # reduce once, after the last micro-batch
            with autocast(bf16, model_device(model).type):
                loss_sum, _ = batch_loss(model, batch, logits_to_keep, runner=parallel)
            (loss_sum * (scale / n_targets)).backward()
        total += loss_sum.item()
    return total / n_targets


@torch.no_grad()
def eval_loss(model, data: TokenizedData, pad_token_id: int, batch_size: int = 16, bf16: bool = False,
              world: distributed.World = distributed.World()) -> float:
    """Mean cross-entropy per response token over a whole tokenized set (its batches dealt out over `world`)."""
    was_training = model.training
    model.eval()
    lengths = data.lengths
    order = sorted(range(len(data)), key=lambda i: lengths[i])  # similar lengths: less padding
    total, count = 0.0, 0
    keep = supports_logits_to_keep(model)
    starts = range(0, len(order), batch_size)
    # Every process runs the same number of forwards (FSDP gathers weights in each): one without a
    # batch of its own in the last round runs the first batch and does not count it.
    rounds = math.ceil(len(starts) / world.size)
    for index in range(world.rank, rounds * world.size, world.size):
        i = starts[index] if index < len(starts) else 0
        batch = collate([data.items[j] for j in order[i:i + batch_size]], pad_token_id)
        with autocast(bf16, model_device(model).type):
            loss, n = batch_loss(model, batch, keep)
        if index < len(starts):
            total += float(loss)
            count += n
    model.train(was_training)
    total, count = distributed.sum_across(world, [total, count], model_device(model))
    return total / max(count, 1)
