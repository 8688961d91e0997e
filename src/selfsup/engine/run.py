"""A pretraining run: the run folder around the training loop.

:class:`PretrainRun` builds a run's parts from a config, owns its folder (``config.yaml``,
``resolved.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/last.pt``,
``backbone.safetensors``, ``results.json``, ``results.txt``, ``run_info.json``,
``loss_curve.png``), resumes from a checkpoint, logs, and evaluates at the end. The steps
themselves are :class:`selfsup.engine.loop.TrainingLoop`'s.
"""

from __future__ import annotations

import contextlib
import json
import platform
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.config import Config, ConfigError, dump_config
from selfsup.data import DataError
from selfsup.data.captions import caption_lists, sample_captions
from selfsup.data.loader import EpochBatchSampler, iterate_batches
from selfsup.engine import distributed as engine_dist
from selfsup.engine.build import Components, build_components, random_init_encoder, view_recipe_name
from selfsup.engine.checkpoint import (
    CheckpointError,
    clean_stale_temporaries,
    load_checkpoint,
    non_finite_entries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from selfsup.engine.evaluation import (
    baseline_rows,
    encode,
    evaluate_encoder,
    format_table,
    format_tokenizer_metrics,
    tokenizer_metrics,
)
from selfsup.engine.export import encoder_metadata
from selfsup.engine.logging import RunLogger, plot_loss_curve
from selfsup.engine.loop import DataBatch, LoopSchedule, NonFiniteLossError, TrainingLoop
from selfsup.engine.optim import build_optimizer
from selfsup.engine.protocols import encoder_row_names
from selfsup.errors import RunInterrupted, TrainingError
from selfsup.methods.base import StepInfo
from selfsup.nn.distributed import convert_sync_batchnorm
from selfsup.schedules import scaled_lr

__all__ = [
    "DivergedError",
    "NonFiniteLossError",
    "PretrainRun",
    "RUN_FILES",
    "default_run_name",
    "pretrain",
    "resolve_device",
]

#: What a run writes into its folder (``run.overwrite=true`` replaces exactly these).
RUN_FILES = (
    "config.yaml",
    "resolved.json",
    "metrics.jsonl",
    "tensorboard",
    "checkpoints",
    "backbone.safetensors",
    "results.json",
    "results.txt",
    "run_info.json",
    "loss_curve.png",
    "skipped.txt",
    "tokenizer.json",
    "retrieval_examples.png",
)


class DivergedError(NonFiniteLossError):
    """A non-finite loss in a run: the loop's error plus which checkpoint a resume can use."""

    def __init__(self, err: NonFiniteLossError, note: str) -> None:
        super().__init__(err.step, err.parts)
        self.args = (f"{self.args[0]} {note}",)


def resolve_device(name: str) -> torch.device:
    """The device ``train.device`` names; ``ConfigError`` when this machine lacks it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device={name!r} is not a device (use auto, cpu, cuda or cuda:<index>)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device={name!r} but this PyTorch build or machine has no usable CUDA GPU "
                "(use train.device=cpu or auto)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"train.device={name!r} but this machine has {torch.cuda.device_count()} GPU(s) "
                f"(use cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={name!r} but MPS is not available here (use train.device=cpu or auto)")
    elif device.type not in ("cpu", "mps"):
        raise ConfigError(f"train.device={name!r} is not supported (use auto, cpu, cuda or cuda:<index>)")
    return device


def default_run_name(cfg: Config) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{cfg.method['name']}-{cfg.data['name']}-{stamp}"


def cpu_name() -> str:
    """The processor's model name (for run records: timings depend on it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class PretrainRun:
    """Pretrains ``cfg.method`` on ``cfg.data`` in a run folder and evaluates it.

    Args:
        cfg: the validated config.
        command: the command line that started the run, recorded in ``run_info.json``.
    """

    def __init__(self, cfg: Config, command: str | None = None) -> None:
        self.cfg = cfg
        self.command = command
        resolve_device(cfg.train.device)  # a missing device is a config error before anything starts
        self.dist = engine_dist.setup(cfg.train.device)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        self.device = self.dist.device if self.dist.device is not None else resolve_device(cfg.train.device)
        random.seed(cfg.train.seed)
        self.run_dir, resume_from = self._run_dir()
        self.parts: Components = build_components(cfg, self.device)
        if cfg.eval.semi and cfg.eval.at_end:  # a bad label fraction fails now, not after pretraining
            from selfsup.engine.protocols import semi_supervised_splits

            semi_supervised_splits(cfg, self.parts.splits)
        if cfg.eval.dense and cfg.eval.at_end:  # a data set without masks fails now too
            from selfsup.engine.dense import check_masks

            check_masks(self.parts.splits)
        if self.dist.rank > 0:
            # Every process built the same initial model from the same seed; from here on each
            # draws its own augmentations and masks (identical draws on different images
            # would correlate the views across processes). Rank 0 keeps the seed's stream, so
            # its randomness is that of a single-process run.
            torch.manual_seed(cfg.train.seed + 1000003 * self.dist.rank)
        self.method = self.parts.method
        if cfg.train.sync_batchnorm and self.dist.world_size > 1:
            # Before DDP and the optimiser: both must see the converted module, whose BN
            # layers share the original parameter tensors.
            self.method = convert_sync_batchnorm(self.method, self.device)  # type: ignore[assignment]
        if cfg.train.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model = engine_dist.wrap(self.method, self.dist)

        splits = self.parts.splits
        try:
            self.sampler = EpochBatchSampler(
                len(splits.pretrain),
                cfg.train.batch_size,
                cfg.train.seed,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
            )
        except DataError:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} x {self.dist.world_size} process(es) is larger than "
                f"the {len(splits.pretrain)} pretraining images of {splits.name!r} (lower train.batch_size "
                "or use more data)"
            ) from None
        self.steps_per_epoch = self.sampler.steps_per_epoch
        by_epochs = max(1, round(cfg.train.epochs * self.steps_per_epoch))
        self.total_steps = min(by_epochs, cfg.train.max_steps) if cfg.train.max_steps else by_epochs

        self.global_batch = cfg.train.batch_size * self.dist.world_size
        rule = cfg.optim.lr_scaling or self.method.lr_scaling
        peak_lr = scaled_lr(cfg.optim.lr, self.global_batch, rule)
        wd_end = cfg.optim.weight_decay if cfg.optim.weight_decay_end is None else cfg.optim.weight_decay_end
        m_start, m_end = cfg.train.ema_momentum or self.method.default_ema_momentum
        self.schedule = LoopSchedule(
            total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch,
            peak_lr=peak_lr,
            min_lr=peak_lr * cfg.optim.min_lr_ratio,
            warmup_steps=round(cfg.optim.warmup_epochs * self.steps_per_epoch),
            weight_decay=(cfg.optim.weight_decay, wd_end),
            ema_momentum=(m_start, m_end),
        )
        self.optimizer = build_optimizer(self.method.param_groups(), cfg.optim, peak_lr)
        self.loop = TrainingLoop(
            self.method,
            self.optimizer,
            self.schedule,
            self.parts.train_views,
            self.device,
            model=self.model,
            accum_steps=cfg.train.accum_steps,
            precision=self.parts.precision,  # train.precision=auto resolved once, by build_components
            channels_last=cfg.train.channels_last,
            clip_grad=cfg.optim.clip_grad,
            encode_pretrain=self._encode_pretrain,
            num_samples=len(splits.pretrain),
            compile=cfg.train.compile,
        )
        self.resolved = {
            "world_size": self.dist.world_size,
            "batch_size_per_process": cfg.train.batch_size,
            "global_batch": self.global_batch,
            "lr_scaling": rule,
            "peak_lr": peak_lr,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "view_recipe": view_recipe_name(cfg),
            "precision": self.loop.precision,  # train.precision=auto resolved for this machine
        }

        self.start_step = 0
        #: ``(path, step)`` of the newest checkpoint with finite state, or ``None``.
        self.last_good: tuple[Path, int] | None = None
        if resume_from is not None:
            self._restore(resume_from)
        # Everything is validated and built: only now does the run touch its folder.
        if self.dist.is_main:
            self._prepare_folder()
        self.logger = RunLogger(self.run_dir, cfg.run.tensorboard, enabled=self.dist.is_main)
        if self.dist.is_main:
            dump_config(cfg, self.run_dir / "config.yaml")
            (self.run_dir / "resolved.json").write_text(json.dumps(self.resolved, indent=2))

    # ------------------------------------------------------------------ setup helpers
    def _run_dir(self) -> tuple[Path, Path | None]:
        """The run folder and the checkpoint to resume from, if any, as rank 0 sees them.

        Decided on rank 0 and broadcast: every process must agree on the folder (a time-stamped
        default name could differ by a second) and on whether to resume (a process that
        restores while another starts afresh would run different steps and deadlock). The run
        folder must be on a file system every machine can read to resume a multi-node run.
        """
        cfg = self.cfg
        resume = cfg.run.resume
        if resume not in (None, "auto"):
            path = Path(resume)
            ckpt = path / "checkpoints" / "last.pt" if path.is_dir() else path
            run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
            return run_dir, ckpt
        run_dir = Path(cfg.run.out_dir) / (cfg.run.name or default_run_name(cfg))
        ckpt = run_dir / "checkpoints" / "last.pt"
        found = ckpt if resume == "auto" and ckpt.is_file() else None
        refused = None
        if resume is None and not cfg.run.overwrite and run_dir.is_dir() and any(run_dir.iterdir()):
            held = sorted(p.name for p in run_dir.iterdir())
            shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
            refused = (
                f"run folder {str(run_dir)!r} is not empty ({shown}); nothing was changed (continue it with "
                f"`selfsup resume {run_dir}` or run.resume=auto, replace it with run.overwrite=true, "
                "or choose another run.name)"
            )
        decided: tuple[Path, Path | None, str | None] = engine_dist.broadcast_object(
            (run_dir, found, refused), self.dist
        )
        if decided[2] is not None:  # every process raises, none waits for the others
            raise CheckpointError(decided[2])
        return decided[0], decided[1]

    def _prepare_folder(self) -> None:
        """Makes the run folder hold this run only (main process, after validation): removes
        the files of a replaced run (``run.overwrite``), temporary files of killed checkpoint
        writes, and records of steps that will run again (metrics and TensorBoard)."""
        run_dir = self.run_dir
        if self.cfg.run.overwrite:
            for name in RUN_FILES:
                target = run_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        clean_stale_temporaries(run_dir / "checkpoints")
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            kept = [
                line
                for line in metrics.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) < self.start_step
            ]
            metrics.write_text("".join(line + "\n" for line in kept))
        events = run_dir / "tensorboard"
        if self.cfg.run.tensorboard and events.is_dir() and any(events.iterdir()):
            from torch.utils.tensorboard import SummaryWriter

            # A purge marker: TensorBoard drops the events at or after this step that the
            # interrupted run wrote, so every step shows once after a resume.
            SummaryWriter(log_dir=str(events), purge_step=self.start_step).close()

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        saved_batch = state.get("resolved", {}).get("global_batch")
        if saved_batch is not None and saved_batch != self.global_batch:
            # Steps, epochs, the data order and the lr schedule are all in units of the global
            # batch: continuing with another one would silently become a different run.
            saved_world = state["resolved"].get("world_size", 1)
            raise CheckpointError(
                f"{path} was trained with a global batch of {saved_batch} ({saved_world} process(es) x "
                f"{saved_batch // saved_world}); this run has {self.dist.world_size} x {self.cfg.train.batch_size} "
                f"= {self.global_batch}. Keep the global batch: set train.batch_size="
                f"{saved_batch // self.dist.world_size if saved_batch % self.dist.world_size == 0 else '?'} "
                "(with train.accum_steps to fit in memory); `selfsup resume` does this by itself."
            )
        try:
            self.method.load_state_dict(state["method"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
            detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(err).__name__)
            raise CheckpointError(
                f"{path} does not fit this run's model: {detail} (resume with the method and backbone "
                "options it was trained with: drop overrides of method.* or backbone.*)"
            ) from None
        self.start_step = int(state["step"])
        self.last_good = (path, self.start_step)
        self._note_schedule_change(state)
        rng = state["rng"]
        if isinstance(rng, list):  # one state per process of the run that saved it
            rng = rng[self.dist.rank] if len(rng) == self.dist.world_size else None
        if rng is not None:
            set_rng_state(rng)
        else:  # another process count: a fresh, still deterministic, stream per process
            torch.manual_seed(self.cfg.train.seed + 1000003 * self.start_step + self.dist.rank)

    def _note_schedule_change(self, state: dict[str, Any]) -> None:
        """States in one line how the schedule differs from the checkpoint's run (another
        ``train.epochs``, ``max_steps``, lr or warm-up), since the lr then jumps on resume."""
        saved = state.get("resolved") or {}
        saved_cfg = state.get("config") or {}
        changes = []
        for key, label in (("total_steps", "total steps"), ("peak_lr", "peak lr")):
            if key in saved and saved[key] != self.resolved[key]:
                changes.append(f"{label} {saved[key]:.6g} -> {self.resolved[key]:.6g}")
        now = self.cfg.to_dict()
        for section, key in (
            ("train", "epochs"),
            ("train", "max_steps"),
            ("optim", "lr"),
            ("optim", "warmup_epochs"),
            ("optim", "min_lr_ratio"),
        ):
            before = (saved_cfg.get(section) or {}).get(key, now[section][key])
            if before != now[section][key]:
                changes.append(f"{section}.{key} {before} -> {now[section][key]}")
        if changes and self.dist.is_main:
            print(
                f"resume: the schedule differs from the checkpoint's run ({'; '.join(changes)}); from step "
                f"{self.start_step} the lr and other schedules follow the new values",
                flush=True,
            )

    def checkpoint(self, next_step: int) -> None:
        """Saves everything needed to continue at ``next_step`` (main process writes).

        Raises:
            TrainingError: the weights or the optimiser state hold a NaN or an infinity; the
                previous checkpoint is kept (a resume from it would only diverge again).
            NonFiniteLossError: a step since the last check had a non-finite loss (on a GPU
                the loop reads its flags at the log interval; a checkpoint reads them now).
        """
        self.loop.check_finite()
        engine_dist.average_batchnorm_stats(self.method, self.dist)
        method_state, optimizer_state = self.method.state_dict(), self.optimizer.state_dict()
        bad = non_finite_entries({"method": method_state, "optimizer": optimizer_state["state"]})
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise TrainingError(
                f"non-finite values after step {next_step - 1} in {shown}; not saving them as a checkpoint. "
                f"{self._resume_note()}"
            )
        states = engine_dist.gather_objects(rng_state(), self.dist)
        path = self.run_dir / "checkpoints" / "last.pt"
        if self.dist.is_main:
            save_checkpoint(
                path,
                {
                    "method": method_state,
                    "optimizer": optimizer_state,
                    "step": next_step,
                    "rng": states,
                    "config": self.cfg.to_dict(),
                    "resolved": self.resolved,
                },
            )
        self.last_good = (path, next_step)

    def _resume_note(self) -> str:
        """Which checkpoint a resume can start from, and how (for divergence errors)."""
        if self.last_good is None:
            return (
                "No checkpoint was written before it; start again with a lower optim.lr or optim.clip_grad=1 "
                "(and run.overwrite=true to reuse this run folder)."
            )
        path, step = self.last_good
        return (
            f"The last good checkpoint is {path} (step {step}); continue from it with "
            f"`selfsup resume {self.run_dir} optim.clip_grad=1` (or a lower optim.lr)."
        )

    def step_info(self, step: int) -> StepInfo:
        return self.loop.step_info(step)

    def _encode_pretrain(self, fn: Any) -> Tensor:
        """``fn`` over every pretraining image (eval view), in dataset order, on every process."""
        features, _ = encode(
            fn,
            self.parts.splits.pretrain,
            self.parts.eval_views,
            self.device,
            self.cfg.eval.batch_size,
            precision=self.loop.precision,
            num_workers=self.cfg.train.num_workers,
            gather=self.dist.world_size > 1,
        )
        return features

    # ------------------------------------------------------------------ the run
    def _batches(self, step: int) -> Iterator[DataBatch]:
        epoch, offset = divmod(step, self.steps_per_epoch)
        # Image-text methods get one caption per image, drawn per (seed, epoch, index).
        captions = caption_lists(self.parts.splits.pretrain) if "text" in self.method.batch_fields else None
        # Seconds the training loop waited in next() for a batch (this body runs only then),
        # since the last metrics record: the data_wait fraction.
        self.data_wait, clock = 0.0, time.perf_counter()
        while True:
            for triple in iterate_batches(
                self.parts.splits.pretrain, self.sampler, epoch, offset, num_workers=self.cfg.train.num_workers
            ):
                batch = DataBatch.from_triple(triple)
                if captions is not None:
                    batch.text = sample_captions(captions, batch.index, epoch, self.cfg.train.seed)
                self.data_wait += time.perf_counter() - clock
                yield batch
                clock = time.perf_counter()
            epoch, offset = epoch + 1, 0

    def fit(self) -> dict[str, Any]:
        """Trains to ``total_steps`` (from a checkpoint if resuming), then evaluates."""
        cfg = self.cfg
        from tqdm.auto import tqdm

        started = time.perf_counter()
        self.method.train()
        bar = tqdm(
            total=self.total_steps,
            initial=self.start_step,
            unit="step",
            dynamic_ncols=True,
            disable=not (cfg.train.progress and self.dist.is_main),
            desc=f"{cfg.method['name']} pretrain",
        )
        window = {"clock": time.perf_counter(), "seen": 0}

        def after_step(info: StepInfo, parts: Mapping[str, float], seen: int) -> None:
            step = info.step
            window["seen"] += seen * self.dist.world_size
            bar.update(1)
            last = step + 1 == self.total_steps
            if parts and ((step + 1) % cfg.train.log_every == 0 or last):
                # Every process reaches this on the same steps; the mean over processes
                # is the global batch's loss, comparable with a single-process run.
                parts = engine_dist.mean_over_ranks(parts, self.dist)
                elapsed = time.perf_counter() - window["clock"]
                record = {
                    **parts,
                    "lr": info.lr,
                    "wd": info.weight_decay,
                    "epoch": info.epoch,
                    "images_per_s": window["seen"] / max(elapsed, 1e-9),
                    "data_wait": self.data_wait / max(elapsed, 1e-9),  # fraction of the time
                    **info.extra,
                }
                if self.method.uses_ema:
                    record["ema_momentum"] = info.ema_momentum
                self.logger.log(record, step)
                bar.set_postfix(loss=f"{parts['loss']:.4f}", lr=f"{info.lr:.3g}", img_s=f"{record['images_per_s']:.0f}")
                window["clock"], window["seen"] = time.perf_counter(), 0
                self.data_wait = 0.0
            epoch_end = (step + 1) % self.steps_per_epoch == 0
            epochs_done = (step + 1) // self.steps_per_epoch
            if epoch_end and cfg.train.knn_every and epochs_done % cfg.train.knn_every == 0 and not last:
                self.logger.log(self.online_knn(), step)
            if last or epoch_end or (cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0):
                self.checkpoint(step + 1)

        stop = _StopRequest()
        with stop.installed():
            try:
                self.loop.run(
                    self._batches(self.start_step),
                    self.start_step,
                    on_step=self._stop_after(after_step, stop),
                    check_every=cfg.train.log_every,  # the loss is read (a GPU sync) when logged
                )
            except NonFiniteLossError as err:
                raise DivergedError(err, self._resume_note()) from None
            finally:
                bar.close()
                if self.dist.is_main:
                    self.report_skipped()
        train_seconds = time.perf_counter() - started
        results: dict[str, Any] = {}
        if self.dist.is_main:  # the last step's checkpoint already averaged the BN statistics
            self.export_backbone()
            plot_loss_curve(self.run_dir)
        if cfg.eval.at_end:
            results = self.evaluate()
            if self.dist.is_main:
                self.report_skipped()
        if self.dist.is_main:
            self.write_run_info(train_seconds, time.perf_counter() - started)
        self.logger.close()
        return results

    def _stop_after(
        self, after_step: Callable[[StepInfo, Mapping[str, float], int], None], stop: _StopRequest
    ) -> Callable[[StepInfo, Mapping[str, float], int], None]:
        """``after_step``, then, if SIGINT or SIGTERM arrived (on any process), a checkpoint
        (unless this step wrote one) and :class:`RunInterrupted` saying how to resume."""

        def on_step(info: StepInfo, parts: Mapping[str, float], seen: int) -> None:
            after_step(info, parts, seen)
            signum = stop.signum or 0
            if self.dist.world_size > 1:  # every process must stop at the same step
                got = engine_dist.mean_over_ranks(
                    {"term": float(signum == signal.SIGTERM), "int": float(signum == signal.SIGINT)}, self.dist
                )
                signum = signal.SIGTERM if got["term"] > 0 else signal.SIGINT if got["int"] > 0 else 0
            if not signum:
                return
            step = info.step + 1
            if self.last_good is None or self.last_good[1] != step:  # unless this step saved one
                self.checkpoint(step)
            self.logger.close()
            name = signal.Signals(signum).name
            raise RunInterrupted(
                f"{name} received: stopped after step {step} of {self.total_steps} and saved "
                f"{self.run_dir / 'checkpoints' / 'last.pt'} (continue with `selfsup resume {self.run_dir}`)",
                signum,
            )

        return on_step

    def report_skipped(self) -> None:
        """Lists the images that failed to decode in ``skipped.txt`` and says so in one line."""
        splits = self.parts.splits
        paths: set[str] = set()
        total = 0
        for ds in {id(d): d for d in (splits.pretrain, splits.train, splits.test)}.values():
            skipped = getattr(ds, "skipped_paths", None)
            if skipped is not None:
                paths.update(skipped)
                total += len(ds)
        if not paths:
            return
        out = self.run_dir / "skipped.txt"
        known = set(out.read_text().splitlines()) if out.is_file() else set()
        if paths <= known:
            return
        paths |= known
        out.write_text("".join(f"{p}\n" for p in sorted(paths)))
        print(
            f"skipped {len(paths)} unreadable image(s) of {total} (data.on_error=skip); the list is in {out}",
            file=sys.stderr,
            flush=True,
        )

    def write_run_info(self, train_seconds: float, wall_seconds: float) -> None:
        """``run_info.json``: the command, its timings and the machine (read by ``selfsup report``).
        A resumed run records the time of its last part only."""
        info = {
            "command": self.command,
            "train_seconds": round(train_seconds, 1),
            "eval_seconds": round(wall_seconds - train_seconds, 1),
            "wall_seconds": round(wall_seconds, 1),
            "resumed_from_step": self.start_step,
            "threads": torch.get_num_threads(),
            "world_size": self.dist.world_size,
            "cpu": cpu_name(),
            "device": str(self.device),
            "precision": self.loop.precision,
            "torch": torch.__version__,
            "finished": datetime.now().isoformat(timespec="seconds"),
        }
        (self.run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")

    # ------------------------------------------------------------------ evaluation
    def online_knn(self) -> dict[str, float]:
        """kNN top-1 (k=20) on a labelled subset, features in eval mode from un-augmented
        images, and the collapse monitors of those test features."""
        splits, cfg = self.parts.splits, self.cfg
        if splits.num_classes < 2:
            return {}
        engine_dist.average_batchnorm_stats(self.method, self.dist)  # one model on every process
        eval_cfg = type(cfg.eval)(**{**cfg.eval.__dict__, "knn_k": [20], "cluster": False, "retrieval": False})
        metrics = evaluate_encoder(
            self.method.embed,
            self.method,
            splits.train,
            splits.test,
            splits.num_classes,
            self.parts.eval_views,
            eval_cfg,
            self.device,
            self.loop.precision,
            limit=cfg.train.knn_samples,
            linear=False,
            gather=self.dist.world_size > 1,
        )
        return {
            "knn_top1": metrics["knn_top1@20"],
            "feature_std": metrics["feature_std"],
            "effective_rank": metrics["effective_rank"],
        }

    def evaluate(self) -> dict[str, Any]:
        """Full kNN and linear-probe evaluation of the trained encoder and the baselines;
        writes ``results.json`` and prints the table."""
        cfg, splits = self.cfg, self.parts.splits
        if splits.num_classes < 2:
            return {}
        engine_dist.average_batchnorm_stats(self.method, self.dist)  # one model on every process
        # Each process encodes its shard of every split and the features are gathered, so
        # every process scores the whole split (rank 0 writes the results).
        gather = self.dist.world_size > 1
        from tqdm.auto import tqdm

        run_row, random_row = encoder_row_names(cfg, self.method)
        encoders: list[tuple[str, Any, nn.Module]] = [(run_row, self.method.embed, self.method)]
        if cfg.eval.baselines:
            random_init = random_init_encoder(cfg, splits, self.method).to(self.device)
            encoders.append((random_row, random_init, random_init))
        bar = tqdm(
            total=len(encoders) + cfg.eval.baselines,
            desc="evaluate (kNN, linear probe)",
            unit="encoder",
            disable=not (cfg.train.progress and self.dist.is_main),
            dynamic_ncols=True,
        )
        rows: dict[str, dict[str, float]] = {}
        for name, encoder, module in encoders:
            bar.set_postfix_str(name)
            rows[name] = evaluate_encoder(
                encoder,
                module,
                splits.train,
                splits.test,
                splits.num_classes,
                self.parts.eval_views,
                cfg.eval,
                self.device,
                self.loop.precision,
                seed=cfg.train.seed,
                gather=gather,
            )
            bar.update(1)
        if cfg.eval.baselines:
            bar.set_postfix_str("raw pixels, HOG")
            rows.update(
                baseline_rows(
                    splits.train, splits.test, splits.num_classes, self.parts.eval_views, cfg.eval, self.device
                )
            )
            bar.update(1)
        bar.close()
        if cfg.eval.semi and self.dist.is_main:  # fine-tuning runs in one process
            from selfsup.engine.protocols import semi_supervised_rows

            for name, metrics in semi_supervised_rows(
                self.method, cfg, splits, self.parts.eval_views, self.device, self.loop.precision
            ).items():
                rows.setdefault(name, {}).update(metrics)
        if cfg.eval.dense and self.dist.is_main:
            from selfsup.engine.dense import dense_rows

            for name, metrics in dense_rows(
                self.method,
                cfg,
                splits,
                self.parts.eval_views,
                self.device,
                baselines=cfg.eval.baselines,
                precision=self.loop.precision,
            ).items():
                rows.setdefault(name, {}).update(metrics)
        if self.dist.is_main:
            from selfsup.engine.zeroshot import has_text_side, image_text_rows

            if has_text_side(self.method):  # an image-text run: zero-shot top-1 and image<->text recall
                for name, metrics in image_text_rows(
                    self.method, cfg, splits, self.parts.eval_views, self.device, self.run_dir
                ).items():
                    rows.setdefault(name, {}).update(metrics)
        tokens: dict[str, float] = {}
        if self.dist.is_main:  # a tokenizer's reconstruction error and codebook use on the test split
            tokens = tokenizer_metrics(
                self.method, splits.test, self.parts.eval_views, self.device, cfg.eval.batch_size
            )
            rows[run_row].update(tokens)
        if self.dist.is_main:
            table = format_table(rows, f"{splits.name} test set, top-1 (%)")
            table += f"\n{format_tokenizer_metrics(tokens, splits.name + ' test')}" if tokens else ""
            (self.run_dir / "results.json").write_text(json.dumps(rows, indent=2))
            (self.run_dir / "results.txt").write_text(table + "\n")
            self.logger.log({f"final/{k}": v for k, v in next(iter(rows.values())).items()}, self.total_steps)
            print(table, flush=True)
        return rows

    def export_backbone(self) -> Path:
        """Writes the trained backbone's weights as ``backbone.safetensors``."""
        from safetensors.torch import save_file

        # The module that computes the run's ``embed``: the evaluated backbone, or the method's
        # own encoder, whose spec then goes with it (``Method.embedder``).
        module, spec = self.method.embedder()
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        path = self.run_dir / "backbone.safetensors"
        splits = self.parts.splits
        extra = {} if spec is None else {"method": str(self.cfg.method["name"]), "embedder": spec}
        save_file(
            state,
            str(path),
            # The preprocessing the encoder expects (normalisation, eval view size) goes with
            # the weights: selfsup.load_encoder and `selfsup export` read it back.
            metadata=encoder_metadata(
                self.cfg.backbone, splits.in_channels, splits.image_size, splits.mean, splits.std, **extra
            ),
        )
        tokenizer = getattr(self.method, "tokenizer", None)
        if tokenizer is not None and hasattr(tokenizer, "to_json"):  # an image-text method's vocabulary
            (self.run_dir / "tokenizer.json").write_text(tokenizer.to_json())
        return path


class _StopRequest:
    """SIGINT / SIGTERM during training: remember the signal, let the step finish.

    The loop checks :attr:`signum` after every step, saves a checkpoint and stops. A second
    signal stops at once (:class:`RunInterrupted`), for a user who will not wait.
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise RunInterrupted(
                f"second {signal.Signals(signum).name}: stopped at once, without saving this step "
                "(`selfsup resume <run folder>` continues from the last checkpoint)",
                signum,
            )
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name} received: finishing the current step, then saving a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set in the main thread
            return
        saved = {}
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            saved[sig] = signal.signal(sig, self._handle)
        try:
            yield
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)


def pretrain(cfg: Config, command: str | None = None) -> dict[str, Any]:
    """Runs a whole pretraining job (the ``selfsup pretrain`` command)."""
    run = PretrainRun(cfg, command)
    try:
        if run.dist.is_main:
            print(f"run folder: {run.run_dir}", flush=True)
        results = run.fit()
        engine_dist.barrier(run.dist)
        return results
    finally:
        engine_dist.teardown(run.dist)
