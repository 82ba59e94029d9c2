"""Supervised fine-tuning: LoRA (or full fine-tuning as a baseline) on chat-formatted pairs.

A plain PyTorch loop: AdamW on the trainable parameters, warmup + cosine schedule, gradient
accumulation and clipping, checkpoints that a killed run resumes from with the same result
(lorakit.checkpoints). Started by torchrun, it trains on several processes with PyTorch DDP or FSDP
(lorakit.distributed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from lorakit import distributed
from lorakit.checkpoints import CHECKPOINTS, list_checkpoints, load_checkpoint, whole_trainable, write_checkpoint
from lorakit.config import ALL_LINEAR
from lorakit.data import IGNORE_INDEX, TokenizedData, collate, length_grouped_batches, load_examples, tokenize_examples
from lorakit.errors import LoraKitError, TrainError
from lorakit.fast import takes_fused_loss
from lorakit.io_utils import atomic_save_json, atomic_write, nearest_existing
from lorakit.model import PeftModel
from lorakit.models import DEFAULT_BASE, load_base_model, resolve_device, slow_bf16_warning

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
TRAIN_INFO = "lorakit_train.json"  # next to the adapter: how it was trained (eval reuses the prompt format)


@dataclass
class TrainConfig:
    """Everything a run needs; the CLI flags map one-to-one onto these fields."""

    data: str = ""
    base: str = DEFAULT_BASE
    eval_data: Optional[str] = None
    out: str = "lorakit-out"
    # LoRA
    r: int = 16
    alpha: float = 32.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    dropout: float = 0.05
    dora: bool = False  # DoRA: a learned magnitude per output feature on top of LoRA
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) instead of alpha / r
    # optimisation
    epochs: int = 3
    max_steps: Optional[int] = None  # if set, overrides epochs
    lr: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    bf16: bool = False
    gradient_checkpointing: bool = False
    fsdp: bool = False  # under torchrun: shard the model across the processes (FSDP) instead of copying it (DDP)
    attention: Optional[str] = None  # transformers attn_implementation ("eager", "sdpa"); None: its default
    device: str = "auto"  # "auto": the GPU if there is one, else the CPU; or "cpu", "cuda", "cuda:1"
    loraplus_lr_ratio: Optional[float] = None  # LoRA+: B matrices learn at lr * ratio
    # bookkeeping
    eval_every: int = 0  # steps between eval-loss measurements (0: only at the end)
    save_every: int = 0  # steps between checkpoints (0: none, except on Ctrl-C)
    keep_checkpoints: int = 2
    log_every: int = 1  # steps between metrics.jsonl rows
    progress: bool = True
    # data
    query_field: str = "query"
    response_field: str = "response"
    system_prompt: Optional[str] = None
    max_length: int = 512
    too_long: str = "truncate"  # or "skip"
    # variants
    full: bool = False  # full fine-tuning baseline: all weights train, a full model dir is saved
    quantize: Optional[str] = None  # "nf4": QLoRA, the frozen base is stored in 4 bits
    resume: bool = False

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        _check_field_types(self)
        checks = [
            (bool(self.data), "data: give a training data file (--data)"),
            (self.r > 0, f"r must be a positive integer, got {self.r}"),
            (self.epochs > 0 or (self.max_steps or 0) > 0, "epochs (or max_steps) must be positive"),
            (self.max_steps is None or self.max_steps > 0, f"max_steps must be positive, got {self.max_steps}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.batch_size > 0 and self.grad_accum > 0, "batch_size and grad_accum must be positive"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.max_length > 1, f"max_length must be > 1, got {self.max_length}"),
            (self.too_long in ("truncate", "skip"), f"too_long must be 'truncate' or 'skip', got {self.too_long!r}"),
            (self.quantize in (None, "nf4"), f"quantize must be None or 'nf4', got {self.quantize!r}"),
            (not (self.full and self.quantize), "full fine-tuning cannot train 4-bit weights; drop quantize"),
            (not (self.full and (self.dora or self.rslora)), "dora and rslora are LoRA options; drop them with full"),
            (not (self.fsdp and self.quantize), "fsdp shards floating-point weights, and a 4-bit (quantize nf4) base "
                                                "has none to shard: train QLoRA with DDP (drop fsdp)"),
            (not (self.fsdp and self.full), "fsdp trains LoRA adapters here; run full fine-tuning with DDP (drop fsdp)"),
            (self.loraplus_lr_ratio is None or self.loraplus_lr_ratio > 0, "loraplus_lr_ratio must be positive"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.save_every >= 0 and self.eval_every >= 0,
             f"save_every and eval_every must be >= 0 (0: off), got {self.save_every} and {self.eval_every}"),
            (self.attention in (None, "eager", "sdpa"), f"attention must be 'eager' or 'sdpa', got {self.attention!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainError(message)
        try:
            resolve_device(self.device)
        except LoraKitError as e:
            raise TrainError(str(e)) from None


def _check_field_types(config: TrainConfig) -> None:
    """Each field holds the type it is declared with (a YAML "1e-3" is a string, "no" is not False)."""
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    for f in dataclasses.fields(config):
        value, declared = getattr(config, f.name), f.type
        if declared.startswith("Optional["):
            if value is None:
                continue
            declared = declared[len("Optional["):-1]
        if declared == "str" and isinstance(value, os.PathLike):  # paths: data, out, base ...
            value = os.fspath(value)
            setattr(config, f.name, value)
        if declared == "list[str]":
            ok, expected = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value), "a list of names"
        else:
            kind = {"bool": bool, "int": int, "float": float, "str": str}[declared]
            accepted = (int, float) if kind is float else kind  # an integer is a fine float
            ok = isinstance(value, accepted) and (kind is bool or not isinstance(value, bool))
            expected = names[kind]
        if not ok:
            raise TrainError(f"{f.name} must be {expected}, got {value!r} ({type(value).__name__})")


@dataclass
class TrainResult:
    out: str
    steps: int
    epochs: float  # passes over the training data, fractional
    first_loss: Optional[float]
    final_loss: Optional[float]  # mean train loss over the last 10% of steps
    eval_loss: Optional[float]
    tokens: int  # non-padding tokens processed
    train_seconds: float
    tokens_per_s: float
    trainable_params: int
    interrupted: bool = False
    checkpoint: Optional[str] = None  # last checkpoint written

    def summary(self) -> str:
        first = "?" if self.first_loss is None else f"{self.first_loss:.3f}"
        last = "?" if self.final_loss is None else f"{self.final_loss:.3f}"
        steps = f"{self.steps} step{'' if self.steps == 1 else 's'}"
        text = (f"trained {steps} ({self.epochs:.2f} epochs) in {_duration(self.train_seconds)} "
                f"at {self.tokens_per_s:.0f} tok/s: loss {first} -> {last}")
        if self.eval_loss is not None:
            text += f", eval loss {self.eval_loss:.3f}"
        if self.interrupted:
            return text + f"; interrupted, checkpoint {self.checkpoint} (continue with --resume)"
        return text + f"; saved to {self.out}"


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


# -- schedule and optimizer --------------------------------------------------------------------------

def lr_lambda(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr: linear warmup from 0, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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


# -- loss --------------------------------------------------------------------------------------------

def _supports_logits_to_keep(model: torch.nn.Module) -> bool:
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def batch_loss(model, batch: dict[str, torch.Tensor], logits_to_keep: bool = True,
               runner: Optional[torch.nn.Module] = None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over response tokens, and how many response tokens there are.

    `runner` is what is called for the forward when it is not `model` itself (DDP around it).
    """
    runner = model if runner is None else runner
    device = _device(model)
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    labels = batch["labels"]
    targets = labels != IGNORE_INDEX
    n = int(targets.sum())
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if n and isinstance(model, PeftModel) and takes_fused_loss(model, {**inputs, "labels": labels}):
        # The fused head + cross-entropy (lorakit.fast): no logit is formed for a prompt token, and
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
            with _autocast(bf16, _device(model).type):
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
    keep = _supports_logits_to_keep(model)
    starts = range(0, len(order), batch_size)
    # Every process runs the same number of forwards (FSDP gathers weights in each): one without a
    # batch of its own in the last round runs the first batch and does not count it.
    rounds = math.ceil(len(starts) / world.size)
    for index in range(world.rank, rounds * world.size, world.size):
        i = starts[index] if index < len(starts) else 0
        batch = collate([data.items[j] for j in order[i:i + batch_size]], pad_token_id)
        with _autocast(bf16, _device(model).type):
            loss, n = batch_loss(model, batch, keep)
        if index < len(starts):
            total += float(loss)
            count += n
    model.train(was_training)
    total, count = distributed.sum_across(world, [total, count], _device(model))
    return total / max(count, 1)


