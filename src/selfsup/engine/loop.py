"""The one training loop: optimisation steps of any ``Method``, nothing else.

It knows nothing of configs, run folders, logging or evaluation (``selfsup.engine.run`` wraps
it for ``selfsup pretrain``); pretraining, fine-tuning, the benchmarks and the tests all run
their steps through it. One optimisation step, at one place (:meth:`TrainingLoop.step`):

    set lr / wd -> for each micro-batch: views on the device, forward under autocast,
    finite-loss flag, backward (``no_sync`` on all but the last micro-batch)
    -> method.on_after_backward -> clip, optimiser step, zero grad
    -> EMA for each (student, teacher) pair -> method.on_step_end(step, outputs)

and before the first step of every epoch, ``method.on_epoch_start``. A NaN or infinite loss
never reaches the weights, the optimiser state, the buffers or a checkpoint, in one of two ways:

- on the CPU (``sync_free=False``) the flag is read at once, before ``backward``, and the step
  raises :class:`NonFiniteLossError` (a device->host read costs nothing there);
- on a GPU (``sync_free=True``) the step never waits for the device: the loss parts stay
  device tensors (:class:`StepParts`), the optimiser skips its update on the device (fused
  optimisers through their ``found_inf`` input, as AMP's ``GradScaler`` does; others by a
  ``torch.where`` restore), the EMA momentum becomes 1 and the buffers (BatchNorm statistics,
  centres, teachers' buffers) are restored with ``torch.where``; a queue or memory bank
  (``journaled_buffers`` of ``selfsup.nn.memory``) gets back only the rows the step overwrote,
  which it recorded as it wrote them (``journal_writes``), instead of a copy of the whole
  memory every step (a 65536 x 128 MoCo queue: 32 MiB). The flags are read in one go by
  :meth:`TrainingLoop.check_finite` (``run`` calls it every ``check_every`` steps and at epoch
  ends), which raises :class:`NonFiniteLossError` for the first non-finite step.

The host syncs left on a GPU: none in the loop's own step; one per ``check_every`` steps (the
flags) and one when the caller reads a step's parts (``parts["loss"]``, at the log interval).
Outside the loop's control: a method's own reads (SwAV reads how full its queue is; the
queue's enqueue itself keeps its write position on the device), and a non-fused optimiser
whose state sits on the host (``build_optimizer`` builds fused SGD / AdamW on a GPU). A
skipped step does not undo what a method itself does to its parameters in ``on_step_end``
(SwAV re-normalises its prototypes: harmless, idempotent).
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.engine.optim import set_schedule
from selfsup.errors import TrainingError
from selfsup.methods.base import Batch, EpochContext, Method, StepInfo
from selfsup.nn.ema import update_ema
from selfsup.nn.memory import RowWrite, journal_writes
from selfsup.schedules import cosine_schedule
from selfsup.transforms import to_float


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; names the step and every loss part."""

    def __init__(self, step: int, parts: dict[str, float]) -> None:
        self.step = step
        self.parts = parts
        shown = ", ".join(f"{k}={v:.4g}" for k, v in parts.items())
        super().__init__(
            f"non-finite loss at step {step}: {shown}. Nothing was updated by this step; "
            "lower optim.lr, enable optim.clip_grad, or use train.precision=fp32."
        )


@dataclass
class DataBatch:
    """A batch as the data gives it, before augmentation.

    Attributes:
        images: ``(B, C, H, W)`` uint8 images.
        index: ``(B,)`` int64 sample indices in the data set.
        label: ``(B,)`` int64 labels (``-1`` = unknown), or ``None``.
        text: ``B`` captions (image-text data), or ``None``.
        mask: ``(B, H, W)`` int64 segmentation masks, or ``None``.
    """

    images: Tensor
    index: Tensor
    label: Tensor | None = None
    text: Sequence[str] | None = None
    mask: Tensor | None = None

    @classmethod
    def from_triple(cls, triple: tuple[Tensor, Tensor, Tensor]) -> DataBatch:
        """From the loaders' ``(images, labels, indices)``; all-``-1`` labels become ``None``."""
        images, labels, index = triple
        known = labels is not None and labels.numel() > 0 and bool((labels >= 0).all())
        return cls(images=images, index=index, label=labels if known else None)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def chunks(self, n: int) -> list[DataBatch]:
        """``n`` micro-batches of (nearly) equal size, in order."""
        sizes = [t.shape[0] for t in self.images.chunk(n)]
        out, start = [], 0
        for size in sizes:
            part = slice(start, start + size)
            out.append(
                DataBatch(
                    images=self.images[part],
                    index=self.index[part],
                    label=None if self.label is None else self.label[part],
                    text=None if self.text is None else list(self.text[part]),
                    mask=None if self.mask is None else self.mask[part],
                )
            )
            start += size
        return out


