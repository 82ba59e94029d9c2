"""Multi-process training under torchrun: one process per device, gradients averaged by PyTorch DDP.

    torchrun --nproc-per-node 2 -m lorakit train --data train.jsonl --out run

torchrun starts the processes and sets RANK / WORLD_SIZE / LOCAL_RANK; lorakit reads them, joins the
process group (NCCL on GPUs, Gloo on the CPU) and wraps the model in DistributedDataParallel. Every
process reads the whole data set and the same batch plan; each micro-batch is dealt out across the
processes, so a run on N processes takes the steps a single process would take, each process doing
1/N of every step's work. Process 0 alone writes checkpoints, metrics, the progress bar and the adapter.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from lorakit.errors import LoraKitError


class DistributedError(LoraKitError, RuntimeError):
    """The torchrun environment is incomplete or asks for something this run cannot do."""


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; World() is a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env(env: Optional[dict] = None) -> World:
    """The World torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK; World() when they are absent."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return World()
    try:
        size, rank = int(env["WORLD_SIZE"]), int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise DistributedError(f"torchrun's RANK / WORLD_SIZE / LOCAL_RANK must be integers ({e})") from None
    if size < 1 or not 0 <= rank < size:
        raise DistributedError(f"RANK={rank} does not fit WORLD_SIZE={size}")
    return World(rank, size, local_rank)


def process_device(world: World, device: torch.device) -> torch.device:
    """The device this process trains on: under torchrun, GPU number LOCAL_RANK when `device` is a GPU."""
    if not world.is_distributed or device.type != "cuda":
        return device
    if device.index is not None:
        raise DistributedError(f"under torchrun every process takes the GPU numbered by its LOCAL_RANK, so "
                               f"--device {device} would put {world.size} processes on one GPU; pass "
                               f"--device cuda (or auto), and choose GPUs with CUDA_VISIBLE_DEVICES")
    if world.local_rank >= torch.cuda.device_count():
        raise DistributedError(f"process LOCAL_RANK={world.local_rank} has no GPU: this machine has "
                               f"{torch.cuda.device_count()}; start at most that many processes per node")
    return torch.device("cuda", world.local_rank)


def start(world: World, device: torch.device, timeout_minutes: float = 30.0) -> bool:
    """Join the process group (NCCL for GPUs, Gloo for the CPU); False if there was nothing to start."""
    if not world.is_distributed or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


def stop(world: World) -> None:
    if world.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.is_distributed:
        dist.barrier()


@contextlib.contextmanager
def main_first(world: World) -> Iterator[None]:
    """Process 0 runs the block first (e.g. fills the model cache), then the others; then all go on."""
    if not world.is_main:
        barrier(world)
    yield
    if world.is_main:
        barrier(world)


def sum_across(world: World, values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sums of `values` over all processes (float64); the values themselves for one process."""
    if not world.is_distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(world: World, obj) -> list:
    """[obj of process 0, obj of process 1, ...] on every process."""
    if not world.is_distributed:
        return [obj]
    gathered = [None] * world.size
    dist.all_gather_object(gathered, obj)
    return gathered


def shard(indices: Sequence[int], world: World) -> tuple[list[int], bool]:
    """This process's share of one micro-batch (every world.size-th row), and whether it is a stand-in.

    A micro-batch with fewer rows than processes leaves some with nothing; DDP still needs each one to
    run a backward, so those take the first row as a stand-in whose loss counts zero.
    """
    mine = list(indices[world.rank::world.size])
    if mine or not indices:
        return mine, False
    return list(indices[:1]), True


def wrap(model: nn.Module, world: World, device: torch.device) -> Optional[nn.Module]:
    """DistributedDataParallel around `model` (it all-reduces the trainable parameters' gradients);
    None for a single process."""
    if not world.is_distributed:
        return None
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Buffers (rotary tables, NF4 codes) are identical everywhere and never change: no need to broadcast
    # them each step (the keyword was renamed in torch 2.13).
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=ids, **no_buffer_sync)


def no_sync(ddp: Optional[nn.Module], skip: bool):
    """ddp.no_sync() while `skip` (gradient accumulation's earlier micro-batches); otherwise nothing."""
    return ddp.no_sync() if skip and ddp is not None else contextlib.nullcontext()
