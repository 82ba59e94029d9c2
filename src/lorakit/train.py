"""Supervised fine-tuning: LoRA (or full fine-tuning as a baseline) on chat-formatted pairs.

A plain PyTorch loop: AdamW on the trainable parameters, warmup + a decaying schedule, gradient accumulation
and clipping, checkpoints that a killed run resumes from with the same result (lorakit.checkpoints). Started
by torchrun, it trains on several processes with PyTorch DDP or FSDP (lorakit.distributed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lorakit import distributed
from lorakit.adapter_folder import (BEST_NAME, CHECKPOINTS_NAME, LAST_NAME, LOSS_PLOT_NAME, METRICS_NAME,
                                    TRAIN_RECORD_NAME, write_train_record)
from lorakit.checkpoints import (disk_errors, list_checkpoints, load_checkpoint, remove_unfinished, whole_trainable,
                                 write_checkpoint)
from lorakit.config import ALL_LINEAR
from lorakit.data import IGNORE_INDEX, TokenizedData, collate, load_examples, tokenize_examples, training_batches
from lorakit.errors import TrainError
from lorakit.io_utils import atomic_write, nearest_existing
from lorakit.loss import accumulate_gradients, eval_loss, supports_logits_to_keep
from lorakit.model import get_peft_model, unwrapped
from lorakit.models import load_base_model, load_tokenizer, resolve_device
from lorakit.optim import build_optimizer, build_scheduler, clip_gradients
from lorakit.precision import slow_bf16_warning
from lorakit.train_config import TrainConfig, TrainResult, lora_recipe

__all__ = ["TrainConfig", "TrainResult", "TrainError", "lora_recipe", "train", "prepare_model", "load_data"]


@dataclass
class RunState:
    """Where a run is: what a checkpoint records so that a resumed run continues exactly."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # micro-batches of this epoch already trained
    tokens: int = 0  # non-padding tokens trained on
    train_seconds: float = 0.0
    data: str = ""  # fingerprint of the tokenized training data
    best_step: Optional[int] = None  # keep_best: the step of the lowest eval loss so far, its adapter in best/
    best_eval_loss: Optional[float] = None


