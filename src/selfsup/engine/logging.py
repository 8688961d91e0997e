"""Run-folder logging: JSONL metrics, TensorBoard events and a loss-curve PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class RunLogger:
    """Appends metric records to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    Only the main process should create one (the engine passes ``enabled=False`` elsewhere).
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, enabled: bool = True) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self._writer = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._file = (run_dir / "metrics.jsonl").open("a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, **record}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._writer is not None:
                self._writer.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(run_dir: Path, out: Path | None = None) -> Path | None:
    """Plots training loss (and the online kNN accuracy, if logged) against step to PNG."""
    records = read_metrics(run_dir)
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if not losses:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    knn = [(r["step"], 100 * r["knn_top1"]) for r in records if "knn_top1" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*losses), color="tab:blue", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    if knn:
        ax2 = ax.twinx()
        ax2.plot(*zip(*knn), "o-", color="tab:orange")
        ax2.set_ylabel("online kNN top-1 (%)", color="tab:orange")
    ax.set_title(run_dir.name)
    fig.tight_layout()
    out = out or Path(run_dir) / "loss_curve.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
