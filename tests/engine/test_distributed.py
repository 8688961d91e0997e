"""The real engine on two gloo processes equals one process with the global batch.

Two CPU processes with per-process batch ``B`` must take the same optimisation step as one
process with batch ``2B``: the same logged loss, the same DDP-averaged parameter gradients,
the same parameters after the step (EMA teachers and the MoCo queue included). What makes
the comparison exact rather than statistical:

* Views are deterministic (the un-augmented image and its mirror image). Augmentations draw
  per-sample randomness from each process's RNG, so two processes can never draw what one
  process draws for the whole batch.
* BatchNorm must see the same batches. SimCLR and BYOL run with ``train.sync_batchnorm=true``
  (statistics over the global batch, as one process computes them). MoCo v2 keeps per-process
  BN, which is the point of shuffle BN: the single-process reference uses
  ``shuffle_bn_groups=2``, one BN group per emulated process. The key shuffle is random, but
  rank 0 draws the global permutation from the same RNG state the single process is in (both
  seed the same way and draw nothing else before it) and broadcasts it, so both shuffle alike.
  This checks the cross-process shuffle (gather, permute, encode a share, unshuffle) against
  the single-process emulation.
* Gradient accumulation: MoCo v2 with a BN-free backbone has a per-sample loss within a step
  (the queue changes only after the step), so 2 processes x 2 micro-batches of ``B/2`` equal
  one process with ``2B``; this exercises ``no_sync`` on the micro-steps.

A second test launches ``selfsup pretrain --nproc 2`` through torchrun's machinery, checks the
run folder (written by rank 0 only), that the final kNN evaluation, computed from gathered
shards, matches a single-process evaluation of the saved weights, and resumes the run in one
process with the global batch kept.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from selfsup import cli
from selfsup.config import from_dict
from selfsup.engine.build import build_components
from selfsup.engine.checkpoint import load_checkpoint
from selfsup.engine.distributed import DistState, average_batchnorm_stats, mean_over_ranks
from selfsup.engine.evaluation import evaluate_encoder
from selfsup.engine.run import PretrainRun
from selfsup.nn.distributed import GlobalBatchNorm, convert_sync_batchnorm
from selfsup.schedules import scaled_lr
from tests.conftest import tiny_config

WORLD = 2
B = 16  # per-process batch; the single-process reference uses WORLD * B
COMMON = (
    "train.max_steps=1",
    "optim.name=sgd",
    "optim.warmup_epochs=0",
    "optim.lr=0.4",
    "method.proj_hidden_dim=32",
    "method.proj_dim=16",
    "data.limit=256",
)

# name -> (method, overrides of both runs, extra overrides of the 2-process run,
#          extra overrides of the single-process run)
CASES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "simclr_syncbn": ("simclr", ("train.sync_batchnorm=true",), (), ()),
    "byol_syncbn": ("byol", ("train.sync_batchnorm=true", "method.pred_hidden_dim=32"), (), ()),
    "moco_v2_shuffle_bn": ("moco_v2", (), (), ("method.shuffle_bn_groups=2",)),
    "moco_v2_accumulation": ("moco_v2", ("backbone.norm=none",), ("train.accum_steps=2",), ()),
}


class MirrorPair(nn.Module):
    """Two deterministic views: the eval view of each image and its mirror image."""

    def __init__(self, eval_views: nn.Module) -> None:
        super().__init__()
        self.eval_views = eval_views

    def forward(self, images: Tensor) -> list[Tensor]:
        view = self.eval_views(images)[0]
        return [view, view.flip(-1)]


def _one_step(tmp: Path, name: str, world: int, rank: int = 0) -> dict[str, Any]:
    """One optimisation step of case ``name`` through the real PretrainRun; what it computed."""
    method, both, dist_only, single_only = CASES[name]
    extra = dist_only if world > 1 else single_only
    # Each rank proposes its own folder and its own (default, time-stamped) run name: rank 0's
    # choice must win on every rank, and rank 1's folder must stay empty.
    cfg = tiny_config(
        tmp / name / f"rank{rank}", method, *COMMON, f"train.batch_size={B * (WORLD // world)}", *both, *extra
    )
    cfg.run.name = None
    trainer = PretrainRun(cfg)
    trainer.parts.train_views = trainer.loop.train_views = MirrorPair(trainer.parts.eval_views)
    init = {k: v.detach().clone() for k, v in trainer.method.named_parameters()}
    grads: dict[str, Tensor] = {}

    def keep_grads(*_: object) -> None:
        grads.update({k: p.grad.detach().clone() for k, p in trainer.method.named_parameters() if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(keep_grads)
    trainer.fit()
    out: dict[str, Any] = {
        "run_dir": str(trainer.run_dir),
        "resolved": dict(trainer.resolved),
        "ddp": isinstance(trainer.model, nn.parallel.DistributedDataParallel),
        "global_bn": sum(isinstance(m, GlobalBatchNorm) for m in trainer.method.modules()),
        "init": init,
        "grads": grads,
        "params": {k: v.detach().clone() for k, v in trainer.method.named_parameters()},
        "buffers": {k: v.clone() for k, v in trainer.method.named_buffers() if "queue" in k},
    }
    if trainer.dist.is_main:
        out["records"] = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return out


# ---------------------------------------------------------------------------- process harness
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_rank(rank: int, port: int, fn: Callable[..., Any], out_dir: str, *args: Any) -> None:
    """Worker entry: torchrun's environment, then ``fn(rank, *args)`` saved to ``out_dir``."""
    os.environ.update(
        {
            "WORLD_SIZE": str(WORLD),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    result = fn(rank, *args)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


def _spawn(fn: Callable[..., Any], out_dir: Path, *args: Any, timeout: float = 60.0) -> list[Any]:
    """``fn(rank, *args)`` in WORLD fresh processes; their results in rank order. A deadlock
    fails the test after ``timeout`` seconds instead of hanging it."""
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver":
        # Imports are most of a worker's life on 2 shared cores: a fork server that imported
        # these once (before any torch thread exists, so forking it is safe) hands every
        # worker a warm interpreter; two fresh interpreters would import them twice.
        multiprocessing.get_context("forkserver").set_forkserver_preload(
            ["torch", "torch._dynamo", "sklearn.datasets", "matplotlib.pyplot", __name__]
        )
    ctx = mp.start_processes(
        _as_rank, args=(_free_port(), fn, str(out_dir), *args), nprocs=WORLD, join=False, start_method=method
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in ctx.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"distributed workers still running after {timeout:.0f} s (deadlock?)")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ---------------------------------------------------------------------------- worker bodies
def _sync_bn_checks(rank: int) -> dict[str, Any]:
    """GlobalBatchNorm on this rank's share of a fixed batch, and the state helpers."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(WORLD * B, 3, 4, 4, generator=g, dtype=torch.float64)
    target = torch.randn(WORLD * B, 3, 4, 4, generator=g, dtype=torch.float64)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).double()
    bn_weight = model[1].weight
    model = convert_sync_batchnorm(model, torch.device("cpu"))
    local = x[rank * B : (rank + 1) * B].clone().requires_grad_(True)
    ((model(local) * target[rank * B : (rank + 1) * B]).mean()).backward()
    for p in model.parameters():  # DDP's averaging, by hand
        dist.all_reduce(p.grad)
        p.grad /= WORLD
    state = DistState(WORLD, rank, rank, torch.device("cpu"))
    stats = nn.BatchNorm1d(2)
    stats.running_mean.fill_(float(rank))
    stats.running_var.fill_(1.0 + 2 * rank)
    average_batchnorm_stats(stats, state)
    return {
        "converted": type(model[1]).__name__,
        "same_weight": model[1].weight is bn_weight,
        "input_grad": local.grad,
        "param_grads": [p.grad.clone() for p in model.parameters()],
        "running": (model[1].running_mean.clone(), model[1].running_var.clone()),
        "averaged": (stats.running_mean.clone(), stats.running_var.clone()),
        "mean_over_ranks": mean_over_ranks({"loss": float(rank), "z": 2.0 * rank}, state),
    }


def _worker(rank: int, tmp: str) -> dict[str, Any]:
    dist.init_process_group("gloo")  # from the environment torchrun would set
    out: dict[str, Any] = {"sync_bn": _sync_bn_checks(rank)}
    # The PretrainRun joins the group that is already there (setup() does not re-create it).
    out["cases"] = {name: _one_step(Path(tmp), name, WORLD, rank) for name in CASES}
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("ddp")
    return _spawn(_worker, tmp, str(tmp))


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("single")
    # The workers compute with one thread; so must the reference (module fixtures run before
    # the per-test thread reset, and an earlier CLI run may have left the process at 2).
    torch.set_num_threads(1)
    return {name: _one_step(tmp, name, 1) for name in CASES}


# ---------------------------------------------------------------------------- tests
def test_global_batchnorm_equals_batchnorm_on_the_global_batch(ranks: list[dict[str, Any]]) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(WORLD * B, 3, 4, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    target = torch.randn(WORLD * B, 3, 4, 4, generator=g, dtype=torch.float64)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).double()
    ((model(x) * target).mean()).backward()
    for r, out in enumerate(ranks):
        got = out["sync_bn"]
        assert got["converted"] == "GlobalBatchNorm" and got["same_weight"]
        # A rank's raw input gradient is the gradient of the sum of the ranks' losses, i.e.
        # WORLD times the single-process gradient of the mean loss (selfsup.nn.distributed).
        torch.testing.assert_close(got["input_grad"], WORLD * x.grad[r * B : (r + 1) * B])
        for mine, ref in zip(got["param_grads"], model.parameters()):
            torch.testing.assert_close(mine, ref.grad)
        torch.testing.assert_close(got["running"][0], model[1].running_mean)
        torch.testing.assert_close(got["running"][1], model[1].running_var)
        torch.testing.assert_close(got["averaged"][0], torch.full((2,), 0.5))
        torch.testing.assert_close(got["averaged"][1], torch.full((2,), 2.0))
        assert got["mean_over_ranks"] == {"loss": 0.5, "z": 1.0}


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_take_the_single_process_step(
    ranks: list[dict[str, Any]], single: dict[str, dict[str, Any]], name: str
) -> None:
    ref = single[name]
    got = [out["cases"][name] for out in ranks]
    for out in got:
        assert out["ddp"] and not ref["ddp"]
        # Converted only with several processes and the switch on (MoCo keeps shuffle BN).
        assert (out["global_bn"] > 0) == ("syncbn" in name) and ref["global_bn"] == 0
        assert out["run_dir"] == got[0]["run_dir"]  # rank 0 chose the folder for everyone
        assert Path(got[0]["run_dir"]).parent.name == "rank0"
    assert not (Path(got[0]["run_dir"]).parent.parent / "rank1").exists()  # rank 1 wrote nothing

    resolved = got[0]["resolved"]
    assert resolved["world_size"] == WORLD and resolved["batch_size_per_process"] == B
    assert resolved["global_batch"] == ref["resolved"]["global_batch"] == WORLD * B
    assert resolved["peak_lr"] == pytest.approx(scaled_lr(0.4, WORLD * B, resolved["lr_scaling"]))
    assert resolved["peak_lr"] == ref["resolved"]["peak_lr"]

    # The logged loss is the mean over ranks: the loss of the global batch. Logged once.
    (record,) = got[0]["records"]
    (ref_record,) = ref["records"]
    assert record["loss"] == pytest.approx(ref_record["loss"], rel=1e-5)

    moved = [k for k in ref["params"] if not torch.equal(ref["params"][k], ref["init"][k])]
    assert ref["grads"] and moved, "the reference step changed nothing"
    assert set(ref["grads"]) == {k for k in ref["params"] if not k.startswith("teacher_")}
    for out in got:
        torch.testing.assert_close(out["init"], ref["init"], rtol=0, atol=0)
        assert set(out["grads"]) == set(ref["grads"])
        for key, grad in ref["grads"].items():
            torch.testing.assert_close(
                out["grads"][key], grad, rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}"
            )
        for key, value in ref["params"].items():  # students after SGD, teachers after EMA
            torch.testing.assert_close(
                out["params"][key], value, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}"
            )
    if "accumulation" not in name:  # with micro-batches the enqueue order differs
        for out in got:
            torch.testing.assert_close(out["buffers"], ref["buffers"], rtol=1e-5, atol=1e-6)


def _write_config(path: Path, out_dir: Path) -> Path:
    """A tiny SimCLR run on the digits, saved as an .npz: the workers are fresh interpreters,
    and reading an .npz spares each of them importing scikit-learn."""
    import numpy as np

    digits = build_components(tiny_config(path.parent, "simclr", "data.limit=256"), torch.device("cpu")).splits
    data = path.with_suffix(".npz")
    np.savez(
        data,
        x_train=digits.train.images.numpy(),
        y_train=digits.train.labels.numpy(),
        x_test=digits.test.images.numpy(),
        y_test=digits.test.labels.numpy(),
    )
    path.write_text(
        "\n".join(
            [
                f"data: {{name: npz, path: '{data}'}}",
                "backbone: {name: convnet, width: 8}",
                "method: {name: simclr, proj_hidden_dim: 32, proj_dim: 16}",
                "optim: {warmup_epochs: 0}",
                "train: {batch_size: 16, max_steps: 2, log_every: 1, knn_every: 0, progress: false, "
                "sync_batchnorm: true}",
                "eval: {at_end: true, linear: false, baselines: false, knn_k: [5]}",
                f"run: {{out_dir: '{out_dir}', name: cli, tensorboard: false}}",
            ]
        )
        + "\n"
    )
    return path


def _steps(run_dir: Path) -> list[int]:
    return [
        json.loads(line)["step"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]


def test_cli_nproc_2_then_resume_in_one_process(tmp_path: Path) -> None:
    config = _write_config(tmp_path / "tiny.yaml", tmp_path / "runs")
    assert cli.main(["pretrain", str(config), "--nproc", "2"]) == 0
    run_dir = tmp_path / "runs" / "cli"
    assert {p.name for p in run_dir.iterdir()} >= {
        "config.yaml",
        "resolved.json",
        "metrics.jsonl",
        "checkpoints",
        "backbone.safetensors",
        "results.json",
    }
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.pt"]
    assert _steps(run_dir) == [0, 1]  # one writer: every step logged exactly once
    resolved = json.loads((run_dir / "resolved.json").read_text())
    assert resolved["world_size"] == 2 and resolved["global_batch"] == 32
    state = load_checkpoint(run_dir)
    assert state["step"] == 2 and isinstance(state["rng"], list) and len(state["rng"]) == 2

    # The final kNN of the 2-process run gathered each process's shard of the splits; one
    # process encoding the whole splits with the saved weights must score the same.
    cfg = from_dict(state["config"])
    parts = build_components(cfg, torch.device("cpu"))
    parts.method.load_state_dict(state["method"])
    splits = parts.splits
    mine = evaluate_encoder(
        parts.method.embed,
        parts.method,
        splits.train,
        splits.test,
        splits.num_classes,
        parts.eval_views,
        cfg.eval,
        torch.device("cpu"),
        linear=False,
    )
    theirs = json.loads((run_dir / "results.json").read_text())["simclr (convnet)"]
    assert theirs == pytest.approx(mine, abs=1.5 / len(splits.test))

    # One process continues the 2-process run (to a later end); the global batch is kept.
    assert cli.main(["resume", str(run_dir), "train.max_steps=4"]) == 0
    assert _steps(run_dir) == [0, 1, 2, 3]
    resolved = json.loads((run_dir / "resolved.json").read_text())
    assert resolved["world_size"] == 1 and resolved["global_batch"] == 32
    assert resolved["batch_size_per_process"] == 32
    assert load_checkpoint(run_dir)["step"] == 4


def test_cli_nproc_reports_a_failed_worker(tmp_path: Path) -> None:
    """A worker that fails (here: its data file is missing) fails the launch with its exit
    code, the launcher stops, and the caller's signal handlers are back."""
    config = tmp_path / "broken.yaml"
    config.write_text(
        f"data: {{name: npz, path: '{tmp_path / 'missing.npz'}'}}\n"
        f"run: {{out_dir: '{tmp_path / 'runs'}', name: broken}}\n"
    )
    before = signal.getsignal(signal.SIGINT)
    assert cli.main(["pretrain", str(config), "--nproc", "2"]) == 3  # the workers' DataError
    assert signal.getsignal(signal.SIGINT) is before
    assert not (tmp_path / "runs" / "broken").exists()