@dataclass(frozen=True)
class LoopSchedule:
    """The engine's own per-step values, as pure functions of the step.

    Attributes:
        total_steps: optimisation steps in the whole run.
        steps_per_epoch: optimisation steps in one pass over the data.
        peak_lr: lr after the warm-up; cosine decay to ``min_lr`` at ``total_steps``.
        min_lr: final lr.
        warmup_steps: linear lr warm-up from 0.
        weight_decay: ``(start, end)`` of a cosine weight-decay schedule (equal = constant).
        ema_momentum: ``(start, end)`` of the cosine teacher-momentum schedule.
    """

    total_steps: int
    steps_per_epoch: int
    peak_lr: float
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: tuple[float, float] = (0.0, 0.0)
    ema_momentum: tuple[float, float] = (0.996, 1.0)

    def step_info(self, step: int, extra: Mapping[str, Callable[[int, int, float], float]] | None = None) -> StepInfo:
        """Every scheduled value at ``step``, the method's own (``extra``) included."""
        lr = cosine_schedule(step, self.total_steps, self.peak_lr, self.min_lr, self.warmup_steps)
        wd = cosine_schedule(step, self.total_steps, *self.weight_decay)
        momentum = cosine_schedule(step, self.total_steps, *self.ema_momentum)
        info = StepInfo(
            step=step,
            total_steps=self.total_steps,
            epoch=step / self.steps_per_epoch,
            lr=lr,
            weight_decay=wd,
            ema_momentum=momentum,
        )
        return info.with_schedules(extra or {})


class StepParts(Mapping[str, float]):
    """One step's loss parts (each the mean over the micro-batches), where they were computed.

    A ``Mapping[str, float]``: reading a value (``parts["loss"]``, ``dict(parts)``) copies every
    part to the host at once, which on a GPU waits for the step to finish, so a caller reads
    them only when it logs. ``raw`` holds the parts themselves (0-dim detached tensors, or
    floats a method returned as numbers) and ``finite`` the step's 0-dim bool flag, both
    usable without a sync.

    Args:
        step: the optimisation step.
        values: name -> 0-dim tensor (on the device) or float.
        finite: whether the step's loss was finite on every micro-batch (and every process).
    """

    def __init__(self, step: int, values: Mapping[str, Tensor | float], finite: Tensor) -> None:
        self.step = step
        self.raw = dict(values)
        self.finite = finite
        self._floats: dict[str, float] | None = None

    def floats(self) -> dict[str, float]:
        """The parts as floats (one device->host copy for all of them, done once)."""
        if self._floats is None:
            tensors = {k: v for k, v in self.raw.items() if isinstance(v, Tensor)}
            read = torch.stack([v.float() for v in tensors.values()]).tolist() if tensors else []
            host = dict(zip(tensors, read))
            self._floats = {k: host[k] if k in host else float(v) for k, v in self.raw.items()}
        return self._floats

    def __getitem__(self, key: str) -> float:
        return self.floats()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)


def _mean(values: list[Tensor | float]) -> Tensor | float:
    """The mean over micro-batches, on the device for tensors (no sync)."""
    if len(values) == 1:
        return values[0]
    if all(isinstance(v, Tensor) for v in values):
        return torch.stack([v.float() for v in values if isinstance(v, Tensor)]).mean()
    return sum(float(v) / len(values) for v in values)


