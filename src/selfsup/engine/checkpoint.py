"""Atomic checkpoints holding everything needed to continue a run exactly."""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from selfsup.errors import CheckpointError, StorageError

__all__ = [
    "CheckpointError",
    "StorageError",
    "clean_stale_temporaries",
    "load_checkpoint",
    "non_finite_entries",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from (torch CPU drives augmentation and masking)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _payload_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (nested dicts, lists, tuples): a checkpoint's size."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_payload_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_payload_bytes(v) for v in value)
    return 0


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Writes ``payload`` with ``torch.save`` to a temporary file in the same folder, fsyncs
    and renames it over ``path``: a crash mid-write never leaves a half-written checkpoint.

    Raises:
        StorageError: the disk is full (or over quota, or read-only); the message names the
            path, the bytes needed and the bytes free. The previous checkpoint is intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            try:
                free = f"{_size(shutil.disk_usage(path.parent).free)} free"
            except OSError:
                free = "free space unknown"
            reason = os.strerror(err.errno).lower()
            run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
            if path.is_file():
                kept, fix = "the previous checkpoint is intact", f"free space, then `selfsup resume {run_dir}`"
            else:
                kept, fix = (
                    "no checkpoint was written yet",
                    "free space or set run.out_dir to another disk, then run again",
                )
            raise StorageError(
                f"{reason} writing checkpoint {str(path)!r}: it needs about {_size(_payload_bytes(payload))}, "
                f"{free}; {kept} ({fix})"
            ) from err
        raise


def clean_stale_temporaries(folder: str | Path) -> list[Path]:
    """Removes the temporary files of checkpoint writes that were killed midway
    (``.<name>.*.tmp`` next to the checkpoints); returns what it removed."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for stale in folder.glob(".*.pt.*.tmp"):
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def non_finite_entries(state: Any, prefix: str = "") -> list[str]:
    """The keys of the floating-point tensors in ``state`` (nested dicts, lists) that hold a
    NaN or an infinity, e.g. ``["method.backbone.conv.weight", "optimizer.state.3.momentum_buffer"]``."""
    found: list[str] = []
    if isinstance(state, torch.Tensor):
        if (state.is_floating_point() or state.is_complex()) and not bool(torch.isfinite(state).all()):
            found.append(prefix)
    elif isinstance(state, dict):
        for key, value in state.items():
            found += non_finite_entries(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            found += non_finite_entries(value, f"{prefix}.{i}" if prefix else str(i))
    return found


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a checkpoint written by ``save_checkpoint`` (on the CPU), with ``weights_only``:
    a file that would need to run code to load is refused with a ``CheckpointError``."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "checkpoints" / "last.pt", path / "last.pt"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise CheckpointError(
                f"no checkpoint in {str(path)!r} (looked for checkpoints/last.pt; the run saved none yet, "
                "or give a run folder or .pt file that exists)"
            )
        path = found
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist (give a run folder, e.g. runs/<name>, or its checkpoints/last.pt)"
        )
    try:
        # weights_only: tensors and plain containers only (our payload: state dicts, RNG
        # states, the config as plain data), so a crafted file cannot run code on load.
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        wanted = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(err))
        if wanted is None:  # not a pickle that asks for code: a damaged or foreign file
            raise CheckpointError(
                f"cannot read checkpoint {str(path)!r}: not a selfsup checkpoint (damaged or another "
                "program's file; use the run's checkpoints/last.pt)"
            ) from None
        raise CheckpointError(
            f"refusing to load {str(path)!r}: it would call {wanted.group(1)} while loading; only checkpoints "
            "holding tensors and plain data (those selfsup writes) are loaded"
        ) from None
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: {first} (damaged or truncated; use another checkpoint)"
        ) from err
    return state
