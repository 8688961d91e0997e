"""Starts several training processes on this machine with torchrun's own machinery.

``selfsup pretrain CONFIG --nproc N`` is exactly::

    torchrun --standalone --nproc_per_node N -m selfsup.cli pretrain CONFIG [overrides]

run in this process: torchrun's argument parser builds the launch configuration and
``elastic_launch`` starts the ``N`` workers, each ``python -u -m selfsup.cli ...`` with
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set, which
:func:`selfsup.engine.distributed.setup` reads. ``--standalone`` rendezvouses on a free
local port, so several jobs can share a machine. For several machines call ``torchrun``
itself with its rendezvous flags (README, "Multi-process and multi-machine training").

References: Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel
Training", arXiv:2006.15704; the torchrun (``torch.distributed.run``) documentation.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import uuid
from collections.abc import Sequence
from typing import Any

#: Signals torchrun's agent installs handlers for (in the calling process's main thread).
_AGENT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


def under_launcher() -> bool:
    """Whether this process was started by torchrun (or another launcher setting ``WORLD_SIZE``)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def torchrun_args(nproc: int, target: str, overrides: Sequence[str], command: str = "pretrain") -> list[str]:
    """The ``torchrun`` command line (without the program name) that runs ``selfsup COMMAND
    TARGET OVERRIDES`` in ``nproc`` processes on this machine."""
    return ["--standalone", f"--nproc-per-node={nproc}", "--module", "selfsup.cli", command, target, *overrides]


def launch_local(nproc: int, config: str, overrides: Sequence[str], command: str = "pretrain") -> int:
    """Runs ``selfsup COMMAND CONFIG OVERRIDES`` in ``nproc`` processes on this machine and
    waits for them; returns 0 when all succeeded, else the first failed worker's exit code.

    Each worker joins the process group (gloo on CPU, NCCL on GPUs: one process per GPU,
    ``LOCAL_RANK`` selects it); rank 0 writes the run folder. On CPU each worker gets an equal
    share of the cores (``OMP_NUM_THREADS``) unless the caller set it, rather than torchrun's
    default of one thread. The first failure stops the other workers (torchrun's policy).

    Args:
        nproc: processes to start (at least 1).
        config: the YAML config (``pretrain``) or the run folder / checkpoint (``resume``).
        overrides: dotted ``key=value`` overrides, passed on unchanged.
        command: the ``selfsup`` sub-command the workers run: ``"pretrain"`` or ``"resume"``.

    References: the torchrun (``torch.distributed.run``) documentation.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if under_launcher():
        raise RuntimeError(
            "already running under torchrun (WORLD_SIZE is set): drop --nproc, "
            "torchrun's --nproc_per_node decides the process count"
        )
    args = parse_args(torchrun_args(nproc, config, overrides, command))
    # What torchrun's `run` does for --standalone: a private c10d rendezvous on a free port.
    args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    saved_env = os.environ.get("OMP_NUM_THREADS")
    saved_handlers: dict[int, Any] = {}
    for name in _AGENT_SIGNALS:
        if hasattr(signal, name):
            sig = getattr(signal, name)
            saved_handlers[sig] = signal.getsignal(sig)
    try:
        if saved_env is None:
            # Workers inherit this; without it nproc processes would each use every core.
            os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
        launch_config, entrypoint, entry_args = config_from_args(args)
        elastic_launch(launch_config, entrypoint)(*entry_args)
    except ChildFailedError as err:
        print(err.format_msg(), file=sys.stderr, flush=True)
        # A worker killed by a signal reports a negative code; a shell wants 1..255.
        return next((f.exitcode for f in err.failures.values() if f.exitcode > 0), 1)
    finally:
        if saved_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        # The agent installs its own handlers to stop the workers; put the caller's back.
        if threading.current_thread() is threading.main_thread():
            for sig, handler in saved_handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)
    return 0
