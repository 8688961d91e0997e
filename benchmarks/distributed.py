"""Training images/s with 1 and N processes on one machine, through the real CLI and engine.

Every run trains the same method with the same *global* batch on the same synthetic data,
so each configuration computes the same optimisation (DDP with per-process batch
``global / N``, gathered negatives); only the split into processes differs. One process runs
``selfsup pretrain``, N processes run ``selfsup pretrain --nproc N`` (torchrun's machinery,
gloo on CPU, NCCL on GPUs). The machine's cores are shared equally between the processes
(``train.threads``). images/s is the engine's own logged figure, averaged over the logging
windows after the first (which holds start-up, DDP's first-step bucket rebuild and warm-up).

    python benchmarks/distributed.py                                  # 1 vs 2 processes, CPU
    python benchmarks/distributed.py --procs 1 2 4 --global-batch 512 --steps 60
    python benchmarks/distributed.py --device cuda --procs 1 2 4 8 --width 64

On one CPU, N processes do not add compute: expect at best parity with one process that
uses every core, minus the cost of the collectives (gradient all-reduce, gathered
embeddings). The point of N processes is N GPUs or N machines.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path


def _config(path: Path, data: Path, args: argparse.Namespace) -> Path:
    path.write_text(
        "\n".join(
            [
                f"data: {{name: npz, path: '{data}'}}",
                f"backbone: {{name: {args.backbone}, width: {args.width}}}",
                f"method: {{name: {args.method}}}",
                "optim: {warmup_epochs: 0}",
                f"train: {{max_steps: {args.steps}, log_every: {args.log_every}, knn_every: 0, progress: false, "
                f"device: {args.device}, sync_batchnorm: {str(args.sync_batchnorm).lower()}}}",
                "eval: {at_end: false}",
                f"run: {{out_dir: '{path.parent / 'runs'}', tensorboard: false}}",
            ]
        )
        + "\n"
    )
    return path


def _images_per_s(run_dir: Path) -> float:
    rates = [
        r["images_per_s"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if "images_per_s" in r
    ]
    steady = rates[1:] or rates
    return sum(steady) / len(steady)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--backbone", default="convnet")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--global-batch", type=int, default=256, help="images per step over all processes")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared between the processes of a run"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--sync-batchnorm", action="store_true")
    args = parser.parse_args()

    import numpy as np

    from selfsup import cli

    results: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        n = args.global_batch * (args.steps + 1) * 5 // 4  # no epoch end (and checkpoint) mid-run
        data = root / "synthetic.npz"
        np.savez(
            data,
            x_train=rng.integers(0, 256, (n, args.image_size, args.image_size), dtype=np.uint8),
            y_train=rng.integers(0, 10, n),
        )
        config = _config(root / "bench.yaml", data, args)
        for procs in args.procs:
            if args.global_batch % procs:
                print(f"skipping {procs} processes: {args.global_batch} does not split evenly")
                continue
            overrides = [
                f"train.batch_size={args.global_batch // procs}",
                f"run.name=p{procs}",
                f"train.threads={max(1, args.threads // procs)}",
            ]
            argv = ["pretrain", str(config), *overrides] + (["--nproc", str(procs)] if procs > 1 else [])
            if cli.main(argv) != 0:
                print(f"{procs} processes: the run failed")
                continue
            results[procs] = _images_per_s(root / "runs" / f"p{procs}")

    print(
        f"\n{args.method} on {args.backbone} (width {args.width}), synthetic 1x{args.image_size}px, "
        f"global batch {args.global_batch}, {args.threads} threads in all, device={args.device}"
    )
    header = f"{'processes':>9} {'batch/process':>13} {'threads/process':>15} {'images/s':>9} {'vs 1':>6}"
    print(header)
    print("-" * len(header))
    base = results.get(1)
    for procs, rate in results.items():
        ratio = f"{rate / base:.2f}" if base else "-"
        print(
            f"{procs:>9} {args.global_batch // procs:>13} {max(1, args.threads // procs):>15} {rate:>9.0f} {ratio:>6}"
        )


if __name__ == "__main__":
    main()
