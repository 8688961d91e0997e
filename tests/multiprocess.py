"""Run a function on several gloo processes and collect what each returns (the pattern of the
"2 processes x B equals 1 process x 2B" tests)."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, fn: Callable[[int], Any], world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        torch.save(fn(rank), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def results_on_ranks(fn: Callable[[int], Any], world: int, tmp: Path) -> list[Any]:
    """``[fn(0), ..., fn(world - 1)]``, each computed in its own process of one gloo group.
    ``fn`` must be a module-level function (it is pickled into the spawned processes)."""
    mp.spawn(_rank_main, args=(fn, world, str(tmp / "store"), str(tmp)), nprocs=world, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
