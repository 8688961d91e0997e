"""SIGTERM / SIGINT during pretraining: the step finishes, a checkpoint is written, the command
says how to resume and exits 143 / 130; ``selfsup resume`` then gives the losses of an
uninterrupted run at every step, and TensorBoard holds each step once."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfsup.cli import main
from tests.test_errors import check_row, tiny

pytestmark = pytest.mark.slow
STEPS = 150


def _argv(out: Path, name: str) -> list[str]:
    """The fault table's tiny digits run, long enough to be stopped, logging every step to
    metrics.jsonl and TensorBoard (later overrides win)."""
    return tiny(out, f"train.max_steps={STEPS}", "train.log_every=1", "run.tensorboard=true", f"run.name={name}")


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), "a step is logged twice"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _interrupt(tmp_path: Path, sig: signal.Signals) -> tuple[int, str, Path]:
    """Starts a pretraining process, sends ``sig`` once it logged a step; (code, stderr, run)."""
    run = tmp_path / "run"
    err = tmp_path / "stderr.txt"
    with err.open("w") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "selfsup.cli", *_argv(tmp_path, "run")],
            stdout=subprocess.DEVNULL,
            stderr=handle,
        )
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
    return code, err.read_text(), run


def test_sigterm_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stderr, run = _interrupt(tmp_path, signal.SIGTERM)
    assert code == 143, stderr
    check_row("SIGTERM during pretraining", re.sub(r"step \d+", "step <n>", stderr), code, tmp_path)
    assert f"selfsup resume {run}" in stderr
    from selfsup.engine.checkpoint import load_checkpoint

    stopped = load_checkpoint(run)["step"]
    assert 0 < stopped < STEPS, "the run finished before the signal arrived: raise STEPS"
    assert max(_losses(run)) == stopped - 1

    assert main(["resume", str(run)]) == 0
    assert main(_argv(tmp_path, "reference")) == 0
    resumed, reference = _losses(run), _losses(tmp_path / "reference")
    assert sorted(resumed) == sorted(reference) == list(range(STEPS))
    assert resumed == reference  # bit-identical, step by step

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(STEPS))


def test_sigint_saves_a_checkpoint_and_exits_130(tmp_path: Path) -> None:
    code, stderr, run = _interrupt(tmp_path, signal.SIGINT)
    assert code == 130, stderr
    check_row("SIGINT (Ctrl-C) during pretraining", re.sub(r"step \d+", "step <n>", stderr), code, tmp_path)
    assert (run / "checkpoints" / "last.pt").is_file()
    assert not list((run / "checkpoints").glob(".*.tmp"))