def _autocast(bf16: bool, device_type: str = "cpu"):
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _device(model) -> torch.device:
    return next(model.parameters()).device


# -- the run -----------------------------------------------------------------------------------------

class _StopFlag:
    """Ctrl-C or SIGTERM asks the loop to checkpoint and stop after the current step; a second Ctrl-C aborts.

    SIGTERM is what torchrun sends its processes on Ctrl-C, and what job schedulers send before a kill.
    """

    def __init__(self, who: str = "lorakit"):
        self.requested = False
        self.who = who
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            what = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            print(f"\n{self.who}: {what}: saving a checkpoint after this step (Ctrl-C again to abort)", flush=True)
        self.requested = True

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def prepare_model(config: TrainConfig, device: Optional[torch.device] = None):
    """Load the base, optionally quantize it, and make the parameters that should train trainable."""
    from lorakit import LoraConfig, get_peft_model

    # A frozen base needs no float32 master weights: under bf16 autocast every matmul runs in bf16
    # anyway, and bf16 weights spare autocast re-casting each one on every call. LoRA weights (and a
    # fully trained model) stay float32.
    frozen_bf16 = config.bf16 and not config.full
    dtype = torch.bfloat16 if frozen_bf16 and not config.quantize else torch.float32
    device = resolve_device(config.device) if device is None else device
    model, tokenizer = load_base_model(config.base, dtype=dtype, device=device, attention=config.attention)
    if config.quantize:
        from lorakit.quant import quantize_model

        model = quantize_model(model, config.quantize)  # from the float32 weights
        if frozen_bf16:
            model.to(torch.bfloat16)  # NF4 layers then dequantize straight to bf16; their constants stay fp32
    torch.manual_seed(config.seed)  # LoRA A matrices are initialised randomly
    if config.full:
        model.requires_grad_(True)
    else:
        _check_every_target_exists(model, config.targets)
        targets = ALL_LINEAR if list(config.targets) == [ALL_LINEAR] else list(config.targets)
        lora = LoraConfig(r=config.r, lora_alpha=config.alpha, target_modules=targets,
                          lora_dropout=config.dropout, use_dora=config.dora, use_rslora=config.rslora,
                          task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    if config.gradient_checkpointing:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        # Non-reentrant checkpointing: it backpropagates into a segment whose inputs need no grad (the
        # frozen embedding's output), and DDP takes it as it is (reentrant needs DDP's static graph,
        # which then fails with gradient accumulation's no_sync).
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def _check_every_target_exists(model, targets: list[str]) -> None:
    """Each --targets name must name a module: a typo beside a correct name would otherwise just be skipped."""
    from lorakit.inject import candidate_names

    if list(targets) == [ALL_LINEAR]:
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise TrainError(f"--targets {', '.join(missing)}: no module of this model has that name. Modules LoRA can "
                         f"wrap here: {', '.join(candidate_names(model))} (or all-linear).")


def load_data(config: TrainConfig, tokenizer, path: str) -> TokenizedData:
    examples = load_examples(path, config.query_field, config.response_field, system_prompt=config.system_prompt)
    return tokenize_examples(tokenizer, examples, config.max_length, config.too_long)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a fine-tuning job; the final adapter (or full model) is written to config.out.

    Started by torchrun, every process calls this: they train together with DDP, process 0 writes
    the files, and all of them return the same result.
    """
    world = distributed.world_from_env()
    if config.fsdp and not world.is_distributed:
        raise TrainError("fsdp shards the model across torchrun's processes, and this is a single process: start "
                         "it with torchrun --nproc-per-node N (N >= 2), or drop --fsdp")
    device = distributed.process_device(world, resolve_device(config.device))
    started = distributed.start(world, device)
    try:
        return _train(config, world, device)
    finally:
        if started:
            distributed.stop(world)


def _check_out_dir(out: Path) -> None:
    """Fail before any loading when the run could not write its results."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file; training writes a directory there. Choose another --out.")
    existing = nearest_existing(out)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrainError(f"--out {out}: {existing} is not writable by this user. Choose another --out, or fix "
                         "its permissions.")


