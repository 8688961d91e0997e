"""Training throughput and peak memory of every registered method, next to its bare backbone.

For each method, on synthetic uint8 images of the chosen size, this times the engine's real
optimisation step (augmentation on the device, forward, loss, backward, optimiser, EMA,
queue updates) and, on the same views, a bare backbone forward+backward with a trivial loss.
The ratio shows what the method's heads, loss and extra encoders cost. Each method runs in a
fresh subprocess so peak memory (max RSS on CPU, max allocated on CUDA) is its own.

    python benchmarks/throughput.py                      # all methods, ConvNet, 28 px
    python benchmarks/throughput.py --methods simclr byol --backbone resnet18 --image-size 32
    python benchmarks/throughput.py --device cuda --batch-size 256 --steps 30
    python benchmarks/throughput.py --methods moco_v2 --set method.mochi=true --set method.mochi_start_epoch=0

"update %" is the share of the step spent in ``on_step_end`` (queue, memory bank, centre or
codebook updates).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any


def _measure(args: argparse.Namespace) -> dict[str, float]:
    import torch

    from selfsup.config import load_config
    from selfsup.engine.build import build_method, build_views
    from selfsup.engine.loop import DataBatch, LoopSchedule, TrainingLoop
    from selfsup.engine.optim import build_optimizer
    from selfsup.engine.run import resolve_device
    from selfsup.registry import METHODS

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    size, channels = args.image_size, args.channels
    images = torch.randint(0, 256, (args.batch_size, channels, size, size), dtype=torch.uint8)
    data = DataBatch(
        images=images, index=torch.arange(args.batch_size), label=torch.zeros(args.batch_size, dtype=torch.long)
    )

    class Splits:  # the facts the builders read, without loading a dataset
        name = "synthetic"
        in_channels, image_size, num_classes = channels, size, 10
        mean, std = (0.5,) * channels, (0.25,) * channels
        pretrain = range(args.batch_size * 100)

    cfg = load_config(
        None,
        [
            f"method.name={args.method}",
            f"backbone.name={args.backbone}",
            f"train.batch_size={args.batch_size}",
            f"train.precision={args.precision}",
            f"train.channels_last={str(args.channels_last).lower()}",
            "train.progress=false",
            *args.set,
        ],
    )
    for key, value in json.loads(args.backbone_options).items():
        cfg.backbone[key] = value
    splits = Splits()
    method_cls: Any = METHODS.get(args.method)
    needs_frozen = [n for n in method_cls.frozen_models if n != "init"]
    if needs_frozen:  # e.g. SEED's teacher: a backbone of the same architecture, as an earlier run
        import tempfile

        from safetensors.torch import save_file

        from selfsup.engine.build import build_backbone

        folder = tempfile.mkdtemp(prefix="selfsup-bench-")
        weights = {k: v.contiguous() for k, v in build_backbone(cfg, splits).state_dict().items()}  # type: ignore[arg-type]
        meta = {"backbone": json.dumps(cfg.backbone), "in_channels": str(channels), "image_size": str(size)}
        save_file(weights, f"{folder}/backbone.safetensors", metadata=meta)
        for name in needs_frozen:
            cfg.method[name] = {"run": folder}
    method = build_method(cfg, splits).to(device)  # type: ignore[arg-type]
    views = build_views(cfg, splits).to(device)  # type: ignore[arg-type]
    if args.channels_last:
        # Module.to takes memory_format at run time; torch's overloads leave it out.
        method = method.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    # The real optimisation step of the shared training loop, without a run folder or dataset.
    schedule = LoopSchedule(
        total_steps=1000,
        steps_per_epoch=1000,
        peak_lr=cfg.optim.lr,
        weight_decay=(cfg.optim.weight_decay, cfg.optim.weight_decay),
        ema_momentum=method.default_ema_momentum,
    )
    loop = TrainingLoop(
        method,
        build_optimizer(method.param_groups(), cfg.optim, cfg.optim.lr),
        schedule,
        views,
        device,
        precision=args.precision,
        channels_last=args.channels_last,
    )

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn: Callable[[], object], steps: int) -> float:
        for _ in range(args.warmup):
            fn()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        return steps * args.batch_size / (time.perf_counter() - start)

    # Time spent in the per-step state updates (queues, banks, centres, codebooks): on_step_end.
    update_seconds = [0.0]
    on_step_end = method.on_step_end

    def timed_on_step_end(*a: Any, **k: Any) -> None:
        sync()
        start = time.perf_counter()
        on_step_end(*a, **k)
        sync()
        update_seconds[0] += time.perf_counter() - start

    method.on_step_end = timed_on_step_end  # type: ignore[method-assign]
    step_counter = iter(range(10**9))
    total_start = time.perf_counter()
    method_ips = timed(lambda: loop.step(data, loop.step_info(next(step_counter))), args.steps)
    update_share = update_seconds[0] / (time.perf_counter() - total_start)

    backbone = method.backbone
    fixed_views = views(images.to(device).float() / 255)
    if args.channels_last:
        fixed_views = [v.contiguous(memory_format=torch.channels_last) for v in fixed_views]
    params = [p for p in backbone.parameters() if p.requires_grad]
    bare_opt = torch.optim.SGD(params, lr=1e-3)

    def bare_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = sum(backbone(v).float().pow(2).mean() for v in fixed_views)
        loss.backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    bare_ips = timed(bare_step, args.steps)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "method_images_per_s": method_ips,
        "backbone_images_per_s": bare_ips,
        "peak_memory_mb": peak_mb,
        "views": len(fixed_views),
        "update_share": update_share,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    parser.add_argument("--backbone", default="convnet")
    parser.add_argument("--backbone-options", default='{"width": 32}', help="JSON of backbone options")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. method.mochi=true"
    )
    parser.add_argument("--method", help=argparse.SUPPRESS)  # internal: measure one method, print JSON
    args = parser.parse_args()

    if args.method:
        print(json.dumps(_measure(args)))
        return

    from selfsup.registry import METHODS

    methods = args.methods or METHODS.names()
    passthrough = [a for a in sys.argv[1:] if a != "--methods" and a not in methods]
    print(
        f"backbone={args.backbone} {args.backbone_options} image={args.channels}x{args.image_size}px "
        f"batch={args.batch_size} precision={args.precision} channels_last={args.channels_last} "
        f"device={args.device}"
    )
    header = (
        f"{'method':<12} {'views':>5} {'train img/s':>12} {'backbone img/s':>15} {'ratio':>6} "
        f"{'update %':>8} {'peak MB':>8}"
    )
    print(header)
    print("-" * len(header))
    for name in methods:
        cmd = [sys.executable, __file__, "--method", name, *passthrough]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name:<12} failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{name:<12} {r['views']:>5} {r['method_images_per_s']:>12.0f} {r['backbone_images_per_s']:>15.0f} "
            f"{r['method_images_per_s'] / r['backbone_images_per_s']:>6.2f} {100 * r['update_share']:>8.1f} "
            f"{r['peak_memory_mb']:>8.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