def _concat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# ---------------------------------------------------------------------------- precision
#: /proc/cpuinfo flags of CPUs with native bfloat16 arithmetic (Intel AMX, AVX512-BF16).
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def time_bf16_on_cpu(repeats: int = 3) -> tuple[float, float]:
    """``(fp32 seconds, bf16 seconds)``: the best of ``repeats`` interleaved forward+backward
    passes of a small conv + linear model, in float32 and under bfloat16 autocast (~0.2 s)."""
    import time

    with torch.random.fork_rng(devices=[]):  # the run's random stream stays as seeded
        model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16 * 16, 64))
    x = torch.randn(32, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    best = {False: math.inf, True: math.inf}
    for _ in range(repeats + 1):  # the first round warms both variants up
        for bf16 in (False, True):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(x).float().pow(2).mean()
            loss.backward()
            best[bf16] = min(best[bf16], time.perf_counter() - start)
    return best[False], best[True]


def choose_cpu_precision(flags: frozenset[str], measure: Callable[[], tuple[float, float]]) -> str:
    """``"bf16"`` when the CPU has native bfloat16 units (``BF16_CPU_FLAGS``) and ``measure()``
    (``(fp32 s, bf16 s)``) shows bf16 at least 10% faster; otherwise ``"fp32"``: without
    those units PyTorch emulates bf16 and is slower than float32."""
    if not flags & BF16_CPU_FLAGS:
        return "fp32"
    fp32_s, bf16_s = measure()
    return "bf16" if bf16_s < 0.9 * fp32_s else "fp32"


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` for ``device``: ``"fp32"`` and ``"bf16"`` as given; ``"auto"`` is
    bf16 on a CUDA GPU that supports it, on a CPU as :func:`choose_cpu_precision` decides,
    else fp32."""
    if precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return choose_cpu_precision(cpu_flags(), time_bf16_on_cpu)
    return "fp32"


# ---------------------------------------------------------------------------- device-side skips
def _where_restore(tensors: Sequence[Tensor], saved: Sequence[Tensor | None], keep: Tensor) -> None:
    """``t = t if keep else saved`` for each tensor, on the device (``saved`` ``None``: the
    tensor did not exist before the step; it becomes zeros, the lazily built state's start)."""
    for t, s in zip(tensors, saved):
        flag = keep if t.device == keep.device else keep.to(t.device)  # host-held state: a sync
        t.copy_(torch.where(flag, t, torch.zeros((), dtype=t.dtype, device=t.device) if s is None else s))


def journaled_buffer_names(module: nn.Module) -> frozenset[str]:
    """Names (as in ``module.named_buffers()``) of the buffers whose owners record every
    write in :func:`selfsup.nn.memory.journal_writes` (their ``journaled_buffers``)."""
    return frozenset(
        f"{prefix}.{name}" if prefix else name
        for prefix, sub in module.named_modules()
        for name in getattr(sub, "journaled_buffers", ())
    )


def _undo_writes(journal: Sequence[RowWrite], keep: Tensor) -> None:
    """Puts back, where ``keep`` is false, the rows each recorded write overwrote (newest
    first, so a row written twice ends as it was before the first write); touches only
    those rows, ``(B, D)`` each, where ``keep`` is true too (rewriting their own values)."""
    for write in reversed(journal):
        buffer, flag = write.buffer, keep.to(write.buffer.device)
        if write.rows is None:
            buffer.copy_(torch.where(flag, buffer, write.before))
        else:
            now = buffer.index_select(0, write.rows)
            buffer.index_copy_(0, write.rows, torch.where(flag, now, write.before))


@torch.no_grad()
def masked_ema(student: nn.Module, teacher: nn.Module, momentum: float, finite: Tensor) -> None:
    """:func:`selfsup.nn.ema.update_ema` with momentum 1 (no change) where ``finite`` is
    false, decided on the device: ``t = m' * t + (1 - m') * s``, ``m' = m if finite else 1``.
    Buffers are copied as ``update_ema`` does (the step restores them if it was skipped)."""
    t_params: list[Tensor] = list(teacher.parameters())
    s_params: list[Tensor] = list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError(f"student has {len(s_params)} parameters, teacher has {len(t_params)}")
    if t_params:
        m = torch.where(finite, momentum, 1.0).to(t_params[0].dtype)
        torch._foreach_mul_(t_params, m)
        torch._foreach_add_(t_params, list(torch._foreach_mul(s_params, 1.0 - m)))
    for s, t in zip(student.buffers(), teacher.buffers()):
        t.copy_(s)


class TrainingLoop:
    """Optimisation steps of ``method`` with ``optimizer`` on batches of uint8 images.

    Args:
        method: the method to train.
        optimizer: over ``method.param_groups()`` (or any groups of its parameters).
        schedule: the engine's per-step values (lr, weight decay, EMA momentum).
        train_views: the view recipe, float images in ``[0, 1]`` ``(B, C, H, W)`` -> views.
        device: where the step runs.
        model: what the forward calls (``method`` or its ``DistributedDataParallel`` wrapper).
        accum_steps: micro-batches per optimisation step (gradient accumulation).
        precision: ``"fp32"``, ``"bf16"`` (autocast of the forward; losses stay float32) or
            ``"auto"`` (:func:`resolve_precision`; the result is ``self.precision``).
        channels_last: views in channels-last memory layout.
        clip_grad: max global gradient norm, 0 = no clipping.
        encode_pretrain: ``encode(fn) -> (N, D)`` over the whole pretraining set, for
            ``on_epoch_start`` (``None``: a method that asks for it gets a clear error).
        num_samples: size of the pretraining set (for ``EpochContext``).
        sync_free: never wait for the device inside a step (see the module docstring);
            ``None`` = on a CUDA device.
        compile: ``torch.compile`` the forward the loop calls (``model``, in place: the state
            dict keeps its keys).
    """

    #: Sync-free mode reads the flags by itself after this many unchecked steps.
    MAX_UNCHECKED = 1024

    def __init__(
        self,
        method: Method,
        optimizer: torch.optim.Optimizer,
        schedule: LoopSchedule,
        train_views: Callable[[Tensor], list[Tensor]],
        device: torch.device,
        *,
        model: nn.Module | None = None,
        accum_steps: int = 1,
        precision: str = "fp32",
        channels_last: bool = False,
        clip_grad: float = 0.0,
        encode_pretrain: Callable[[Callable[[Tensor], Tensor]], Tensor] | None = None,
        num_samples: int = 0,
        sync_free: bool | None = None,
        compile: bool = False,
    ) -> None:
        if accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
        self.method = method
        self.model = model if model is not None else method
        self.optimizer = optimizer
        self.schedule = schedule
        self.train_views = train_views
        self.device = device
        self.accum_steps = accum_steps
        self.precision = resolve_precision(precision, device)
        self.channels_last = channels_last
        self.clip_grad = clip_grad
        self.encode_pretrain = encode_pretrain
        self.num_samples = num_samples
        self.sync_free = device.type == "cuda" if sync_free is None else sync_free
        self._method_schedules = method.schedules()
        #: Buffers a sync-free step restores from the rows their owners journaled.
        self._journaled = journaled_buffer_names(method)
        self._true = torch.ones((), dtype=torch.bool, device=device)
        #: Steps run since the last :meth:`check_finite` (sync-free mode only).
        self._unchecked: list[StepParts] = []
        if compile:
            if device.type == "cpu" and not any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++")):
                raise ValueError(
                    "train.compile=true needs a C++ compiler for the CPU (no c++, g++ or clang++ on PATH): "
                    "install one or set train.compile=false"
                )
            self.model.compile()

    def step_info(self, step: int) -> StepInfo:
        return self.schedule.step_info(step, self._method_schedules)

    # ------------------------------------------------------------------ one step
    def _batch(self, data: DataBatch) -> Batch:
        """The method's ``Batch``: augmented views plus the optional fields it declared."""
        wanted = self.method.batch_fields
        fields: dict[str, Any] = {}
        for name in ("label", "text", "mask"):
            if name in wanted:
                value = getattr(data, name)
                if value is None:
                    raise ValueError(
                        f"{type(self.method).__name__} needs the batch field {name!r}, which this data does not provide"
                    )
                fields[name] = value.to(self.device, non_blocking=True) if isinstance(value, Tensor) else value
        # non_blocking: a blocking host->GPU copy waits for the GPU's queued work (a sync).
        x = to_float(data.images.to(self.device, non_blocking=True))
        views = self.train_views(x)
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return Batch(views=views, index=data.index.to(self.device, non_blocking=True), images=x, **fields)

    def step(self, data: DataBatch, info: StepInfo) -> StepParts:
        """One optimisation step on ``data``; returns the loss parts (mean over micro-batches,
        plus ``grad_norm`` when clipping): floats read at once on the CPU, device tensors in
        sync-free mode (read when the caller reads them; :meth:`check_finite` reads the flags).

        Raises:
            NonFiniteLossError: (``sync_free=False``) the loss of a micro-batch is NaN or
                infinite; raised before its ``backward``, so nothing was updated.
        """
        set_schedule(self.optimizer, info.lr, info.weight_decay)
        chunks = data.chunks(self.accum_steps)
        # Sync-free: the state a skipped step must leave as it was (BatchNorm statistics from
        # the forward, centres from on_step_end, the teachers' copied buffers). Queues and
        # banks are not copied: they journal the rows they overwrite (the step runs inside
        # journal_writes), and their version counters prove nothing else wrote them.
        buffers: dict[str, Tensor] = {}
        versions: dict[str, tuple[Tensor, int]] = {}
        if self.sync_free:
            for k, b in self.method.named_buffers():
                if k in self._journaled:
                    versions[k] = (b, b._version)
                else:
                    buffers[k] = b.clone()
        recording: contextlib.AbstractContextManager[list[RowWrite]]
        recording = journal_writes() if self.sync_free else contextlib.nullcontext([])
        with recording as journal:
            parts = self._step(data, info, chunks)
        if self.sync_free:
            with torch.no_grad():
                now = dict(self.method.named_buffers())
                self._check_journal(now, versions, journal)
                names = [k for k in buffers if k in now and now[k].shape == buffers[k].shape]
                _where_restore([now[k] for k in names], [buffers[k] for k in names], parts.finite)
                _undo_writes(journal, parts.finite)
            self._unchecked.append(parts)
            if len(self._unchecked) >= self.MAX_UNCHECKED:  # a caller that never checks
                self.check_finite()
        return parts

    @staticmethod
    def _check_journal(
        now: Mapping[str, Tensor], versions: Mapping[str, tuple[Tensor, int]], journal: Sequence[RowWrite]
    ) -> None:
        """Raises unless each journaled buffer is the same tensor as before the step and was
        written (``_version`` bumps) exactly once per recorded write: a write that bypassed
        ``journal_writes`` could not be undone."""
        for name, (tensor, version) in versions.items():
            writes = sum(1 for write in journal if write.buffer is tensor)
            if now.get(name) is not tensor or tensor._version - version != writes:
                raise RuntimeError(
                    f"buffer {name!r} was replaced or written outside its owner's journaled writes "
                    "(FIFOQueue.enqueue, IndexMemoryBank.update / fill) during a sync-free step, so a "
                    "skipped step could not restore it; write it through those methods"
                )

    def _step(self, data: DataBatch, info: StepInfo, chunks: list[DataBatch]) -> StepParts:
        """:meth:`step` from the micro-batches to ``on_step_end`` (the buffers' restore of a
        skipped sync-free step is the caller's)."""
        scalars: dict[str, list[Tensor | float]] = {}
        products: dict[str, list[Tensor]] = {}
        finite = self._true  # sync-free: and-ed with each micro-batch's flag, on the device
        for i, chunk in enumerate(chunks):
            batch = self._batch(chunk)
            last = i == len(chunks) - 1
            no_sync = getattr(self.model, "no_sync", None)
            sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                    out = self.model(batch, info)
                for key, value in out.items():
                    if isinstance(value, Tensor) and value.ndim > 0:
                        products.setdefault(key, []).append(value.detach())
                    elif isinstance(value, Tensor):  # on the CPU a read is free; a GPU keeps it
                        scalars.setdefault(key, []).append(value.detach() if self.sync_free else float(value.detach()))
                    else:
                        scalars.setdefault(key, []).append(float(value))
                if self.sync_free:
                    finite = finite & torch.isfinite(out["loss"].detach())
                elif not math.isfinite(scalars["loss"][-1]):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteLossError(info.step, {k: float(v[-1]) for k, v in scalars.items()})
                (out["loss"] / len(chunks)).backward()
        values = {key: _mean(parts) for key, parts in scalars.items()}
        if self.sync_free:
            finite = self._agree(finite)
        self.method.on_after_backward(info)
        if self.clip_grad > 0:
            params = [p for p in self.method.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad).detach()
            values["grad_norm"] = norm if self.sync_free else float(norm)
        if self.sync_free:
            self._skippable_optimizer_step(finite)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for student, teacher in self.method.ema_pairs():
            if self.sync_free:
                masked_ema(student, teacher, info.ema_momentum, finite)
            else:
                update_ema(student, teacher, info.ema_momentum)
        self.method.on_step_end(info, {key: _concat(parts) for key, parts in products.items()})
        return StepParts(info.step, values, finite)

    def _agree(self, finite: Tensor) -> Tensor:
        """The flag of every process (their minimum) under ``DistributedDataParallel``: the
        gradients are averaged over processes, so one process's NaN reaches them all."""
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(self.model, DistributedDataParallel):
            return finite
        flag = finite.to(torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=self.model.process_group)
        return flag.bool()

    @torch.no_grad()
    def _skippable_optimizer_step(self, finite: Tensor) -> None:
        """``optimizer.step()`` that changes nothing where ``finite`` is false, decided on the
        device. Fused optimisers (``fused=True`` AdamW / Adam / SGD) take the flag as their
        ``found_inf`` input, the mechanism of AMP's ``GradScaler``: the kernel skips the
        update and the step count is restored. Others are stepped, then their parameters and
        state are put back with ``torch.where`` (state the step created starts from zeros)."""
        opt: Any = self.optimizer
        if getattr(opt, "_step_supports_amp_scaling", False):
            opt.grad_scale, opt.found_inf = None, (~finite).float()
            try:
                opt.step()
            finally:
                del opt.grad_scale, opt.found_inf
            return
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        before = {
            id(p): {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, Tensor)} if p in opt.state else {}
            for p in params
        }
        saved = [p.clone() for p in params]
        opt.step()
        _where_restore(params, saved, finite)
        for p in params:
            state = {k: v for k, v in opt.state.get(p, {}).items() if isinstance(v, Tensor)}
            _where_restore(list(state.values()), [before[id(p)].get(k) for k in state], finite)

    def check_finite(self) -> None:
        """Raises :class:`NonFiniteLossError` for the first step since the last check whose
        loss was not finite (sync-free mode: one device->host read of all their flags; those
        steps changed nothing). Nothing to do on the CPU, where a step raises by itself."""
        pending, self._unchecked = self._unchecked, []
        if not pending:
            return
        flags = torch.stack([parts.finite for parts in pending]).tolist()
        for parts, ok in zip(pending, flags):
            if not ok:
                raise NonFiniteLossError(parts.step, parts.floats())

    # ------------------------------------------------------------------ epochs
    def epoch_start(self, epoch: int, info: StepInfo) -> None:
        """Calls ``method.on_epoch_start`` with the pass over the pretraining set it may ask for."""

        def encode(fn: Callable[[Tensor], Tensor]) -> Tensor:
            if self.encode_pretrain is None:
                raise RuntimeError(
                    f"{type(self.method).__name__}.on_epoch_start asked for a feature pass, "
                    "but this loop was built without encode_pretrain"
                )
            return self.encode_pretrain(fn)

        self.method.on_epoch_start(EpochContext(epoch=epoch, step=info, num_samples=self.num_samples, encode=encode))

    def run(
        self,
        batches: Iterator[DataBatch],
        start_step: int = 0,
        end_step: int | None = None,
        on_step: Callable[[StepInfo, Mapping[str, float], int], None] | None = None,
        check_every: int = 1,
    ) -> None:
        """Steps ``start_step .. end_step - 1`` (default: to ``schedule.total_steps``) on
        ``batches``, calling ``on_epoch_start`` at every epoch boundary and ``on_step(info,
        parts, images)`` after each step (``parts`` is empty and ``images`` 0 for a batch with
        fewer than 2 images, e.g. when every image of it failed to decode).

        :meth:`check_finite` runs every ``check_every`` steps, at epoch ends and after the
        last step, before ``on_step``: parts read then are finite. (Between checks, on a GPU,
        a non-finite step's parts reach ``on_step`` unchecked; the step changed nothing.)"""
        end = self.schedule.total_steps if end_step is None else end_step
        per_epoch = self.schedule.steps_per_epoch
        for step in range(start_step, end):
            info = self.step_info(step)
            if step % per_epoch == 0:
                self.epoch_start(step // per_epoch, info)
            data = next(batches)
            parts: Mapping[str, float]
            if len(data) >= 2:
                parts, seen = self.step(data, info), len(data)
            else:
                parts, seen = {}, 0
            if (step + 1) % check_every == 0 or (step + 1) % per_epoch == 0 or step + 1 == end:
                self.check_finite()
            if on_step is not None:
                on_step(info, parts, seen)
