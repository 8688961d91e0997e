"""Process-group setup for the engine: torchrun environment, DDP wrapping, object exchange,
synchronised BatchNorm.

A single process (no ``WORLD_SIZE`` in the environment, or 1) needs no process group: every
helper here is then a no-op, so the same engine code runs on a laptop and on many machines.

Where the pieces fit (the equivalence the tests prove: ``W`` processes with per-process batch
``B`` take the same optimisation step as one process with batch ``W * B``):

* data: :class:`~selfsup.data.loader.EpochBatchSampler` gives rank ``r`` the slice
  ``[r*B, (r+1)*B)`` of every global batch;
* losses with negatives gather them with gradient (``selfsup.nn.distributed``): every rank
  receives the gradient of the *sum* of all ranks' losses;
* DDP (:func:`wrap`) averages parameter gradients over ranks, which turns that sum into the
  mean rank loss, i.e. the single-process loss on the global batch;
* BatchNorm statistics are per process unless ``train.sync_batchnorm`` converts them
  (:func:`convert_sync_batchnorm`) to statistics of the global batch.

References: Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour",
arXiv:1706.02677 (data-parallel SGD, linear lr scaling); Li et al. 2020, "PyTorch
Distributed: Experiences on Accelerating Data Parallel Training", arXiv:2006.15704 (DDP).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from selfsup.methods.base import Method
from selfsup.nn.distributed import is_dist


@dataclass
class DistState:
    """Where this process stands in the job (``world_size=1``: not distributed).

    Attributes:
        world_size: number of processes in the job.
        rank: this process's global rank (0 writes the run folder).
        local_rank: rank on this machine (selects the GPU).
        device: the device this process trains on, ``None`` when not distributed (the
            config's ``train.device`` decides then).
        owns_group: whether :func:`setup` created the process group (and so tears it down).
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, logs and writes files."""
        return self.rank == 0


def setup(device: str = "auto") -> DistState:
    """Joins the process group torchrun describes, NCCL on CUDA and gloo otherwise.

    torchrun (or any launcher) sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``
    and ``MASTER_PORT``; ``init_process_group``'s default ``env://`` method reads them. With
    ``device="cpu"`` the job uses gloo even on a machine with GPUs (NCCL moves only CUDA
    tensors). A group initialised by the caller beforehand is joined, not re-created.

    Args:
        device: the config's ``train.device``: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    References: Li et al. 2020, "PyTorch Distributed", arXiv:2006.15704.
    """
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world <= 1:
        if is_dist():  # a caller's group (e.g. a notebook); its device choice stands
            return DistState(dist.get_world_size(), dist.get_rank(), 0, None, False)
        return DistState()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available on this machine")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} "
                "GPU(s): start at most one process per GPU (--nproc / --nproc_per_node)"
            )
        target = torch.device("cuda", local_rank)
        # Before any CUDA work, so NCCL and every default-device allocation use this GPU.
        torch.cuda.set_device(target)
    else:
        target = torch.device("cpu")
    owns = False
    if not is_dist():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return DistState(dist.get_world_size(), dist.get_rank(), local_rank, target, owns)


def wrap(method: Method, state: DistState) -> nn.Module:
    """``DistributedDataParallel`` around the method when there are several processes.

    ``Method.forward`` calls ``training_step``, so calling the wrapper runs the step under
    DDP's hooks: gradients of trainable parameters are averaged over processes during
    ``backward`` (``no_sync`` skips that on accumulation micro-steps). Parameters with
    ``requires_grad=False`` (EMA teachers, frozen copies) are not registered with DDP's
    reducer at all; they stay identical on every process because each applies the same EMA
    from the same (synchronised) student.

    ``find_unused_parameters`` comes from the method's declared capability of that name
    (default ``False``): a method whose step leaves some trainable parameters without a
    gradient must declare it, or DDP raises on the next step.

    References: Li et al. 2020, "PyTorch Distributed", arXiv:2006.15704.
    """
    if state.world_size <= 1:
        return method
    device_ids = [state.device.index] if state.device is not None and state.device.type == "cuda" else None
    # No buffer sync before each forward (DDP's default copies rank 0's buffers every step).
    # Queues, centres and banks are identical by construction (every process applies the same
    # update to gathered values), and a MoCo queue of 65536 keys would cost a large
    # broadcast per step. BN running statistics (not used by training-mode forwards) are
    # averaged instead at checkpoints and before evaluation (`average_batchnorm_stats`).
    ddp = nn.parallel.DistributedDataParallel
    # Newer torch renamed the switch (it still syncs buffers once at construction, which
    # is harmless: every process built identical buffers from the same seed).
    no_buffer_sync: dict[str, Any] = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
        else {"broadcast_buffers": False}
    )
    return ddp(
        method, device_ids=device_ids, find_unused_parameters=bool(method.find_unused_parameters), **no_buffer_sync
    )


@torch.no_grad()
def average_batchnorm_stats(module: nn.Module, state: DistState) -> None:
    """Replaces every BatchNorm's running mean and variance by their mean over processes.

    Without synchronised BN each process's running statistics track its own batches, so
    processes would evaluate (and rank 0 would checkpoint) slightly different models. All
    processes call this at the same points (checkpoint, evaluation); afterwards they agree.
    The mean of per-process variances omits the spread of the per-process means; at the
    batch sizes of data-parallel training that term is small (timm's ``distribute_bn`` makes
    the same choice). With synchronised BN the statistics are already equal.

    References: Goyal et al. 2017, arXiv:1706.02677, section 5.1 (BN statistics per worker).
    """
    if state.world_size <= 1:
        return
    buffers = [
        t
        for m in module.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats
        for t in (m.running_mean, m.running_var)
        if t is not None
    ]
    by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in buffers:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= state.world_size
        for t, value in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(value.view_as(t))


# ---------------------------------------------------------------------------- objects
def mean_over_ranks(values: Mapping[str, float], state: DistState) -> dict[str, float]:
    """The mean over processes of each scalar (every process must pass the same keys).

    Used for logged loss parts: each process's loss is the mean over its own ``B`` samples,
    so the mean over processes is the loss of the global batch, the number a single-process
    run with batch ``W * B`` reports.
    """
    if state.world_size <= 1:
        return dict(values)
    keys = sorted(values)
    device = state.device if state.device is not None else torch.device("cpu")
    flat = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return {k: float(v) / state.world_size for k, v in zip(keys, flat.tolist())}


def broadcast_object(obj: Any, state: DistState) -> Any:
    """Rank 0's ``obj`` on every process (any picklable object)."""
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


def barrier(state: DistState) -> None:
    """Waits until every process got here (no-op in a single process).

    Called after a successful run, before :func:`teardown`: it keeps a fast process from
    destroying its group (and, under a plain ``env://`` launch, rank 0 from closing the
    rendezvous store) while others still run their last collectives. Not called on the error
    path, where the other processes may never arrive: there the failing process exits and the
    launcher stops the rest.
    """
    if state.world_size > 1 and is_dist():
        dist.barrier()


def teardown(state: DistState) -> None:
    """Leaves the process group if :func:`setup` created it."""
    if state.owns_group and is_dist():
        dist.destroy_process_group()
