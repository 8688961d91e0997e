"""The training loop: schedules, optimisers, checkpoints, resume, determinism, NaN handling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from selfsup.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from selfsup.engine.optim import LARS
from selfsup.engine.run import NonFiniteLossError, PretrainRun
from selfsup.schedules import cosine_schedule, linear_warmup, scaled_lr
from tests.conftest import tiny_config


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_cosine_schedule_endpoints_and_warmup() -> None:
    assert cosine_schedule(0, 100, 1.0, 0.1, warmup_steps=10) == 0.0
    assert cosine_schedule(5, 100, 1.0, 0.1, warmup_steps=10) == pytest.approx(0.5)
    assert cosine_schedule(10, 100, 1.0, 0.1, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_schedule(100, 100, 1.0, 0.1, warmup_steps=10) == pytest.approx(0.1)
    mid = cosine_schedule(55, 100, 1.0, 0.0, warmup_steps=10)
    assert mid == pytest.approx(0.5)
    assert linear_warmup(0, 10, 0.04, 0.07) == 0.04 and linear_warmup(20, 10, 0.04, 0.07) == 0.07
    assert scaled_lr(0.3, 512, "linear") == pytest.approx(0.6)
    assert scaled_lr(0.3, 1024, "sqrt") == pytest.approx(0.6)


def test_lars_step_matches_formula() -> None:
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    w.grad = torch.tensor([0.6, 0.8])
    opt = LARS([{"params": [w]}], lr=0.1, momentum=0.9, weight_decay=0.5, eta=0.01)
    opt.step()
    g = torch.tensor([0.6, 0.8]) + 0.5 * torch.tensor([3.0, 4.0])
    trust = 0.01 * 5.0 / g.norm()
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0]) - 0.1 * trust * g)
    b = torch.nn.Parameter(torch.tensor([1.0]))
    b.grad = torch.tensor([2.0])
    LARS([{"params": [b], "lars_exclude": True, "weight_decay": 0.0}], lr=0.1).step()
    assert torch.allclose(b.detach(), torch.tensor([0.8]))


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ck" / "last.pt"
    save_checkpoint(path, {"step": 1})

    def broken_save(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "junk.pt")


@pytest.mark.parametrize("method", ["simclr", "moco_v2", "byol"])
def test_resume_continues_exactly(tmp_path: Path, method: str) -> None:
    """Kill a run after step 4, resume it: the losses equal an uninterrupted run's."""
    steps = ["train.max_steps=8", "data.limit=512", "train.checkpoint_every=4"]
    full = PretrainRun(tiny_config(tmp_path / "a", method, *steps))
    full.fit()
    reference = _losses(full.run_dir)

    crashing = PretrainRun(tiny_config(tmp_path / "b", method, *steps))
    original = crashing.loop.step

    def crash_after_four(data, info):  # type: ignore[no-untyped-def]
        if info.step == 5:
            raise KeyboardInterrupt
        return original(data, info)

    crashing.loop.step = crash_after_four  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    assert load_checkpoint(crashing.run_dir)["step"] == 4

    resumed = PretrainRun(tiny_config(tmp_path / "b", method, *steps, "run.resume=auto"))
    assert resumed.start_step == 4
    resumed.fit()
    again = _losses(resumed.run_dir)
    assert sorted(again) == sorted(reference) == list(range(8))
    for step in range(8):
        assert again[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


def test_same_seed_same_losses(tmp_path: Path) -> None:
    runs = []
    for name in ("x", "y"):
        trainer = PretrainRun(tiny_config(tmp_path / name, "simclr", "train.max_steps=3", "train.seed=7"))
        trainer.fit()
        runs.append(_losses(trainer.run_dir))
    assert runs[0] == runs[1]
    other = PretrainRun(tiny_config(tmp_path / "z", "simclr", "train.max_steps=3", "train.seed=8"))
    other.fit()
    assert _losses(other.run_dir) != runs[0]


def test_nan_loss_stops_with_typed_error_and_keeps_checkpoint(tmp_path: Path) -> None:
    trainer = PretrainRun(tiny_config(tmp_path, "simclr", "train.max_steps=6", "train.checkpoint_every=1"))
    original = trainer.method.training_step

    def poisoned(batch, step):  # type: ignore[no-untyped-def]
        out = original(batch, step)
        if step.step == 3:
            out["loss"] = out["loss"] * math.nan
        return out

    trainer.method.training_step = poisoned  # type: ignore[method-assign]
    with pytest.raises(NonFiniteLossError, match="step 3") as err:
        trainer.fit()
    assert err.value.step == 3 and "loss" in err.value.parts
    state = load_checkpoint(trainer.run_dir)
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())


