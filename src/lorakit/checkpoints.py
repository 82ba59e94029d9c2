"""Training checkpoints: step-N/ directories a killed run resumes from with the same result.

A checkpoint holds the trainable weights, the optimizer and scheduler state, every process's RNG state
and the position in the data. It is written to a temporary directory and renamed into place, so a
directory named step-N is always complete. Under torchrun, process 0 writes; with FSDP the weights and
optimizer state are first gathered whole from the shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from lorakit import distributed
from lorakit.adapter_folder import CHECKPOINTS_NAME
from lorakit.errors import TrainError
from lorakit.io_utils import atomic_save_safetensors, atomic_write, private_dir_made_ordinary
from lorakit.train_config import TrainConfig, lora_recipe

STATE_FILE = "trainer_state.pt"
TRAINABLE_FILE = "trainable.safetensors"
# Changing any of these between a run and its resume would change the result, so resume refuses.
RESUME_MUST_MATCH = ("base", "data", "lora", "epochs", "max_steps", "lr", "lr_scheduler", "batch_size", "grad_accum", "warmup_ratio", "warmup_steps", "weight_decay", "max_grad_norm", "seed",
                     "group_by_length", "length_tolerance",
                     "bf16", "loraplus_lr_ratio", "query_field", "response_field", "system_prompt",
                     "max_length", "too_long", "full", "quantize", "attention")

# What a run did before these settings existed: batches sorted by exact length, warmup from warmup_ratio alone.
BEFORE_SETTING = {"group_by_length": True, "length_tolerance": 0.0, "warmup_steps": 0}


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (incomplete ones never get a step-* name)."""
    root = Path(out) / CHECKPOINTS_NAME
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def remove_unfinished(out: str | os.PathLike) -> None:
    """Delete what checkpoint writes cut short by a kill left behind (temporary directories, never a step-N)."""
    root = Path(out) / CHECKPOINTS_NAME
    if root.is_dir():
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS_NAME / f"step-{step:06d}"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():  # dropout masks on a GPU come from its own generator
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(out: Path, model, optimizer, scheduler, position: dict, config: TrainConfig,
                    process_rngs: Optional[list[dict]] = None, gathered: Optional[dict] = None) -> Path:
    """Write step-N/ (trainable weights, optimizer, scheduler, RNG, data position) atomically.

    Under torchrun (from process 0, which writes): `process_rngs`, every process's RNG state; with FSDP,
    `gathered`, the whole trainable weights and optimizer state (gather_sharded_state).
    """
    root = out / CHECKPOINTS_NAME
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(out, position["step"])
    if (final / STATE_FILE).is_file():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    private_dir_made_ordinary(tmp)
    try:
        trainable = gathered["trainable"] if gathered else {n: p for n, p in model.named_parameters()
                                                             if p.requires_grad}
        atomic_save_safetensors(trainable, tmp / TRAINABLE_FILE)
        if not config.full:  # a checkpoint is also a usable adapter
            model.save_pretrained(tmp, state_dict=trainable if gathered else None)
        state = {"optimizer": gathered["optimizer"] if gathered else optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": _rng_state(), "position": dict(position),
                 "config": config.to_dict()}
        if gathered:
            state["optimizer_by_name"] = True  # keyed by parameter name, as FSDP's state-dict API writes it
        if process_rngs is not None:
            state["process_rngs"] = process_rngs
        with atomic_write(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(out)[:-config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_checkpoint(out: Path, model, optimizer, scheduler, position: dict, config: TrainConfig,
                     world: distributed.World) -> str:
    """save_checkpoint by process 0, with every process's RNG state; all processes take part and wait for it."""
    rngs = distributed.gather_objects(world, _rng_state()) if world.is_distributed else None
    gathered = gather_sharded_state(model, optimizer) if config.fsdp else None
    path = checkpoint_dir(out, position["step"])
    if world.is_main:
        path = save_checkpoint(out, model, optimizer, scheduler, position, config, rngs, gathered)
    distributed.barrier(world)
    return str(path)


# Failures of the disk rather than of the run: no space, a quota, a read-only or forbidden directory.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


@contextlib.contextmanager
def disk_errors(out: Path, last_checkpoint: Callable[[], Optional[str]]):
    """Turn a failed write in `out` into a TrainError that says what failed, that what was written before is intact
    (every file is written atomically: a checkpoint or adapter file is whole or absent), and how to go on from
    the checkpoint that `last_checkpoint()` names then."""
    try:
        yield
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        exc = _disk_cause(error)
        if exc is None:
            raise
        where, last_checkpoint = exc.filename or f"to {out}", last_checkpoint()
        resume = (f"the last checkpoint, {last_checkpoint}, is intact: fix that, then run the same command with "
                  "--resume to continue from it" if last_checkpoint else
                  "no checkpoint had been written yet: fix that and run it again")
        raise TrainError(f"could not write {where}: {exc.strerror or exc} ({errno.errorcode.get(exc.errno, exc.errno)}"
                         f"). Files written before are intact; {resume}.") from error


def _disk_cause(exc: Optional[BaseException]) -> Optional[OSError]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def gather_sharded_state(model, optimizer) -> dict:
    """The whole trainable weights and optimizer state out of FSDP's shards, on process 0 (every process
    must call this; the others get what they need to take part)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    optimizer_state = get_optimizer_state_dict(model, optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"trainable": whole_trainable(model), "optimizer": optimizer_state}


def whole_trainable(model) -> dict[str, torch.Tensor]:
    """The trainable weights, whole (gathered from FSDP's shards: every process must call this)."""
    return {n: distributed.full(p).detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_checkpoint(path: Path, model, optimizer, scheduler, config: TrainConfig,
                    world: distributed.World = distributed.World()) -> dict:
    """Restore a checkpoint in place; returns the data position to continue from."""
    from safetensors.torch import load_file

    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    # A setting newer than the checkpoint had its default value in the interrupted run, or the value that run
    # used before the setting existed (BEFORE_SETTING).
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    saved = {**defaults, **BEFORE_SETTING, **_current_form(state["config"])}
    now = config.to_dict()
    changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in RESUME_MUST_MATCH if k != "lora"
               and _norm(saved.get(k)) != _norm(now[k])]
    changed += [f"lora.{k}: {v!r} -> {now['lora'].get(k)!r}" for k, v in (saved.get("lora") or {}).items()
                if _norm(v, k) != _norm(now["lora"].get(k), k)]
    if changed:
        raise TrainError(f"cannot resume from {path}: these settings differ from the interrupted run, which "
                         f"would change the result: {'; '.join(changed)}. Use the original settings, or a new --out.")
    tensors = load_file(str(path / TRAINABLE_FILE))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    if missing:
        raise TrainError(f"checkpoint {path} lacks {len(missing)} trainable tensors (first: {missing[0]})")
    by_name = state.get("optimizer_by_name", False)
    if by_name != config.fsdp:
        raise TrainError(f"cannot resume from {path}: it was written by a run {'with' if by_name else 'without'} "
                         f"--fsdp, whose optimizer state is laid out differently; resume with"
                         f"{'' if by_name else 'out'} --fsdp")
    for name, tensor in tensors.items():
        distributed.load_full(params[name], tensor)
    if by_name:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rngs = state.get("process_rngs") or [state["rng"]]
    if len(rngs) == world.size:
        _set_rng_state(rngs[world.rank])
    else:
        # Another number of processes than the run had: the batches are the same, dropout draws differ.
        _set_rng_state(state["rng"])
        if world.rank:
            torch.manual_seed(config.seed + world.rank + 1_000 * state["position"]["step"])
        if world.is_main:
            print(f"lorakit: {path} was written by {len(rngs)} process(es), this run has {world.size}: the "
                  "data order is kept, dropout masks will differ from an uninterrupted run", flush=True)
    return state["position"]


def _current_form(saved: dict) -> dict:
    """Settings as a checkpoint of an older lorakit wrote them (the adapter's fields at the top) in today's form."""
    legacy = {"r": "r", "alpha": "lora_alpha", "targets": "target_modules", "dropout": "lora_dropout",
              "dora": "use_dora", "rslora": "use_rslora"}
    if "lora" in saved or not any(key in saved for key in legacy):
        return saved
    settings = {k: v for k, v in saved.items() if k not in legacy}
    lora = {field: saved[key] for key, field in legacy.items() if key in saved}
    if lora.get("target_modules") == ["all-linear"]:
        lora["target_modules"] = "all-linear"
    settings["lora"] = dataclasses.asdict(lora_recipe(**lora))
    return settings


def _norm(value, key: str = ""):
    if key == "target_modules" and isinstance(value, (list, tuple)):
        return sorted(value)  # a set of module names: the order does not matter
    return list(value) if isinstance(value, tuple) else value
