"""Process-group setup for the engine: torchrun environment, DDP wrapping, object exchange.

A single process (no ``WORLD_SIZE`` in the environment, or 1) needs no process group: every
helper here is then a no-op, so the same engine code runs on a laptop and on many machines.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistState:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> DistState:
    """Joins the process group torchrun describes (gloo on CPU, NCCL on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        if dist.is_available() and dist.is_initialized():
            return DistState(dist.get_world_size(), dist.get_rank(), 0, None, False)
        return DistState()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return DistState(dist.get_world_size(), dist.get_rank(), local_rank, device, owns)


def wrap(method: nn.Module, state: DistState) -> nn.Module:
    """DistributedDataParallel around the method when there are several processes."""
    if state.world_size <= 1:
        return method
    device_ids = [state.device.index] if state.device is not None and state.device.type == "cuda" else None
    # Teachers and queues are buffers or frozen parameters: they stay in sync because every
    # process applies the same deterministic EMA / enqueue of gathered keys.
    return nn.parallel.DistributedDataParallel(method, device_ids=device_ids, broadcast_buffers=False)


def broadcast_object(obj: Any, state: DistState) -> Any:
    """Rank 0's ``obj`` on every process."""
    if state.world_size <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, state: DistState) -> Any:
    """Every process's ``obj`` in rank order on every process (``obj`` alone when single)."""
    if state.world_size <= 1:
        return obj
    out: list[Any] = [None] * state.world_size
    dist.all_gather_object(out, obj)
    return out


def teardown(state: DistState) -> None:
    if state.owns_group and dist.is_initialized():
        dist.destroy_process_group()