def test_gradient_accumulation_matches_full_batch(tmp_path: Path) -> None:
    """Two micro-batches of 32 give the same SGD update as one batch of 64 for a loss that is
    a per-sample mean (BN-free backbone, deterministic views)."""
    common = [
        "train.max_steps=1",
        "backbone.norm=none",
        "views.name=eval",
        "optim.name=sgd",
        "optim.warmup_epochs=0",
        "optim.lr=0.5",
        "optim.lr_scaling=none",
    ]
    trainers = [
        PretrainRun(tiny_config(tmp_path / f"a{k}", "simclr", *common, f"train.accum_steps={k}")) for k in (1, 2)
    ]
    for trainer in trainers:
        backbone = trainer.method.backbone

        def per_sample_loss(batch, step, backbone=backbone):  # type: ignore[no-untyped-def]
            return {"loss": (backbone(batch.views[0]) ** 2).mean()}

        trainer.method.training_step = per_sample_loss  # type: ignore[method-assign]
        trainer.fit()
    one, two = (t.method.backbone.state_dict() for t in trainers)
    init = PretrainRun(tiny_config(tmp_path / "init", "simclr", *common)).method.backbone.state_dict()
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-6), key
    assert any(not torch.equal(one[k], init[k]) for k in one), "the step changed nothing"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # protocol 5 on purpose
def test_a_crafted_checkpoint_runs_no_code(tmp_path: Path) -> None:
    """A pickle that would run a command when unpickled is refused, and the command never runs."""
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    torch.save({"method": {}, "step": Exploit()}, evil)
    with pytest.raises(CheckpointError, match="refusing to load .*would call .*open"):
        load_checkpoint(evil)
    torch.save({"method": {}, "step": Exploit()}, evil, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(CheckpointError):
        load_checkpoint(evil)
    assert not marker.exists()


def test_run_folder_is_refused_unless_resumed_or_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = PretrainRun(tiny_config(tmp_path, "simclr", "train.max_steps=2"))
    first.fit()
    before = (first.run_dir / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match="is not empty.*run.overwrite=true"):
        PretrainRun(tiny_config(tmp_path, "simclr", "train.max_steps=2"))
    assert (first.run_dir / "metrics.jsonl").read_text() == before
    # A killed checkpoint write left a temporary file: the next run removes it.
    stale = first.run_dir / "checkpoints" / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half")
    again = PretrainRun(tiny_config(tmp_path, "simclr", "train.max_steps=3", "run.overwrite=true"))
    assert not stale.exists() and not (again.run_dir / "metrics.jsonl").read_text()
    again.fit()
    assert sorted(_losses(again.run_dir)) == [0, 1, 2]
    # Resuming with another schedule says so in one line.
    capsys.readouterr()
    resumed = PretrainRun(tiny_config(tmp_path, "simclr", "train.max_steps=5", "run.resume=auto"))
    out = capsys.readouterr().out
    assert resumed.start_step == 3 and "total steps 3 -> 5" in out and "train.max_steps 3 -> 5" in out


def test_non_finite_weights_are_never_checkpointed(tmp_path: Path) -> None:
    from selfsup.errors import TrainingError

    trainer = PretrainRun(tiny_config(tmp_path, "simclr", "train.max_steps=6", "train.checkpoint_every=1"))
    original = trainer.loop.step

    def explode(data, info):  # type: ignore[no-untyped-def]
        parts = original(data, info)
        if info.step == 2:
            next(trainer.method.parameters()).data.fill_(math.inf)
        return parts

    trainer.loop.step = explode  # type: ignore[method-assign]
    with pytest.raises(
        TrainingError, match=r"non-finite values after step 2 in method\..*last good checkpoint.*step 2"
    ):
        trainer.fit()
    state = load_checkpoint(trainer.run_dir)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())


def test_disk_full_is_a_storage_error_naming_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from selfsup.errors import StorageError

    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.zeros(1000)})

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(StorageError, match=r"no space left on device writing checkpoint .*last\.pt.*3\.9 KB"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(1000)})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1 and [p.name for p in path.parent.iterdir()] == ["last.pt"]
