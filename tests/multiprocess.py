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


def assert_ranks_equal_one_process(
    ranks: list[dict[str, Any]],
    ref: dict[str, Any],
    *,
    mean_keys: tuple[str, ...] = ("loss",),
    state_keys: tuple[str, ...] = (),
) -> None:
    """The "2 processes x B = 1 process x 2B" check on what ``results_on_ranks`` returned and
    what the same function computed on one process (``ref``): the ranks' mean of each
    ``mean_keys`` scalar (the loss) equals the one-process value, every rank's ``grads``
    (after DDP's averaging) equal the one-process gradients, and every rank's ``state_keys``
    (a tensor or a list of tensors: banks, queues, ``Z``) equal the one-process state."""
    world = len(ranks)
    for key in mean_keys:
        torch.testing.assert_close(sum(o[key] for o in ranks) / world, ref[key], rtol=1e-5, atol=1e-6)
    for out in ranks:
        for got, want in zip(out["grads"], ref["grads"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for key in state_keys:
            got_state = out[key] if isinstance(out[key], (list, tuple)) else [out[key]]
            want_state = ref[key] if isinstance(ref[key], (list, tuple)) else [ref[key]]
            for got, want in zip(got_state, want_state, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
