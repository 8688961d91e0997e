"""Feature memories: a FIFO queue of keys (MoCo, SwAV) and a per-sample bank (InstDisc).

Both keep all state in persistent buffers, so ``state_dict`` round-trips restore them
exactly, and both gather their inputs from every process before writing, so every
process holds the same memory. Inside :func:`journal_writes` both record the rows they
overwrite (their ``journaled_buffers``), so a caller can undo a step by putting back those
``B`` rows rather than a copy of the whole memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.errors import ConfigError
from selfsup.nn.distributed import concat_all_gather


@dataclass(frozen=True)
class RowWrite:
    """One recorded write: ``buffer[rows]`` held ``before`` (``rows`` ``None``: every row)."""

    buffer: Tensor
    rows: Tensor | None
    before: Tensor


_JOURNAL: ContextVar[list[RowWrite] | None] = ContextVar("selfsup_memory_journal", default=None)


@contextlib.contextmanager
def journal_writes() -> Iterator[list[RowWrite]]:
    """Within the block, every write of a :class:`FIFOQueue` or :class:`IndexMemoryBank` to
    its ``journaled_buffers`` appends a :class:`RowWrite` (the rows it is about to overwrite,
    ``(B, D)``, copied on their device) to the yielded list, in the order written. Undoing them
    in reverse order restores the memory exactly; the training loop does so to skip a
    non-finite step without copying a 65536-row queue every step."""
    journal: list[RowWrite] = []
    token = _JOURNAL.set(journal)
    try:
        yield journal
    finally:
        _JOURNAL.reset(token)


def _record(buffer: Tensor, rows: Tensor | None) -> None:
    """Append ``buffer``'s ``rows`` (all rows for ``None``) to the active journal, if any."""
    journal = _JOURNAL.get()
    if journal is not None:
        journal.append(RowWrite(buffer, rows, buffer.clone() if rows is None else buffer.index_select(0, rows)))


class FIFOQueue(nn.Module):
    """A first-in first-out ring buffer of ``size`` feature vectors of width ``dim``.

    Buffers: ``queue (size, dim)`` initialised with random unit vectors as MoCo does,
    ``ptr`` (next row to write) and ``filled`` (rows written so far, capped at ``size``).

    References: He et al. 2020, "Momentum Contrast" (MoCo), arXiv:1911.05722; Caron et al.
    2020, "SwAV", arXiv:2006.09882.
    """

    queue: Tensor
    ptr: Tensor
    filled: Tensor
    #: Written only through :meth:`enqueue`, which records its rows in :func:`journal_writes`.
    journaled_buffers: ClassVar[tuple[str, ...]] = ("queue",)

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        """Create a queue of ``size`` rows of width ``dim`` with random unit-vector rows.

        References: He et al. 2020, "Momentum Contrast" (MoCo), arXiv:1911.05722.
        """
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"size and dim must be positive, got {size}, {dim}")
        init = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.register_buffer("queue", init)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        """Return the capacity of the queue (rows of ``queue``).

        References: He et al. 2020, "Momentum Contrast" (MoCo), arXiv:1911.05722.
        """
        return self.queue.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write ``keys (B, D)`` from every process, oldest rows first out, wrapping around.

        The keys of all processes are concatenated in rank order first, so every process's
        queue stays identical. Any ``B`` works: a batch larger than the queue keeps only its
        last ``size`` rows, exactly as writing it row by row would. Keys are stored as
        given (normalise them beforehand if the method needs unit vectors).

        References: He et al. 2020, "Momentum Contrast" (MoCo), arXiv:1911.05722.
        """
        if keys.ndim != 2 or keys.shape[1] != self.queue.shape[1]:
            raise ValueError(f"keys must be (B, {self.queue.shape[1]}), got {tuple(keys.shape)}")
        keys = concat_all_gather(keys).to(self.queue.dtype)
        n = keys.shape[0]
        if n == 0:
            return
        size = self.size
        # Rows that would be overwritten within this same batch are skipped, which also
        # keeps the scatter free of duplicate indices (non-deterministic on GPU). The write
        # position stays on the device (no read of ``ptr``): no host sync in a GPU step.
        skip = max(0, n - size)
        rows = (self.ptr + skip + torch.arange(n - skip, device=self.queue.device)) % size
        _record(self.queue, rows)
        self.queue.index_copy_(0, rows, keys[skip:])
        self.ptr.copy_((self.ptr + n) % size)
        self.filled.copy_((self.filled + n).clamp(max=size))

    def values(self, only_filled: bool = True) -> Tensor:
        """Return the stored keys, ``(filled, D)`` by default or ``(size, D)`` with init rows.

        Only-filled (the default) is what SwAV needs: early in training the random init
        rows are not features. MoCo uses its random init as negatives from the first step,
        which ``only_filled=False`` reproduces. Rows are in storage order, not age order;
        the result is a copy, so a later ``enqueue`` cannot alter a tensor saved for backward.

        References: He et al. 2020, "Momentum Contrast" (MoCo), arXiv:1911.05722; Caron et
        al. 2020, "SwAV", arXiv:2006.09882.
        """
        if only_filled:
            # Until the first wrap-around the written rows are exactly the first `filled`.
            return self.queue[: int(self.filled)].clone()
        return self.queue.clone()


def available_memory(device: torch.device | str) -> int | None:
    """Bytes free for new tensors on ``device``: CUDA's free memory, or the host's available
    RAM (``MemAvailable`` of ``/proc/meminfo``, else ``sysconf``); ``None`` where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_bank_fits(num_samples: int, dim: int, device: torch.device | str = "cpu", copies: int = 1) -> None:
    """Raise a one-line ``ConfigError`` if ``copies`` float32 banks ``(num_samples, dim)``
    would take more than half the free memory of ``device`` (the other half is left for
    the model, activations and the data).

    References: Wu et al. 2018, InstDisc, arXiv:1805.01978 (the bank holds every sample).
    """
    need = copies * num_samples * dim * 4
    free = available_memory(device)
    if free is not None and need > free // 2:
        raise ConfigError(
            f"memory bank of {copies} x {num_samples} samples x {dim} floats needs {need / 2**30:.2f} GiB, "
            f"over half the {free / 2**30:.2f} GiB free on {torch.device(device)}; lower the feature "
            "width (method.proj_dim / feat_dim) or train on a subset of the data"
        )


