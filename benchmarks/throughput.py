"""Training throughput, arithmetic ceiling and peak memory of each method, next to its bare backbone.

For each method, on synthetic uint8 images, one process alternates two steps on the same batch:

A  the engine's real optimisation step (``TrainingLoop.step``: augmentation on the device,
   forward, loss, backward, optimiser, EMA, queue/bank updates);
B  the bare backbone: the same view recipe on the same images, the backbone's forward and
   backward on every view with a trivial loss, and the method's optimiser type over the
   backbone's parameters (at lr 0, so B never changes the weights A trains).

A and B alternate for ``--rounds`` rounds of ``--steps`` steps each (the order flips every
round), so load from other processes hits both alike. Reported per method: the median img/s of
A and of B, the median of the per-round ratios A/B, and their spread ``(max - min) / median``.
A spread above ``--max-spread`` prints a loud INCONCLUSIVE line and the script exits non-zero
(``--allow-noisy`` keeps exit 0); rerun with more ``--steps`` or on a quieter machine.

The arithmetic ceiling comes from ``torch.utils.flop_counter.FlopCounterMode`` over one A step
(everything the method computes: student and teacher forwards, heads, loss, backward) and one B
step: ``ceiling = B FLOPs / A FLOPs`` is the ratio a method would reach if it ran at the bare
backbone's FLOP rate, and ``eff. = ratio / ceiling`` how close it comes (the goal: >= 0.90).
Only matrix products, convolutions and attention count as FLOPs; element-wise work
(augmentation, normalisation, optimiser) is the overhead that eff. exposes.

Each method runs in a fresh subprocess so its peak memory (max RSS on CPU, max allocated on
CUDA), read after A's warm-up steps and before any B step, is its own.

Defaults follow the backbone: ``convnet`` width 32 on 1 x 28 px (Fashion-MNIST), ``resnet*``
width 1.0 with the CIFAR stem on 3 x 32 px, ``vit_tiny`` patch 4, D=192, 6 blocks, 3 heads on
3 x 32 px (other ``vit_*``: patch 4). ``--config`` takes a training config instead: backbone,
method options, views, batch size, precision and the image geometry of its data set come from
it; command-line flags and ``--set`` override it.

    python benchmarks/throughput.py                      # all methods, ConvNet width 32, 28 px
    python benchmarks/throughput.py --methods simclr byol --threads 1 --steps 3 --rounds 3
    python benchmarks/throughput.py --config configs/simclr/fashion_mnist.yaml --threads 1
    python benchmarks/throughput.py --methods simclr byol --backbone resnet18   # 3 x 32 px, CIFAR stem
    python benchmarks/throughput.py --methods mae --backbone vit_tiny --backbone-options '{"depth": 4}'
    python benchmarks/throughput.py --device cuda --batch-size 256 --steps 30 --rounds 5
    python benchmarks/throughput.py --methods moco_v2 --set method.mochi=true --set method.mochi_start_epoch=0

Columns: ``ratio`` = train img/s / backbone img/s (median of the rounds), ``spread`` = the
rounds' (max - min) / median of that ratio, ``ceiling`` and ``eff.`` as above, ``MFLOP/img`` =
forward+backward FLOPs per input image (all its views) of the method step and of the bare
backbone, ``update %`` = share of the step spent in ``on_step_end`` (queue, memory bank,
centre or codebook updates), ``peak MB`` = the method's peak memory.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from selfsup.config import Config
    from selfsup.engine.loop import DataBatch, TrainingLoop


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class RoundStats:
    """Summary of interleaved rounds.

    Attributes:
        method_ips: median img/s of the method step (A) over the rounds.
        backbone_ips: median img/s of the bare backbone step (B).
        ratio: median of the per-round ratios A / B (each round's A and B ran back to back).
        spread: ``(max - min) / median`` of the per-round ratios (0 with a single round).
        ratios: the per-round ratios.
    """

    method_ips: float
    backbone_ips: float
    ratio: float
    spread: float
    ratios: tuple[float, ...]

    def inconclusive(self, max_spread: float) -> bool:
        """Whether the rounds disagree too much (spread above ``max_spread``, or not finite)."""
        return is_inconclusive(self.spread, max_spread)


def is_inconclusive(spread: float, max_spread: float) -> bool:
    """``True`` when ``spread`` exceeds ``max_spread`` or is NaN/inf."""
    return not math.isfinite(spread) or spread > max_spread


def summarize_rounds(method_ips: Sequence[float], backbone_ips: Sequence[float]) -> RoundStats:
    """Medians and the ratio spread of per-round throughputs (``method_ips[i]`` and
    ``backbone_ips[i]`` measured in the same round)."""
    if len(method_ips) != len(backbone_ips) or not method_ips:
        raise ValueError(f"need equal, non-zero round counts, got {len(method_ips)} and {len(backbone_ips)}")
    ratios = tuple(a / b for a, b in zip(method_ips, backbone_ips))
    median = statistics.median(ratios)
    spread = (max(ratios) - min(ratios)) / median if median > 0 else math.inf
    return RoundStats(
        method_ips=statistics.median(method_ips),
        backbone_ips=statistics.median(backbone_ips),
        ratio=median,
        spread=spread,
        ratios=ratios,
    )


# --------------------------------------------------------------------------- FLOPs


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (matrix products, convolutions, attention; forward and backward) of one call."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    # torch counts the CUDA attention kernels but not the CPU one (a ViT on CPU would count
    # no attention at all): count it with the same formulas. Arguments arrive as shapes.
    def forward(q: Any, k: Any, v: Any, *_: Any, **__: Any) -> int:
        return int(sdpa_flop_count(q, k, v))

    def backward(grad: Any, q: Any, k: Any, v: Any, *_: Any, **__: Any) -> int:
        return int(sdpa_backward_flop_count(grad, q, k, v))

    aten = torch.ops.aten
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        fn()
    return int(counter.get_total_flops())


def flop_ceiling(backbone_flops: float, method_flops: float) -> float:
    """The throughput ratio a method would reach at the bare backbone's FLOP rate."""
    return backbone_flops / method_flops if method_flops > 0 else math.nan


# --------------------------------------------------------------------------- one measurement


def bare_backbone_step(
    loop: TrainingLoop, data: DataBatch, optimizer: torch.optim.Optimizer | None = None
) -> Callable[[], None]:
    """Step B: ``loop``'s view recipe on ``data``, the method's backbone forward and backward on
    every view with a trivial loss, then ``optimizer`` (default: SGD at lr 0) over the backbone."""
    import torch

    from selfsup.transforms import to_float

    backbone = loop.method.backbone
    params = [p for p in backbone.parameters() if p.requires_grad]
    opt = optimizer if optimizer is not None else torch.optim.SGD(params, lr=0.0, momentum=0.9)
    device = loop.device

    def step() -> None:
        x = to_float(data.images.to(device, non_blocking=True))
        views = loop.train_views(x)
        if loop.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=loop.precision == "bf16"):
            loss = sum(backbone(v).float().pow(2).mean() for v in views)
        assert isinstance(loss, torch.Tensor)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def interleaved(
    step_a: Callable[[], object],
    step_b: Callable[[], object],
    rounds: int,
    steps: int,
    sync: Callable[[], None] = lambda: None,
) -> tuple[list[float], list[float]]:
    """Seconds of ``steps`` calls of A and of B in each of ``rounds`` rounds; A runs first in
    even rounds and B first in odd ones, so a slow drift of the machine hits both alike."""
    seconds: dict[int, list[float]] = {0: [], 1: []}
    for r in range(rounds):
        for which in (0, 1) if r % 2 == 0 else (1, 0):
            fn = step_a if which == 0 else step_b
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            seconds[which].append(time.perf_counter() - start)
    return seconds[0], seconds[1]