def prepare_model(config: TrainConfig, device: Optional[torch.device] = None):
    """Load the base, optionally quantize it, and make the parameters that should train trainable."""
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
        _check_every_target_exists(model, config.target_names)
        model = get_peft_model(model, config.lora)
    if config.gradient_checkpointing:
        inner = unwrapped(model)
        # Non-reentrant checkpointing: it backpropagates into a segment whose inputs need no grad (the
        # frozen embedding's output), and DDP takes it as it is (reentrant needs DDP's static graph,
        # which then fails with gradient accumulation's no_sync).
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def add_embedding_noise(model: torch.nn.Module, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """NEFTune (Jain et al., 2023): in training mode, the input embeddings get uniform noise,

        e' = e + U(-1, 1) * alpha / sqrt(L * d)        e: (batch, L, d), L the batch's padded length

    so the adapter cannot lean on the exact wording of the training queries. Returns the hook's handle."""
    def noisy(module: torch.nn.Module, inputs, embeddings: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return embeddings
        bound = alpha / math.sqrt(embeddings.shape[1] * embeddings.shape[2])
        return embeddings + torch.empty_like(embeddings).uniform_(-bound, bound)

    return model.get_input_embeddings().register_forward_hook(noisy)  # a PeftModel passes it to its base


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
        return _Run(config, world, device).run()
    finally:
        if started:
            distributed.stop(world)


def _check_out_dir(out: Path, resume: bool) -> list[Path]:
    """Fail before any loading when the run could not write its results; returns the checkpoints there."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file; training writes a directory there. Choose another --out.")
    existing = nearest_existing(out)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrainError(f"--out {out}: {existing} is not writable by this user. Choose another --out, or fix "
                         "its permissions.")
    checkpoints = list_checkpoints(out)
    finished = (out / TRAIN_RECORD_NAME).is_file()
    if (checkpoints or finished) and not resume:
        what = "the result of a finished run" if finished else f"checkpoints of an earlier run ({checkpoints[-1].name})"
        raise TrainError(f"{out} already holds {what}; choose another --out (or delete it)"
                         + ("" if finished else ", or pass --resume to continue that run"))
    return checkpoints


class _Run:
    """One training run: set up (data, model, optimizer, a resumed state), the steps, and the files at the end."""

    def __init__(self, config: TrainConfig, world: distributed.World, device: torch.device):
        self.config, self.world, self.device = config, world, device
        self.out = Path(config.out)
        self.checkpoints = _check_out_dir(self.out, config.resume)
        self.say = print if world.is_main else (lambda *args, **kwargs: None)

    def run(self) -> TrainResult:
        self._set_up()
        with disk_errors(self.out, lambda: self.last_checkpoint):
            interrupted = self._steps()
            if not interrupted:
                self._finish()
            return self._result(interrupted)

    # -- setting up ------------------------------------------------------------------------------------
    def _set_up(self) -> None:
        config, world, say = self.config, self.world, self.say
        random.seed(config.seed)
        np.random.seed(config.seed)
        if not world.is_main:  # one set of progress bars (transformers' weight loading), from process 0
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
        # Data first: a bad row must fail before minutes go into loading the model.
        with distributed.main_first(world):  # the first load of the embedded model fills the cache
            tokenizer = load_tokenizer(config.base)
        self.train_data = load_data(config, tokenizer, config.data)
        self.eval_data = load_data(config, tokenizer, config.eval_data) if config.eval_data else None
        say(f"lorakit: train data {config.data}: {self.train_data.summary()}", flush=True)
        if self.eval_data is not None:
            say(f"lorakit: eval data {config.eval_data}: {self.eval_data.summary()}", flush=True)
        warning = slow_bf16_warning(self.device) if config.bf16 and world.is_main else None
        if warning:
            say(warning, flush=True)

        # FSDP: process 0 loads the base on the CPU; the others build it on the meta device (no memory) and
        # receive their shards of process 0's weights when it is sharded.
        load_on = self.device if not config.fsdp else torch.device("cpu" if world.is_main else "meta")
        self.model, self.tokenizer = prepare_model(config, load_on)
        if config.neftune_alpha:
            add_embedding_noise(self.model, config.neftune_alpha)
        if world.rank:  # every process starts from the same LoRA weights, but draws its own dropout masks
            torch.manual_seed(config.seed + world.rank)
        self.parallel = distributed.wrap(self.model, world, self.device, config.fsdp)
        if world.is_distributed:
            say(f"lorakit: {world.size} processes (torchrun), {'FSDP' if config.fsdp else 'DDP'} over "
                f"{self.device.type}; each micro-batch of {config.batch_size} examples is shared among them", flush=True)
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.logits_to_keep = supports_logits_to_keep(self.model)
        self.response_tokens = [sum(1 for t in item["labels"] if t != IGNORE_INDEX) for item in self.train_data.items]

        batches_per_epoch = len(self._batches(0))
        steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
        self.total_steps = config.max_steps or config.epochs * steps_per_epoch
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self._resume_or_start()

    def _resume_or_start(self) -> None:
        config, out = self.config, self.out
        fingerprint = self.train_data.fingerprint()
        self.state = RunState(data=fingerprint)
        metrics_path = out / METRICS_NAME
        last = self.checkpoints[-1] if config.resume and self.checkpoints else None
        if last is not None:
            saved = load_checkpoint(last, self.model, self.optimizer, self.scheduler, config, self.world)
            self.state = RunState(**{"data": fingerprint, **saved})  # older checkpoints have no fingerprint
            if self.state.data != fingerprint:
                raise TrainError(f"cannot resume from {last}: the training data ({config.data}) has changed since "
                                 "the interrupted run (other rows, or rows tokenized differently), so its batches "
                                 "would not continue that run. Restore the original data, or start a new --out.")
            self.say(f"lorakit: resuming from {last} (step {self.state.step}/{self.total_steps})", flush=True)
            kept = [r for r in _read_jsonl(metrics_path) if r.get("step", 0) <= self.state.step]
        else:
            if config.resume:
                self.say(f"lorakit: no checkpoint in {out / CHECKPOINTS_NAME}; starting from scratch", flush=True)
            kept = []
        distributed.barrier(self.world)  # all have read the old metrics before process 0 rewrites them
        if self.world.is_main:
            out.mkdir(parents=True, exist_ok=True)
            remove_unfinished(out)
            with atomic_write(metrics_path, "w") as f:  # drop rows a killed run wrote after its last checkpoint
                f.writelines(json.dumps(r) + "\n" for r in kept)
        self.losses = [r["loss"] for r in kept if "loss" in r]
        self.last_eval = next((r["eval_loss"] for r in reversed(kept) if "eval_loss" in r), None)
        self.last_checkpoint = str(last) if last is not None else None

    # -- the steps -------------------------------------------------------------------------------------
    def _steps(self) -> bool:
        """Train until the last step, or until Ctrl-C / SIGTERM asks to stop (True: stopped, with a checkpoint)."""
        config, state, world = self.config, self.state, self.world
        self.model.train()
        plan_epoch, self.plan = -1, []
        bar = _progress(config.progress and world.is_main, self.total_steps, state.step)
        who = f"lorakit (process {world.rank})" if world.is_distributed else "lorakit"
        with _StopFlag(who) as stop, contextlib.ExitStack() as files:
            metrics = files.enter_context(open(self.out / METRICS_NAME, "a")) if world.is_main else None
            while state.step < self.total_steps:
                if plan_epoch != state.epoch:
                    plan_epoch = state.epoch
                    self.plan = self._batches(plan_epoch)
                row, stopping = self._step(stop)
                if metrics is not None and (state.step % config.log_every == 0 or "eval_loss" in row):
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}",
                                tok_s=f"{state.tokens / max(state.train_seconds, 1e-9):.0f}")
                if stopping or (config.save_every and state.step % config.save_every == 0
                                and state.step < self.total_steps):
                    self.last_checkpoint = write_checkpoint(self.out, self.model, self.optimizer, self.scheduler,
                                                            dataclasses.asdict(state), config, world)
                if stopping:
                    bar.close()
                    return True
        bar.close()
        return False

    def _batches(self, epoch: int) -> list[list[int]]:
        config = self.config
        return training_batches(self.train_data.lengths, config.batch_size, config.seed, epoch, config.group_by_length,
                                tolerance=config.length_tolerance)

    def _step(self, stop: "_StopFlag") -> tuple[dict, bool]:
        """One optimizer step over the next grad_accum micro-batches; its metrics row, and whether to stop."""
        config, state, world, lengths = self.config, self.state, self.world, self.train_data.lengths
        micro = self.plan[state.batch:state.batch + config.grad_accum]
        batches = [_collate_share(self.train_data, idx, world, self.tokenizer.pad_token_id) for idx in micro]
        t0 = time.perf_counter()
        step_loss = accumulate_gradients(self.model, batches, config.bf16, self.logits_to_keep, self.parallel,
                                         n_targets=sum(self.response_tokens[i] for idx in micro for i in idx))
        grad_norm = distributed.full(clip_gradients(self.model.parameters(), config.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The processes' parts of the loss, and whether any of them was asked to stop.
        step_loss, stop_votes = distributed.sum_across(world, [step_loss, float(stop.requested)], self.device)
        dt = time.perf_counter() - t0
        n_tokens = sum(lengths[i] for idx in micro for i in idx)
        if not (math.isfinite(step_loss) and math.isfinite(float(grad_norm))):
            self._stop_on_nan(state.step + 1, step_loss, float(grad_norm))

        state.step += 1
        state.tokens += n_tokens
        state.train_seconds += dt
        state.batch += len(micro)
        if state.batch >= len(self.plan):
            state.epoch += 1
            state.batch = 0
        self.losses.append(step_loss)
        row = {"step": state.step, "epoch": round(state.epoch + state.batch / len(self.plan), 4),
               "loss": round(step_loss, 6), "lr": lr, "grad_norm": round(float(grad_norm), 6),
               "tokens_per_s": round(n_tokens / dt, 1)}
        # keep_best without eval_every: an eval at each epoch's end (the last step's eval is _finish's)
        due = state.step % config.eval_every == 0 if config.eval_every else config.keep_best and state.batch == 0
        if self.eval_data is not None and due and state.step < self.total_steps:
            row.update(self._evaluate())
        return row, stop_votes > 0

    def _stop_on_nan(self, step: int, loss: float, grad_norm: float) -> None:
        """A loss or gradient that is not a number: stop before anything of this step is written (no metrics row,
        no checkpoint, no adapter), naming the step and the checkpoint to go back to."""
        back = (f"The last good checkpoint is {self.last_checkpoint}: resume from it with --resume and a lower --lr "
                "(or check the data around this step)" if self.last_checkpoint else
                "No checkpoint had been written yet: start again with a lower --lr (or check the data), and "
                "--save-every to keep checkpoints")
        raise TrainError(f"the loss at step {step} is {loss} (gradient norm {grad_norm}): training stopped without "
                         f"saving the adapter. {back}.")

    def _evaluate(self, final: bool = False) -> dict:
        """Measure the eval loss; with keep_best, a new lowest one is noted and (but for the final step, which
        _finish saves) its adapter written to best/. The metrics row's part."""
        self.last_eval = self._eval_loss()
        row = {"eval_loss": round(self.last_eval, 6)}
        state = self.state
        if self.config.keep_best and (state.best_eval_loss is None or self.last_eval < state.best_eval_loss):
            state.best_step, state.best_eval_loss = state.step, self.last_eval
            if not final:
                self._save(self.out / BEST_NAME)
            row["best"] = True
        return row

    def _save(self, directory: Path) -> None:
        """The adapter (or, with full, the whole model) into `directory`; every process calls it (FSDP gathers)."""
        gathered = whole_trainable(self.model) if self.config.fsdp else None
        if self.world.is_main:
            if self.config.full:
                self.model.save_pretrained(directory)  # a complete model directory, loadable as --base
                self.tokenizer.save_pretrained(directory)
            else:  # adapter_config.json + adapter_model.safetensors (under FSDP from the gathered weights)
                self.model.save_pretrained(directory, state_dict=gathered)

    def _eval_loss(self) -> float:
        return eval_loss(self.model, self.eval_data, self.tokenizer.pad_token_id, 2 * self.config.batch_size,
                         self.config.bf16, self.world)

    # -- the end ---------------------------------------------------------------------------------------
    def _finish(self) -> None:
        """The final eval loss, then the adapter (or the whole model) written to --out.

        With keep_best, the top of --out holds the adapter of the lowest eval loss; when that is not the last
        step's, the last step's adapter goes to --out/last/.
        """
        state, best_dir, last_dir = self.state, self.out / BEST_NAME, self.out / LAST_NAME
        if self.eval_data is not None:
            row = self._evaluate(final=True)
            if self.world.is_main:
                with open(self.out / METRICS_NAME, "a") as metrics:
                    metrics.write(json.dumps({"step": state.step, **row}) + "\n")
        if not self.config.keep_best or state.best_step == state.step:  # the last step's adapter is the one
            self._save(self.out)
            if self.world.is_main:
                shutil.rmtree(best_dir, ignore_errors=True)
                shutil.rmtree(last_dir, ignore_errors=True)  # from an earlier finish of this --out, if any
            return
        self._save(last_dir)
        if self.world.is_main:  # each file replaced atomically, the best adapter's files last to arrive
            for entry in sorted(best_dir.iterdir()):
                os.replace(entry, self.out / entry.name)
            best_dir.rmdir()

    def _result(self, interrupted: bool) -> TrainResult:
        state, losses = self.state, self.losses
        tail = losses[-max(1, len(losses) // 10):]
        result = TrainResult(
            out=str(self.out), steps=state.step, epochs=state.epoch + state.batch / max(len(self.plan), 1),
            first_loss=losses[0] if losses else None, final_loss=sum(tail) / len(tail) if losses else None,
            eval_loss=self.last_eval, tokens=state.tokens, train_seconds=state.train_seconds,
            tokens_per_s=state.tokens / max(state.train_seconds, 1e-9), trainable_params=self.trainable,
            interrupted=interrupted, checkpoint=self.last_checkpoint,
            best_step=state.best_step if self.config.keep_best else None, best_eval_loss=state.best_eval_loss,
            last_dir=str(self.out / LAST_NAME) if (self.out / LAST_NAME).is_dir() else None)
        if self.world.is_main:
            from lorakit.plotting import plot_loss_curve
            from lorakit.report import write_report

            plot_loss_curve(self.out / METRICS_NAME, self.out / LOSS_PLOT_NAME)
            if not interrupted:
                write_train_record(self.out, self.config.to_dict(), dataclasses.asdict(result))
                self.say(f"lorakit: run report {write_report(self.out)}", flush=True)
        distributed.barrier(self.world)  # no process returns before the files are there
        return result


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


def _collate_share(data: TokenizedData, indices: list[int], world: distributed.World,
                   pad_id: int) -> dict[str, torch.Tensor]:
    """This process's rows of one micro-batch (all of them for a single process), collated."""
    rows, stand_in = distributed.share(indices, world)
    batch = collate([data.items[i] for i in rows], pad_id)
    if stand_in:
        batch["labels"].fill_(IGNORE_INDEX)  # runs forward and backward for DDP, adds nothing
    return batch


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
