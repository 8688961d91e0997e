"""Command line: ``selfsup pretrain | resume | eval | list | visualize``.

selfsup pretrain configs/simclr/fashion_mnist.yaml train.epochs=5 method.temperature=0.2
selfsup pretrain configs/simclr/fashion_mnist.yaml --nproc 4       # 4 processes (torchrun)
torchrun --nproc_per_node 4 -m selfsup.cli pretrain configs/simclr/fashion_mnist.yaml
selfsup resume runs/simclr-fashion-mnist-20261123-101500
selfsup eval knn runs/simclr-fashion-mnist-20261123-101500
selfsup eval linear runs/.../checkpoints/last.pt eval.linear_epochs=50
selfsup list methods
selfsup visualize attention runs/dino-... --images 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from selfsup.config import ConfigError, apply_overrides, from_dict, load_config

if TYPE_CHECKING:
    import torch

    from selfsup.config import Config
    from selfsup.engine.build import Components


def _launch(args: argparse.Namespace, target: str, command: str) -> int | None:
    """Starts ``--nproc`` workers running this command (``None``: run in this process)."""
    if args.nproc <= 1:
        return None
    from selfsup.engine.launch import launch_local, under_launcher

    if under_launcher():
        print(
            "error: --nproc starts processes itself; under torchrun leave it out "
            "(torchrun's --nproc_per_node sets the process count)",
            file=sys.stderr,
        )
        return 2
    return launch_local(args.nproc, target, args.overrides, command)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from selfsup.engine.run import pretrain

    cfg = load_config(args.config, args.overrides)  # config errors show before any process starts
    launched = _launch(args, args.config, "pretrain")
    if launched is not None:
        return launched
    pretrain(cfg, command=_command_line())
    return 0


def _command_line() -> str:
    """The command as the user typed it (``selfsup ...``), for the run's ``run_info.json``."""
    import shlex

    return shlex.join(["selfsup", *sys.argv[1:]])


def _keep_global_batch(state: dict[str, Any], overrides: list[str]) -> list[str]:
    """Overrides that keep the checkpoint's global batch with this job's process count.

    Steps, epochs and the lr schedule are in units of the global batch, so resuming with
    another number of processes changes the per-process batch instead (unless the user set
    ``train.batch_size`` explicitly; the trainer then checks the product).
    """
    resolved = state.get("resolved") or {}
    saved = resolved.get("global_batch")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if (
        saved is None
        or world == resolved.get("world_size", 1)
        or any(o.startswith("train.batch_size=") for o in overrides)
    ):
        return overrides
    if saved % world:
        raise ConfigError(
            f"the checkpoint's global batch {saved} does not split into {world} processes; "
            "resume with a process count that divides it"
        )
    if os.environ.get("RANK", "0") == "0":
        print(
            f"resume: keeping the global batch of {saved}: train.batch_size={saved // world} "
            f"on each of {world} process(es) (was {resolved.get('world_size', 1)})",
            flush=True,
        )
    return [*overrides, f"train.batch_size={saved // world}"]


def _cmd_resume(args: argparse.Namespace) -> int:
    from selfsup.engine.checkpoint import load_checkpoint
    from selfsup.engine.run import pretrain

    state = load_checkpoint(args.run)  # errors show before any process starts
    launched = _launch(args, str(args.run), "resume")
    if launched is not None:
        return launched
    tree = apply_overrides(state["config"], _keep_global_batch(state, list(args.overrides)))
    tree["run"] = {**tree.get("run", {}), "resume": str(args.run)}
    pretrain(from_dict(tree), command=_command_line())
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from selfsup.engine.build import build_components
    from selfsup.engine.checkpoint import load_checkpoint
    from selfsup.engine.evaluation import evaluate_encoder, format_table, raw_pixel_metrics
    from selfsup.engine.run import resolve_device

    state = load_checkpoint(args.run)
    cfg = from_dict(apply_overrides(state["config"], args.overrides))
    device = resolve_device(cfg.train.device)
    parts = build_components(cfg, device)
    parts.method.load_state_dict(state["method"])
    splits = parts.splits
    if splits.num_classes < 2:
        raise ConfigError(f"dataset {splits.name!r} has no labels to evaluate with")
    if args.protocol == "finetune":
        return _finetune(args, cfg, parts, device)
    cfg.eval.linear = args.protocol == "linear"
    rows = {}
    metrics = evaluate_encoder(
        parts.method.embed,
        parts.method,
        splits.train,
        splits.test,
        splits.num_classes,
        parts.eval_views,
        cfg.eval,
        device,
        cfg.train.precision,
        seed=cfg.train.seed,
    )
    if args.protocol == "linear":
        metrics = {k: v for k, v in metrics.items() if k.startswith("linear")}
    rows[f"{cfg.method['name']} ({cfg.backbone['name']})"] = metrics
    if args.baselines:
        rows["raw pixels"] = raw_pixel_metrics(
            splits.train, splits.test, splits.num_classes, parts.eval_views, cfg.eval, device
        )
    print(format_table(rows, f"{splits.name} test set, top-1 (%)"))
    if args.json:
        print(json.dumps(rows))
    return 0