def measure_loop(
    loop: TrainingLoop,
    data: DataBatch,
    *,
    rounds: int = 5,
    steps: int = 10,
    warmup: int = 2,
    bare_optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Interleaved throughput of ``loop.step`` (A) and the bare backbone step (B) on ``data``,
    the FLOPs of one step of each, the share of A in ``on_step_end`` and the peak memory after
    A's warm-up (before B ran). Returns a JSON-able dict."""
    import torch

    device = loop.device
    method = loop.method

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

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
    counter = iter(range(10**9))

    def step_a() -> None:
        loop.step(data, loop.step_info(next(counter)))

    step_b = bare_backbone_step(loop, data, bare_optimizer)
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(max(warmup, 1)):  # the peak needs one A step even without warm-up
            step_a()
        sync()
        if device.type == "cuda":
            peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for _ in range(warmup):
            step_b()
        method_flops = count_flops(step_a)
        backbone_flops = count_flops(step_b)
        update_seconds[0] = 0.0
        seconds_a, seconds_b = interleaved(step_a, step_b, rounds, steps, sync)
    finally:
        del method.on_step_end  # the instance attribute: back to the class's method
    images = steps * len(data)
    stats = summarize_rounds([images / s for s in seconds_a], [images / s for s in seconds_b])
    ceiling = flop_ceiling(backbone_flops, method_flops)
    views = loop.train_views(torch.zeros(2, *data.images.shape[1:], device=device))
    return {
        "method_images_per_s": stats.method_ips,
        "backbone_images_per_s": stats.backbone_ips,
        "ratio": stats.ratio,
        "spread": stats.spread,
        "ratios": list(stats.ratios),
        "method_flops_per_image": method_flops / len(data),
        "backbone_flops_per_image": backbone_flops / len(data),
        "ceiling": ceiling,
        "efficiency": stats.ratio / ceiling if ceiling > 0 else math.nan,
        "update_share": update_seconds[0] / sum(seconds_a),
        "peak_memory_mb": peak_mb,
        "views": len(views),
    }


# --------------------------------------------------------------------------- settings


def backbone_defaults(name: str, image_size: int) -> dict[str, Any]:
    """Benchmark defaults of a backbone's options: sizes that fit small images."""
    if name == "convnet":
        return {"width": 32}
    if name.startswith("resnet"):
        return {"width": 1.0, "stem": "cifar"}
    if name.startswith("vit_"):
        patch = next(p for p in (4, 7, 2, 1) if image_size % p == 0)
        if name == "vit_tiny":  # ViT-tiny's width and heads, half its depth
            return {"patch_size": patch, "embed_dim": 192, "depth": 6, "num_heads": 3}
        return {"patch_size": patch}
    return {}


def default_geometry(backbone: str) -> tuple[int, int]:
    """``(channels, image_size)``: Fashion-MNIST's 1 x 28 for the ConvNet, else 3 x 32 (CIFAR)."""
    return (1, 28) if backbone == "convnet" else (3, 32)


# (channels, image size) of the data sets whose geometry is fixed by their options.
_KNOWN_DATA = {"fashion-mnist": (1, 28), "digits": (1, 8), "cifar": (3, 32), "scenes": (3, 32)}


def data_geometry(cfg: Config) -> tuple[int, int]:
    """``(channels, image_size)`` of the config's data set, without loading it when known."""
    name = cfg.data["name"]
    size = cfg.data.get("image_size")
    if name in _KNOWN_DATA:
        channels, native = _KNOWN_DATA[name]
        return channels, int(size or native)
    if name == "image-folder":
        return (1 if cfg.data.get("mode") == "L" else 3), int(size or 64)
    from selfsup.engine.build import build_data

    splits = build_data(cfg)
    return splits.in_channels, splits.image_size


@dataclass(frozen=True)
class Setup:
    """What one benchmark measures: the run config plus the synthetic images' geometry."""

    cfg: Config
    channels: int
    image_size: int
    note: str = ""


def resolve_setup(args: argparse.Namespace, method: str) -> Setup:
    """The config for ``method``: ``--config`` (if any), per-backbone defaults, then the
    command-line flags and ``--set`` overrides, in that order."""
    from selfsup.config import apply_overrides, from_dict, load_config

    base = load_config(args.config) if args.config else None
    tree: dict[str, Any] = base.to_dict() if base is not None else {}
    note = ""
    if base is not None and base.method["name"] != method:
        # Another method's options and view recipe do not fit this one: use its defaults.
        note = f"{method}: method options and views are its defaults (the config is {base.method['name']})"
        tree["method"], tree["views"] = {"name": method}, {"name": None}
    config_backbone: Mapping[str, Any] = base.backbone if base is not None else {}
    name = args.backbone or config_backbone.get("name") or "convnet"
    channels, size = data_geometry(base) if base is not None else default_geometry(name)
    channels = args.channels if args.channels is not None else channels
    size = args.image_size if args.image_size is not None else size
    if config_backbone.get("name") == name:
        options = {k: v for k, v in config_backbone.items() if k != "name"}
    else:
        options = backbone_defaults(name, size)
    options.update(json.loads(args.backbone_options or "{}"))
    tree["backbone"] = {"name": name, **options}
    train = tree.get("train", {})
    overrides = [
        f"method.name={method}",
        f"train.batch_size={args.batch_size or train.get('batch_size', 256)}",
        f"train.precision={args.precision or train.get('precision', 'fp32')}",
        "train.progress=false",
    ]
    if args.channels_last is not None:
        overrides.append(f"train.channels_last={str(args.channels_last).lower()}")
    cfg = from_dict(apply_overrides(tree, [*overrides, *args.set]))
    return Setup(cfg, channels, size, note)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Builds ``args.method`` on synthetic images as ``resolve_setup`` says and measures it."""
    import torch

    from selfsup.engine.build import build_backbone, build_method, build_views
    from selfsup.engine.loop import DataBatch, LoopSchedule, TrainingLoop
    from selfsup.engine.optim import build_optimizer, set_schedule
    from selfsup.engine.run import resolve_device
    from selfsup.registry import METHODS

    setup = resolve_setup(args, args.method)
    cfg, channels, size = setup.cfg, setup.channels, setup.image_size
    threads = args.threads if args.threads is not None else cfg.train.threads
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(args.device)
    batch_size = cfg.train.batch_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, channels, size, size), dtype=torch.uint8, generator=generator)
    data = DataBatch(images=images, index=torch.arange(batch_size), label=torch.zeros(batch_size, dtype=torch.long))

    class Splits:  # the facts the builders read, without loading a dataset
        name = "synthetic"
        in_channels, image_size, num_classes = channels, size, 10
        mean, std = (0.5,) * channels, (0.25,) * channels
        pretrain = range(batch_size * 100)

    splits: Any = Splits()
    method_cls: Any = METHODS.get(args.method)
    needs_frozen = [n for n in method_cls.frozen_models if n != "init"]
    if needs_frozen:  # e.g. SEED's teacher: a backbone of the same architecture, as an earlier run
        import tempfile

        from safetensors.torch import save_file

        folder = tempfile.mkdtemp(prefix="selfsup-bench-")
        weights = {k: v.contiguous() for k, v in build_backbone(cfg, splits).state_dict().items()}
        meta = {"backbone": json.dumps(cfg.backbone), "in_channels": str(channels), "image_size": str(size)}
        save_file(weights, f"{folder}/backbone.safetensors", metadata=meta)
        for name in needs_frozen:
            cfg.method[name] = {"run": folder}
    torch.manual_seed(0)
    method = build_method(cfg, splits).to(device)
    views = build_views(cfg, splits).to(device)
    if cfg.train.channels_last:
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
        precision=cfg.train.precision,
        channels_last=cfg.train.channels_last,
    )
    # B: the same optimiser type over the backbone alone, at lr 0 so it leaves A's weights be.
    backbone_params = [p for p in method.backbone.parameters() if p.requires_grad]
    bare_optimizer = build_optimizer([{"params": backbone_params}], cfg.optim, 0.0)
    set_schedule(bare_optimizer, 0.0, cfg.optim.weight_decay)
    result = measure_loop(
        loop, data, rounds=args.rounds, steps=args.steps, warmup=args.warmup, bare_optimizer=bare_optimizer
    )
    return {**result, "batch_size": batch_size, "precision": loop.precision}


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=None, help="default: the config's method, else every method")
    parser.add_argument("--config", default=None, help="a training config YAML (path or shipped name)")
    parser.add_argument("--backbone", default=None, help="default: the config's, else convnet")
    parser.add_argument(
        "--backbone-options", default=None, help="JSON of backbone options, merged over the backbone's defaults"
    )
    parser.add_argument("--image-size", type=int, default=None, help="default: the data set's, else by backbone")
    parser.add_argument("--channels", type=int, default=None, help="default: the data set's, else by backbone")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's, else 256")
    parser.add_argument("--steps", type=int, default=10, help="steps of A and of B in each round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved A/B rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of A and of B first")
    parser.add_argument("--max-spread", type=float, default=0.15, help="(max-min)/median of the round ratios")
    parser.add_argument("--allow-noisy", action="store_true", help="exit 0 even when a result is inconclusive")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16", "auto"])
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. method.mochi=true"
    )
    parser.add_argument("--method", help=argparse.SUPPRESS)  # internal: measure one method, print JSON
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    return args


def _child_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--methods`` and its values."""
    out: list[str] = []
    skipping = False
    for arg in argv:
        if arg == "--methods":
            skipping = True
        elif skipping and not arg.startswith("--"):
            continue
        else:
            skipping = False
            out.append(arg)
    return out


def main() -> None:
    args = parse_args()
    if args.method:
        print(json.dumps(measure(args)))
        return

    from selfsup.registry import METHODS

    if args.methods:
        methods = args.methods
    elif args.config:
        from selfsup.config import load_config

        methods = [load_config(args.config).method["name"]]
    else:
        methods = METHODS.names()
    setup = resolve_setup(args, methods[0])
    cfg = setup.cfg
    options = {k: v for k, v in cfg.backbone.items() if k != "name"}
    print(
        f"backbone={cfg.backbone['name']} {json.dumps(options)} image={setup.channels}x{setup.image_size}px "
        f"batch={cfg.train.batch_size} precision={cfg.train.precision} channels_last={cfg.train.channels_last} "
        f"device={args.device} threads={args.threads if args.threads is not None else cfg.train.threads} "
        f"rounds={args.rounds}x{args.steps} steps" + (f" config={args.config}" if args.config else "")
    )
    header = (
        f"{'method':<12} {'views':>5} {'train img/s':>12} {'backbone img/s':>15} {'ratio':>6} {'spread':>6} "
        f"{'ceiling':>7} {'eff.':>5} {'MFLOP/img':>10} {'bb MFLOP/img':>12} {'update %':>8} {'peak MB':>8}"
    )
    print(header)
    print("-" * len(header))
    child = _child_argv(sys.argv[1:])
    noisy: list[str] = []
    failed: list[str] = []
    notes: list[str] = []
    for name in methods:
        cmd = [sys.executable, __file__, "--method", name, *child]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name:<12} failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")
            failed.append(name)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{name:<12} {r['views']:>5} {r['method_images_per_s']:>12.0f} {r['backbone_images_per_s']:>15.0f} "
            f"{r['ratio']:>6.2f} {r['spread']:>6.2f} {r['ceiling']:>7.2f} {r['efficiency']:>5.2f} "
            f"{r['method_flops_per_image'] / 1e6:>10.1f} {r['backbone_flops_per_image'] / 1e6:>12.1f} "
            f"{100 * r['update_share']:>8.1f} {r['peak_memory_mb']:>8.0f}",
            flush=True,
        )
        if is_inconclusive(r["spread"], args.max_spread):
            ratios = ", ".join(f"{x:.2f}" for x in r["ratios"])
            noisy.append(
                f"!!! INCONCLUSIVE: {name}: the per-round ratios ({ratios}) spread {r['spread']:.2f} > "
                f"--max-spread {args.max_spread}: the machine is too noisy for this measurement; rerun with "
                "more --steps/--rounds or on a quieter machine"
            )
        if r.get("precision", cfg.train.precision) != cfg.train.precision:
            notes.append(f"{name}: precision {cfg.train.precision} ran as {r['precision']}")
        if args.config:
            note = resolve_setup(args, name).note
            if note:
                notes.append(note)
    print("eff. = ratio / ceiling (ceiling = backbone FLOPs / method FLOPs); goal >= 0.90")
    for line in notes:
        print(f"note: {line}")
    for line in noisy:
        print(line)
    if failed:
        print(f"!!! FAILED: {', '.join(failed)}")
    if failed or (noisy and not args.allow_noisy):
        sys.exit(1)


if __name__ == "__main__":
    main()
