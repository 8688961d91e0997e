"""A pretraining run: the run folder around the training loop.

:class:`PretrainRun` builds a run's parts from a config, owns its folder (``config.yaml``,
``resolved.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/last.pt``,
``backbone.safetensors``, ``results.json``, ``results.txt``, ``run_info.json``,
``loss_curve.png``), resumes from a checkpoint, logs, and evaluates at the end. The steps
themselves are :class:`selfsup.engine.loop.TrainingLoop`'s.
"""

from __future__ import annotations

import json
import platform
import random
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.config import Config, dump_config
from selfsup.data.loader import EpochBatchSampler, iterate_batches
from selfsup.engine import distributed as engine_dist
from selfsup.engine.build import Components, build_backbone, build_components, view_recipe_name
from selfsup.engine.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from selfsup.engine.evaluation import encode, evaluate_encoder, format_table, raw_pixel_metrics
from selfsup.engine.logging import RunLogger, plot_loss_curve
from selfsup.engine.loop import DataBatch, LoopSchedule, NonFiniteLossError, TrainingLoop
from selfsup.engine.optim import build_optimizer
from selfsup.methods.base import StepInfo
from selfsup.nn.distributed import convert_sync_batchnorm
from selfsup.schedules import scaled_lr

__all__ = ["NonFiniteLossError", "PretrainRun", "default_run_name", "pretrain", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
        self.dist = engine_dist.setup(cfg.train.device)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        self.device = self.dist.device if self.dist.device is not None else resolve_device(cfg.train.device)
        random.seed(cfg.train.seed)
        self.run_dir, resume_from = self._run_dir()
        self.parts: Components = build_components(cfg, self.device)
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
        self.sampler = EpochBatchSampler(
            len(splits.pretrain),
            cfg.train.batch_size,
            cfg.train.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
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
            precision=cfg.train.precision,
            channels_last=cfg.train.channels_last,
            clip_grad=cfg.optim.clip_grad,
            encode_pretrain=self._encode_pretrain,
            num_samples=len(splits.pretrain),
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
        }

        self.start_step = 0
        if resume_from is not None:
            self._restore(resume_from)
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
        decided: tuple[Path, Path | None] = engine_dist.broadcast_object((run_dir, found), self.dist)
        return decided

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
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_step = int(state["step"])
        rng = state["rng"]
        if isinstance(rng, list):  # one state per process of the run that saved it
            rng = rng[self.dist.rank] if len(rng) == self.dist.world_size else None
        if rng is not None:
            set_rng_state(rng)
        else:  # another process count: a fresh, still deterministic, stream per process
            torch.manual_seed(self.cfg.train.seed + 1000003 * self.start_step + self.dist.rank)
        if self.dist.is_main:  # drop records of steps that will run again
            metrics = self.run_dir / "metrics.jsonl"
            if metrics.is_file():
                kept = [
                    line
                    for line in metrics.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) < self.start_step
                ]
                metrics.write_text("".join(line + "\n" for line in kept))

    def checkpoint(self, next_step: int) -> None:
        """Saves everything needed to continue at ``next_step`` (main process writes)."""
        engine_dist.average_batchnorm_stats(self.method, self.dist)
        states = engine_dist.gather_objects(rng_state(), self.dist)
        if not self.dist.is_main:
            return
        save_checkpoint(
            self.run_dir / "checkpoints" / "last.pt",
            {
                "method": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": next_step,
                "rng": states,
                "config": self.cfg.to_dict(),
                "resolved": self.resolved,
            },
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
            precision=self.cfg.train.precision,
            num_workers=self.cfg.train.num_workers,
            gather=self.dist.world_size > 1,
        )
        return features

    # ------------------------------------------------------------------ the run
    def _batches(self, step: int) -> Iterator[DataBatch]:
        epoch, offset = divmod(step, self.steps_per_epoch)
        while True:
            for triple in iterate_batches(
                self.parts.splits.pretrain, self.sampler, epoch, offset, num_workers=self.cfg.train.num_workers
            ):
                yield DataBatch.from_triple(triple)
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

        def after_step(info: StepInfo, parts: dict[str, float], seen: int) -> None:
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
                    **info.extra,
                }
                if self.method.uses_ema:
                    record["ema_momentum"] = info.ema_momentum
                self.logger.log(record, step)
                bar.set_postfix(loss=f"{parts['loss']:.4f}", lr=f"{info.lr:.3g}", img_s=f"{record['images_per_s']:.0f}")
                window["clock"], window["seen"] = time.perf_counter(), 0
            epoch_end = (step + 1) % self.steps_per_epoch == 0
            epochs_done = (step + 1) // self.steps_per_epoch
            if epoch_end and cfg.train.knn_every and epochs_done % cfg.train.knn_every == 0 and not last:
                self.logger.log(self.online_knn(), step)
            if last or epoch_end or (cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0):
                self.checkpoint(step + 1)

        try:
            self.loop.run(self._batches(self.start_step), self.start_step, on_step=after_step)
        finally:
            bar.close()
        train_seconds = time.perf_counter() - started
        results: dict[str, Any] = {}
        if self.dist.is_main:  # the last step's checkpoint already averaged the BN statistics
            self.export_backbone()
            plot_loss_curve(self.run_dir)
        if cfg.eval.at_end:
            results = self.evaluate()
        if self.dist.is_main:
            self.write_run_info(train_seconds, time.perf_counter() - started)
        self.logger.close()
        return results

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
        eval_cfg = type(cfg.eval)(**{**cfg.eval.__dict__, "knn_k": [20]})
        metrics = evaluate_encoder(
            self.method.embed,
            self.method,
            splits.train,
            splits.test,
            splits.num_classes,
            self.parts.eval_views,
            eval_cfg,
            self.device,
            cfg.train.precision,
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

        encoders: list[tuple[str, Any, nn.Module]] = [
            (f"{cfg.method['name']} ({cfg.backbone['name']})", self.method.embed, self.method)
        ]
        if cfg.eval.baselines:
            torch.manual_seed(cfg.train.seed)
            random_init = build_backbone(cfg, splits).to(self.device)
            encoders.append((f"random-init {cfg.backbone['name']}", random_init, random_init))
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
                cfg.train.precision,
                seed=cfg.train.seed,
                gather=gather,
            )
            bar.update(1)
        if cfg.eval.baselines:
            bar.set_postfix_str("raw pixels")
            rows["raw pixels"] = raw_pixel_metrics(
                splits.train, splits.test, splits.num_classes, self.parts.eval_views, cfg.eval, self.device
            )
            bar.update(1)
        bar.close()
        if self.dist.is_main:
            table = format_table(rows, f"{splits.name} test set, top-1 (%)")
            (self.run_dir / "results.json").write_text(json.dumps(rows, indent=2))
            (self.run_dir / "results.txt").write_text(table + "\n")
            self.logger.log({f"final/{k}": v for k, v in next(iter(rows.values())).items()}, self.total_steps)
            print(table, flush=True)
        return rows

    def export_backbone(self) -> Path:
        """Writes the trained backbone's weights as ``backbone.safetensors``."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.method.eval_backbone.state_dict().items()}
        path = self.run_dir / "backbone.safetensors"
        splits = self.parts.splits
        save_file(
            state,
            str(path),
            metadata={
                "backbone": json.dumps(self.cfg.backbone),
                "in_channels": str(splits.in_channels),
                "image_size": str(splits.image_size),
            },
        )
        return path


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
