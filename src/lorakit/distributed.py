"""Multi-process training under torchrun: one process per device, PyTorch DDP or FSDP.

    torchrun --nproc-per-node 2 -m lorakit train --data train.jsonl --out run          # DDP
    torchrun --nproc-per-node 2 -m lorakit train --data train.jsonl --out run --fsdp   # FSDP

torchrun starts the processes and sets RANK / WORLD_SIZE / LOCAL_RANK; lorakit reads them, joins the
process group (NCCL on GPUs, Gloo on the CPU) and wraps the model: DistributedDataParallel keeps a whole
copy of the model in every process and all-reduces the gradients; FSDP (fully_shard) keeps 1/N of every
weight in each process, gathers a decoder layer's weights just for its forward and backward, and
reduce-scatters the gradients. Every process reads the whole data set and the same batch plan; each
micro-batch is dealt out across the processes, so a run on N processes takes the steps a single process
would take, each process doing 1/N of every step's work. Process 0 alone writes checkpoints, metrics,
the progress bar and the adapter.
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
from lorakit.model import unwrapped


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


def share(indices: Sequence[int], world: World) -> tuple[list[int], bool]:
    """This process's share of one micro-batch (every world.size-th row), and whether it is a stand-in.

    A micro-batch with fewer rows than processes leaves some with nothing; DDP and FSDP still need each
    one to run a forward and backward, so those take the first row as a stand-in whose loss counts zero.
    """
    mine = list(indices[world.rank::world.size])
    if mine or not indices:
        return mine, False
    return list(indices[:1]), True


def wrap(model: nn.Module, world: World, device: torch.device, fsdp: bool = False) -> Optional[nn.Module]:
    """What runs the model's forward: DistributedDataParallel around `model`, or `model` itself sharded
    in place by FSDP (`fsdp`); None for a single process."""
    if not world.is_distributed:
        return None
    if fsdp:
        return shard(model, world, device)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Buffers (rotary tables, NF4 codes) are identical everywhere and never change: no need to broadcast
    # them each step (the keyword was renamed in torch 2.13).
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=ids, **no_buffer_sync)


def shard(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """FSDP's fully_shard on every decoder layer (transformers' _no_split_modules) and then on the whole model.

    Only process 0 needs real weights (loaded on the CPU); the others may hold the architecture on the
    meta device. Process 0's weights are then sent out, each process keeping its 1/N shard on `device`,
    so host memory holds the whole model once, not once per process, and no GPU ever holds it whole.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    inner = unwrapped(model)
    layer_types = set(getattr(inner, "_no_split_modules", None) or ())
    layers = [m for m in inner.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise DistributedError(f"--fsdp shards a model layer by layer, and {type(inner).__name__} names no layer "
                               "class in _no_split_modules; use DDP (drop --fsdp)")
    on_meta = any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    if world.is_main and on_meta:
        raise DistributedError("process 0 must hold the real weights to send them to the others; it has "
                               "parameters on the meta device")
    whole = model.state_dict() if world.is_main else {}
    mesh = init_device_mesh(device.type, (world.size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if on_meta:
        model.to_empty(device=device)
    # Every process takes its shards of process 0's weights; buffers (rotary tables, left out of the
    # state dict) are copied whole.
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    return model


def is_sharded(module: Optional[nn.Module]) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def _fsdp_no_sync(module) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def no_sync(parallel: Optional[nn.Module], skip: bool):
    """While `skip` (gradient accumulation's earlier micro-batches), gradients stay in each process."""
    if not skip or parallel is None:
        return contextlib.nullcontext()
    return _fsdp_no_sync(parallel) if is_sharded(parallel) else parallel.no_sync()


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (every process must call this, in the same order); others as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def load_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """param.copy_(value), where `value` is the whole tensor and `param` may be an FSDP shard of it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            param.copy_(distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements))
        else:
            param.copy_(value)