def _train(config: TrainConfig, world: distributed.World, device: torch.device) -> TrainResult:
    out = Path(config.out)
    _check_out_dir(out)
    checkpoints = list_checkpoints(out)
    finished = (out / TRAIN_INFO).is_file()
    if (checkpoints or finished) and not config.resume:
        what = "the result of a finished run" if finished else f"checkpoints of an earlier run ({checkpoints[-1].name})"
        raise TrainError(f"{out} already holds {what}; choose another --out (or delete it)"
                         + ("" if finished else ", or pass --resume to continue that run"))
    random.seed(config.seed)
    np.random.seed(config.seed)
    main = world.is_main
    say = print if main else (lambda *args, **kwargs: None)
    if not main:  # one set of progress bars (transformers' weight loading), from process 0
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()

    # Data first: a bad row must fail before minutes go into loading the model.
    from lorakit.models import load_tokenizer

    with distributed.main_first(world):  # the first load of the embedded model fills the cache
        tokenizer = load_tokenizer(config.base)
    train_data = load_data(config, tokenizer, config.data)
    eval_data = load_data(config, tokenizer, config.eval_data) if config.eval_data else None
    say(f"lorakit: train data {config.data}: {train_data.summary()}", flush=True)
    if eval_data is not None:
        say(f"lorakit: eval data {config.eval_data}: {eval_data.summary()}", flush=True)
    warning = slow_bf16_warning(device) if config.bf16 and main else None
    if warning:
        say(warning, flush=True)

    # FSDP: process 0 loads the base on the CPU; the others build it on the meta device (no memory) and
    # receive their shards of process 0's weights when it is sharded.
    load_on = device if not config.fsdp else torch.device("cpu" if world.is_main else "meta")
    model, tokenizer = prepare_model(config, load_on)
    if world.rank:  # every process starts from the same LoRA weights, but draws its own dropout masks
        torch.manual_seed(config.seed + world.rank)
    parallel = distributed.wrap(model, world, device, config.fsdp)
    if world.is_distributed:
        say(f"lorakit: {world.size} processes (torchrun), {'FSDP' if config.fsdp else 'DDP'} over {device.type}; "
            f"each micro-batch of {config.batch_size} examples is shared among them", flush=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pad_id = tokenizer.pad_token_id
    keep = _supports_logits_to_keep(model)
    lengths = train_data.lengths
    response_tokens = [sum(1 for t in item["labels"] if t != IGNORE_INDEX) for item in train_data.items]

    batches_per_epoch = len(length_grouped_batches(lengths, config.batch_size, config.seed, 0))
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    warmup_steps = int(config.warmup_ratio * total_steps)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, warmup_steps, total_steps))

    data_fingerprint = train_data.fingerprint()
    position = {"step": 0, "epoch": 0, "batch": 0, "tokens": 0, "train_seconds": 0.0, "data": data_fingerprint}
    metrics_path = out / "metrics.jsonl"
    if config.resume and checkpoints:
        position = load_checkpoint(checkpoints[-1], model, optimizer, scheduler, config, world)
        if position.setdefault("data", data_fingerprint) != data_fingerprint:  # older checkpoints have none
            raise TrainError(f"cannot resume from {checkpoints[-1]}: the training data ({config.data}) has changed "
                             "since the interrupted run (other rows, or rows tokenized differently), so its "
                             "batches would not continue that run. Restore the original data, or start a new --out.")
        say(f"lorakit: resuming from {checkpoints[-1]} (step {position['step']}/{total_steps})", flush=True)
        kept = [r for r in _read_jsonl(metrics_path) if r.get("step", 0) <= position["step"]]
    else:
        if config.resume:
            say(f"lorakit: no checkpoint in {out / CHECKPOINTS}; starting from scratch", flush=True)
        kept = []
    distributed.barrier(world)  # all have read the old metrics before process 0 rewrites them
    if main:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_write(metrics_path, "w") as f:  # drop rows a killed run wrote after its last checkpoint
            f.writelines(json.dumps(r) + "\n" for r in kept)
    losses = [r["loss"] for r in kept if "loss" in r]
    last_eval = next((r["eval_loss"] for r in reversed(kept) if "eval_loss" in r), None)
    last_checkpoint = str(checkpoints[-1]) if config.resume and checkpoints else None

    model.train()
    plan_epoch, plan = -1, []
    bar = _progress(config.progress and main, total_steps, position["step"])
    interrupted = False
    who = f"lorakit (process {world.rank})" if world.is_distributed else "lorakit"
    with _StopFlag(who) as stop, contextlib.ExitStack() as files:
        metrics = files.enter_context(open(metrics_path, "a")) if main else None
        while position["step"] < total_steps:
            if plan_epoch != position["epoch"]:
                plan_epoch = position["epoch"]
                plan = length_grouped_batches(lengths, config.batch_size, config.seed, plan_epoch)
            micro = plan[position["batch"]:position["batch"] + config.grad_accum]
            batches = [_collate_share(train_data, idx, world, pad_id) for idx in micro]
            t0 = time.perf_counter()
            step_loss = accumulate_gradients(model, batches, config.bf16, keep, parallel,
                                             n_targets=sum(response_tokens[i] for idx in micro for i in idx))
            grad_norm = distributed.full(torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], config.max_grad_norm))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # The processes' parts of the loss, and whether any of them was asked to stop.
            step_loss, stop_votes = distributed.sum_across(world, [step_loss, float(stop.requested)], device)
            dt = time.perf_counter() - t0
            n_tokens = sum(lengths[i] for idx in micro for i in idx)

            position["step"] += 1
            position["tokens"] += n_tokens
            position["train_seconds"] += dt
            position["batch"] += len(micro)
            if position["batch"] >= len(plan):
                position["epoch"] += 1
                position["batch"] = 0
            step = position["step"]
            losses.append(step_loss)
            row = {"step": step, "epoch": round(position["epoch"] + position["batch"] / len(plan), 4),
                   "loss": round(step_loss, 6), "lr": lr, "grad_norm": round(float(grad_norm), 6),
                   "tokens_per_s": round(n_tokens / dt, 1)}
            if eval_data is not None and config.eval_every and step % config.eval_every == 0 and step < total_steps:
                last_eval = eval_loss(model, eval_data, pad_id, 2 * config.batch_size, config.bf16, world)
                row["eval_loss"] = round(last_eval, 6)
            if metrics is not None and (step % config.log_every == 0 or "eval_loss" in row):
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.1e}",
                            tok_s=f"{position['tokens'] / max(position['train_seconds'], 1e-9):.0f}")
            stopping = stop_votes > 0
            if stopping or (config.save_every and step % config.save_every == 0 and step < total_steps):
                last_checkpoint = write_checkpoint(out, model, optimizer, scheduler, position, config, world)
            if stopping:
                interrupted = True
                break
    bar.close()

    if not interrupted:
        if eval_data is not None:
            last_eval = eval_loss(model, eval_data, pad_id, 2 * config.batch_size, config.bf16, world)
            if main:
                with open(metrics_path, "a") as metrics:
                    metrics.write(json.dumps({"step": position["step"], "eval_loss": round(last_eval, 6)}) + "\n")
        gathered = whole_trainable(model) if config.fsdp else None
        if main:
            _save_final(model, tokenizer, out, config, gathered)
    tail = losses[-max(1, len(losses) // 10):]
    seconds = position["train_seconds"]
    result = TrainResult(
        out=str(out), steps=position["step"], epochs=position["epoch"] + position["batch"] / max(len(plan), 1),
        first_loss=losses[0] if losses else None, final_loss=sum(tail) / len(tail) if losses else None,
        eval_loss=last_eval, tokens=position["tokens"], train_seconds=seconds,
        tokens_per_s=position["tokens"] / max(seconds, 1e-9), trainable_params=trainable,
        interrupted=interrupted, checkpoint=last_checkpoint)
    if main:
        from lorakit.plotting import plot_loss_curve

        plot_loss_curve(metrics_path, out / "loss_curve.png")
        if not interrupted:
            atomic_save_json({"config": dataclasses.asdict(config), "result": dataclasses.asdict(result)},
                             out / TRAIN_INFO)
    distributed.barrier(world)  # no process returns before the files are there
    return result


def _collate_share(data: TokenizedData, indices: list[int], world: distributed.World,
                   pad_id: int) -> dict[str, torch.Tensor]:
    """This process's rows of one micro-batch (all of them for a single process), collated."""
    rows, stand_in = distributed.share(indices, world)
    batch = collate([data.items[i] for i in rows], pad_id)
    if stand_in:
        batch["labels"].fill_(IGNORE_INDEX)  # runs forward and backward for DDP, adds nothing
    return batch


def _save_final(model, tokenizer, out: Path, config: TrainConfig, gathered: Optional[dict] = None) -> None:
    if config.full:
        model.save_pretrained(out)  # a complete model directory, loadable as --base
        tokenizer.save_pretrained(out)
    else:  # adapter_config.json + adapter_model.safetensors (under FSDP from the gathered weights)
        model.save_pretrained(out, state_dict=gathered)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a kill
            rows.append(json.loads(line))
    return rows


def _progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def read_train_info(adapter_dir: str | os.PathLike) -> Optional[dict]:
    """The lorakit_train.json written next to an adapter, if any."""
    path = Path(adapter_dir) / TRAIN_INFO
    return json.loads(path.read_text()) if path.is_file() else None