class IndexMemoryBank(nn.Module):
    """One feature vector per dataset sample, ``bank (N, D)``, updated by momentum.

    Initialised with random unit vectors. Construction checks that the bank fits in the
    host's memory (it is created there, then moves with the method to the training device).

    References: Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric
    Instance Discrimination" (InstDisc), arXiv:1805.01978.
    """

    bank: Tensor
    #: Written only through :meth:`update` and :meth:`fill`, recorded in :func:`journal_writes`.
    journaled_buffers: ClassVar[tuple[str, ...]] = ("bank",)

    def __init__(self, num_samples: int, dim: int, generator: torch.Generator | None = None) -> None:
        """Create a bank of ``num_samples`` random unit vectors of width ``dim``.

        References: Wu et al. 2018, InstDisc, arXiv:1805.01978.
        """
        super().__init__()
        if num_samples <= 0 or dim <= 0:
            raise ValueError(f"num_samples and dim must be positive, got {num_samples}, {dim}")
        check_bank_fits(num_samples, dim, "cpu")
        init = F.normalize(torch.randn(num_samples, dim, generator=generator), dim=1)
        self.register_buffer("bank", init)

    @torch.no_grad()
    def update(self, index: Tensor, features: Tensor, momentum: float = 0.5) -> None:
        """Blend ``features (B, D)`` into rows ``index (B,)``: ``normalize(m*bank + (1-m)*f)``.

        Indices and features of all processes are gathered first so every bank stays
        identical. Indices should be distinct within a (global) batch; with repeats one of
        the updates wins. Default momentum 0.5 is the paper's.

        References: Wu et al. 2018, InstDisc, arXiv:1805.01978.
        """
        if features.ndim != 2 or index.shape != features.shape[:1]:
            raise ValueError(
                f"index must be (B,) and features (B, D), got {tuple(index.shape)}, {tuple(features.shape)}"
            )
        index = concat_all_gather(index.to(self.bank.device, torch.long))
        features = concat_all_gather(features).to(self.bank.dtype)
        mixed = momentum * self.bank[index] + (1.0 - momentum) * features
        _record(self.bank, index)
        self.bank[index] = F.normalize(mixed, dim=1)

    @torch.no_grad()
    def fill(self, features: Tensor) -> None:
        """Overwrite every row with the L2-normalised ``features (N, D)`` (row ``i`` = sample ``i``).

        No gathering: ``features`` must already be the whole data set's, identical on every
        process (a feature pass gathered in rank order gives that).

        References: Wu et al. 2018, InstDisc, arXiv:1805.01978 (the paper starts from random
        unit vectors; filling from features is this library's ``bank_init="features"``).
        """
        if tuple(features.shape) != tuple(self.bank.shape):
            raise ValueError(f"features must be {tuple(self.bank.shape)} to fill the bank, got {tuple(features.shape)}")
        _record(self.bank, None)
        self.bank.copy_(F.normalize(features.to(self.bank.device, self.bank.dtype), dim=1))

    def get(self, index: Tensor) -> Tensor:
        """Return a copy of the rows ``index (B,)`` as ``(B, D)``.

        References: Wu et al. 2018, InstDisc, arXiv:1805.01978.
        """
        return self.bank[index.to(self.bank.device, torch.long)].clone()

    def sample_negatives(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` rows uniformly with replacement: indices ``(n,)`` and features ``(n, D)``.

        Uniform noise is InstDisc's ``P_n = 1/N``. The generator, if given, must live on the
        bank's device. Reshape to ``(B, K, D)`` for per-sample negatives.

        References: Wu et al. 2018, InstDisc, arXiv:1805.01978.
        """
        idx = torch.randint(self.bank.shape[0], (n,), generator=generator, device=self.bank.device)
        return idx, self.bank[idx].clone()