def _finetune(args: argparse.Namespace, cfg: Config, parts: Components, device: torch.device) -> int:
    """``selfsup eval finetune``: end-to-end fine-tuning of the run's encoder (or, with
    ``--from-scratch``, of a freshly initialised one of the same architecture)."""
    from selfsup.engine.build import build_views
    from selfsup.engine.evaluation import format_table
    from selfsup.engine.finetune import finetune, finetune_encoder
    from selfsup.eval.label_subset import balanced_label_subset

    splits = parts.splits
    encoder = finetune_encoder(parts.method, cfg, splits, from_scratch=args.from_scratch)
    e = cfg.eval
    train = splits.train
    if e.finetune_label_fraction != 1.0:
        if train.labels is None:
            raise ConfigError(
                f"eval.finetune_label_fraction needs a dataset whose labels are known up front; "
                f"{splits.name!r} has none"
            )
        try:
            train = train.subset(balanced_label_subset(train.labels, e.finetune_label_fraction, cfg.train.seed))
        except ValueError as err:
            raise ConfigError(f"eval.finetune_label_fraction: {err}") from None
    metrics = finetune(
        encoder,
        parts.method.num_features,
        train,
        splits.test,
        splits.num_classes,
        train_views=build_views(cfg, splits, "single_view").to(device),
        eval_views=parts.eval_views,
        epochs=e.finetune_epochs,
        batch_size=e.finetune_batch_size,
        lr=e.finetune_lr,
        weight_decay=e.finetune_weight_decay,
        layer_decay=e.finetune_layer_decay,
        label_smoothing=e.finetune_label_smoothing,
        warmup_epochs=e.finetune_warmup_epochs,
        device=device,
        seed=cfg.train.seed,
    )
    init = "random init" if args.from_scratch else "pretrained"
    if e.finetune_label_fraction != 1.0:
        init += f", {len(train)} labels"
    rows = {f"{cfg.method['name']} ({cfg.backbone['name']}, {init})": metrics}
    print(format_table(rows, f"{splits.name} test set, fine-tuning top-1 (%)"))
    if args.json:
        print(json.dumps(rows))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from selfsup.registry import BACKBONES, DATASETS, METHODS, VIEW_RECIPES

    registry = {"methods": METHODS, "backbones": BACKBONES, "datasets": DATASETS, "views": VIEW_RECIPES}[args.what]
    for name in registry.names():
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfsup", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain an encoder from a YAML config")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes on this machine, one per GPU (torchrun); train.batch_size is per process",
    )
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("resume", help="continue a run from its last checkpoint")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("overrides", nargs="*")
    p.add_argument(
        "--nproc", type=int, default=1, help="processes on this machine (torchrun); the global batch of the run is kept"
    )
    p.set_defaults(func=_cmd_resume)

    p = sub.add_parser("eval", help="evaluate a run's encoder with labels")
    p.add_argument("protocol", choices=["knn", "linear", "finetune"])
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.knn_k=[10,20]")
    p.add_argument("--baselines", action="store_true", help="also evaluate raw pixels")
    p.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="finetune: train the same architecture from random init (the baseline)",
    )
    p.set_defaults(func=_cmd_eval)

    from selfsup import report  # light: stdlib and yaml only

    report.configure_parser(sub.add_parser("report", help="results tables generated from run folders"))

    p = sub.add_parser("list", help="list registered components")
    p.add_argument("what", choices=["methods", "backbones", "datasets", "views"])
    p.set_defaults(func=_cmd_list)

    from selfsup import visualize  # light: torch is imported only when a command runs

    visualize.configure_parser(
        sub.add_parser("visualize", help="visualise a run (ViT attention maps, MAE reconstructions)")
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
