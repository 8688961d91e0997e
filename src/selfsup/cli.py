"""Command line: ``selfsup pretrain | resume | eval | export | embed | list | visualize``.

selfsup pretrain configs/simclr/fashion_mnist.yaml train.epochs=5 method.temperature=0.2
selfsup pretrain simclr/fashion_mnist train.epochs=5                # a shipped config by name
selfsup pretrain configs/simclr/fashion_mnist.yaml --nproc 4       # 4 processes (torchrun)
torchrun --nproc_per_node 4 -m selfsup.cli pretrain configs/simclr/fashion_mnist.yaml
selfsup resume runs/simclr-fashion-mnist-20261123-101500
selfsup eval knn runs/simclr-fashion-mnist-20261123-101500
selfsup eval linear runs/.../checkpoints/last.pt eval.linear_epochs=50
selfsup eval retrieval runs/... --baselines      # also cluster (k-means), semi (1% / 10% labels)
selfsup eval zeroshot runs/clip-...                # image-text runs: class-name prompts; retrieval: image<->text
selfsup eval tokenizer runs/vq_tokenizer-...       # reconstruction error, codebook use; into results.json
selfsup list methods
selfsup export runs/simclr-... --format onnx              # also safetensors, torchscript
selfsup embed runs/simclr-... photos/ -o features/         # features.npy + paths.txt
selfsup curate runs/dino-... pool/ seeds/ -o curated/      # curated.txt for data.list_file
selfsup data pack photos/ packed/ --size 64                # uint8 shards for data.name=packed
selfsup distill runs/simclr-... --student-backbone '{name: convnet, width: 16}'  # SimCLR v2
selfsup visualize attention runs/dino-... --images 0 1 2

Every expected failure prints one line, ``error: <what> (<fix>)``, and exits with its class's
code: 2 config, 3 data, 4 checkpoint or run folder, 5 diverged training, 6 disk full, 130 /
143 interrupted by SIGINT / SIGTERM (after saving a checkpoint). ``--debug`` or
``SELFSUP_DEBUG=1`` shows the traceback instead (docs/faults.md lists the faults).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from selfsup.config import ConfigError, apply_overrides, from_dict, load_config, resolve_config_path, shipped_configs
from selfsup.errors import RunInterrupted, SelfsupError, StorageError

if TYPE_CHECKING:
    import torch

    from selfsup.config import Config
    from selfsup.engine.build import Components


def _launch(args: argparse.Namespace, target: str, command: str) -> int | None:
    """Starts ``--nproc`` workers running this command (``None``: run in this process)."""
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc} is out of range (it must be >= 1)")
    if args.nproc == 1:
        return None
    from selfsup.engine.launch import launch_local, under_launcher

    if under_launcher():
        raise ConfigError(
            "--nproc starts processes itself; under torchrun leave it out "
            "(torchrun's --nproc_per_node sets the process count)"
        )
    return launch_local(args.nproc, target, args.overrides, command)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from selfsup.engine.run import pretrain

    config = str(resolve_config_path(args.config))  # a shipped config's name works too
    cfg = load_config(config, args.overrides)  # config errors show before any process starts
    from selfsup.engine.run import resolve_device

    resolve_device(cfg.train.device)
    launched = _launch(args, config, "pretrain")
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
    tree = apply_overrides(state["config"], list(args.overrides))
    tree["run"] = {**tree.get("run", {}), "resume": str(args.run), "overwrite": False}
    from_dict(tree)  # config errors show before any process starts
    launched = _launch(args, str(args.run), "resume")
    if launched is not None:
        return launched
    tree = apply_overrides(state["config"], _keep_global_batch(state, list(args.overrides)))
    tree["run"] = {**tree.get("run", {}), "resume": str(args.run), "overwrite": False}
    pretrain(from_dict(tree), command=_command_line())
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from selfsup.engine.build import build_components
    from selfsup.engine.checkpoint import load_checkpoint
    from selfsup.engine.evaluation import baseline_rows, evaluate_encoder, format_table
    from selfsup.engine.run import resolve_device

    state = load_checkpoint(args.run)
    cfg = from_dict(apply_overrides(state["config"], args.overrides))
    device = resolve_device(cfg.train.device)
    parts = build_components(cfg, device)
    parts.method.load_state_dict(state["method"])
    splits = parts.splits
    from selfsup.engine.zeroshot import has_text_side

    if args.protocol == "zeroshot" or (args.protocol == "retrieval" and has_text_side(parts.method)):
        return _image_text(args, cfg, parts, device)
    if args.protocol == "tokenizer":  # needs no labels
        return _tokenizer(args, cfg, parts, device)
    if splits.num_classes < 2:
        raise ConfigError(f"dataset {splits.name!r} has no labels to evaluate with")
    if args.protocol == "finetune":
        return _finetune(args, cfg, parts, device)
    if args.protocol in ("cluster", "retrieval", "semi"):
        return _protocol(args, cfg, parts, device)
    if args.protocol == "dense":
        return _dense(args, cfg, parts, device)
    cfg.eval.linear = args.protocol == "linear"
    cfg.eval.cluster = cfg.eval.retrieval = False  # their own commands
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
        parts.precision,
        seed=cfg.train.seed,
    )
    if args.protocol == "linear":
        metrics = {k: v for k, v in metrics.items() if k.startswith("linear")}
    rows[f"{cfg.method['name']} ({cfg.backbone['name']})"] = metrics
    if args.baselines:
        rows.update(baseline_rows(splits.train, splits.test, splits.num_classes, parts.eval_views, cfg.eval, device))
    print(format_table(rows, f"{splits.name} test set, top-1 (%)"))
    if args.json:
        print(json.dumps(rows))
    return 0


def _finetune(args: argparse.Namespace, cfg: Config, parts: Components, device: torch.device) -> int:
    """``selfsup eval finetune``: end-to-end fine-tuning of the run's encoder (or, with
    ``--from-scratch``, of a freshly initialised one of the same architecture)."""
    from selfsup.engine.evaluation import format_table
    from selfsup.engine.finetune import finetune_encoder
    from selfsup.engine.protocols import finetune_from_config
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
    metrics = finetune_from_config(
        encoder, parts.method.num_features, train, cfg, splits, parts.eval_views, device, parts.precision
    )
    init = "random init" if args.from_scratch else "pretrained"
    if e.finetune_label_fraction != 1.0:
        init += f", {len(train)} labels"
    rows = {f"{cfg.method['name']} ({cfg.backbone['name']}, {init})": metrics}
    print(format_table(rows, f"{splits.name} test set, fine-tuning top-1 (%)"))
    if args.json:
        print(json.dumps(rows))
    return 0


def _protocol(args: argparse.Namespace, cfg: Config, parts: Components, device: torch.device) -> int:
    """``selfsup eval cluster|retrieval|semi``: the protocols of ``selfsup.engine.protocols``."""
    from selfsup.engine.evaluation import format_table
    from selfsup.engine.protocols import semi_supervised_rows

    splits = parts.splits
    if args.protocol == "semi":
        rows = semi_supervised_rows(parts.method, cfg, splits, parts.eval_views, device, parts.precision)
        title = f"{splits.name} test set, fine-tuning top-1 (%) on a fraction of the labels"
    else:
        rows = _frozen_rows(args.protocol, args, cfg, parts, device)
        title = f"{splits.name} test set, {args.protocol} (%)"
    print(format_table(rows, title))
    if args.json:
        print(json.dumps(rows))
    return 0


def _frozen_rows(
    protocol: str, args: argparse.Namespace, cfg: Config, parts: Components, device: torch.device
) -> dict[str, dict[str, float]]:
    """``protocol``'s rows on the run's frozen features (and the baselines with ``--baselines``)."""
    from selfsup.engine.protocols import frozen_protocol_rows

    return frozen_protocol_rows(
        protocol,
        parts.method,
        cfg,
        parts.splits,
        parts.eval_views,
        device,
        baselines=args.baselines,
        precision=parts.precision,
    )


def _image_text(args: argparse.Namespace, cfg: Config, parts: Components, device: torch.device) -> int:
    """``selfsup eval zeroshot|retrieval`` of an image-text run (CLIP): zero-shot top-1 from
    class-name prompts, or image<->text Recall@K (then also the image-to-image retrieval when
    the data set is labelled); the metrics are added to the run's results.json."""
    from selfsup.engine.evaluation import format_table
    from selfsup.engine.zeroshot import (
        format_image_text,
        merge_results,
        run_folder,
        text_retrieval_rows,
        zeroshot_rows,
    )

    splits = parts.splits
    if args.protocol == "zeroshot":
        rows = zeroshot_rows(parts.method, cfg, splits, parts.eval_views, device)
        print(format_image_text(rows, f"{splits.name} test set, zero-shot (%)"))
    else:
        png = run_folder(args.run) / "retrieval_examples.png"
        rows = text_retrieval_rows(parts.method, cfg, splits, parts.eval_views, device, examples=png)
        print(format_image_text(rows, f"{splits.name} test set, image<->text retrieval (%)"))
        print(f"retrieval examples: {png}")
        if splits.num_classes >= 2:
            frozen = _frozen_rows("retrieval", args, cfg, parts, device)
            print(format_table(frozen, f"{splits.name} test set, image retrieval (%)"))
            for name, metrics in frozen.items():
                rows.setdefault(name, {}).update(metrics)
    print(f"added to {merge_results(args.run, rows)}", flush=True)
    if args.json:
        print(json.dumps(rows))
    return 0


def _tokenizer(args: argparse.Namespace, cfg: Config, parts: Components, device: torch.device) -> int:
    """``selfsup eval tokenizer``: a tokenizer run's reconstruction error and codebook use on the
    test split, added to the run's row of its results.json (``selfsup report`` tables them)."""
    from selfsup.engine.evaluation import format_tokenizer_metrics, tokenizer_metrics
    from selfsup.engine.protocols import encoder_row_names
    from selfsup.engine.zeroshot import merge_results, run_folder

    splits = parts.splits
    metrics = tokenizer_metrics(parts.method, splits.test, parts.eval_views, device, cfg.eval.batch_size)
    if not metrics:
        raise ConfigError(
            f"{args.run} is a {cfg.method['name']} run, which is not a visual tokenizer (evaluate "
            "the runs of vq_tokenizer or vqkd_tokenizer; other runs: selfsup eval knn)"
        )
    path = run_folder(args.run) / "results.json"
    row = encoder_row_names(cfg, parts.method)[0]
    if path.is_file():  # the run's own row is the first (`selfsup report` reads it there)
        row = next(iter(json.loads(path.read_text())), row)
    print(format_tokenizer_metrics(metrics, f"{splits.name} test"))
    print(f"added to {merge_results(args.run, {row: metrics})}", flush=True)
    if args.json:
        print(json.dumps({row: metrics}))
    return 0


def _dense(args: argparse.Namespace, cfg: Config, parts: Components, device: torch.device) -> int:
    """``selfsup eval dense``: a linear segmentation probe on the frozen feature maps (scenes)."""
    from selfsup.engine.dense import dense_rows
    from selfsup.engine.evaluation import format_table

    rows = dense_rows(
        parts.method, cfg, parts.splits, parts.eval_views, device, baselines=args.baselines, precision=parts.precision
    )
    print(format_table(rows, f"{parts.splits.name} test set, dense linear probe (%)"))
    if args.json:
        print(json.dumps(rows))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    """``selfsup export``: the encoder as safetensors, ONNX or TorchScript, verified."""
    from selfsup.engine.export import export_encoder

    export_encoder(args.run, args.format, args.output, projector=args.projector, timm=args.timm)
    return 0


def _dataset_options(items: list[str]) -> dict[str, Any]:
    """``key=value`` data set options (values read as YAML) of ``selfsup embed`` / ``curate``."""
    import yaml

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"data set option {item!r} is not key=value (e.g. root=/data/fashion-mnist)")
        options[key] = yaml.safe_load(value)
    return options


def _cmd_embed(args: argparse.Namespace) -> int:
    """``selfsup embed``: features of every image of a folder or data set (resumable)."""
    from selfsup.engine.embed import embed
    from selfsup.engine.run import resolve_device

    options = _dataset_options(args.overrides)
    embed(
        args.run,
        args.source,
        args.output,
        split=args.split,
        options=options,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        num_workers=args.workers,
        device=resolve_device(args.device),
    )
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    """``selfsup distill``: SimCLR v2's fine-tune-then-distil table on 1% / 10% of the labels."""
    from pathlib import Path

    import yaml

    from selfsup.engine.build import build_components
    from selfsup.engine.checkpoint import load_checkpoint
    from selfsup.engine.distill import distill_rows
    from selfsup.engine.evaluation import format_table
    from selfsup.engine.run import resolve_device

    student = yaml.safe_load(args.student_backbone) if args.student_backbone else None
    if student is not None and not (isinstance(student, dict) and "name" in student):
        raise ConfigError(
            f"--student-backbone {args.student_backbone!r} is not a backbone mapping "
            "(e.g. '{name: convnet, width: 16}')"
        )
    state = load_checkpoint(args.run)
    cfg = from_dict(apply_overrides(state["config"], args.overrides))
    device = resolve_device(cfg.train.device)
    parts = build_components(cfg, device)
    parts.method.load_state_dict(state["method"])
    if parts.splits.num_classes < 2:
        raise ConfigError(f"dataset {parts.splits.name!r} has no labels to fine-tune and distil with")
    try:
        rows = distill_rows(
            parts.method,
            cfg,
            parts.splits,
            parts.eval_views,
            device,
            precision=parts.precision,
            student_backbone=student,
            epochs=args.epochs,
            temperature=args.temperature,
            lr=args.lr,
        )
    except ValueError as err:
        if isinstance(err, SelfsupError):
            raise
        raise ConfigError(f"distill: {one_line(err)}") from err
    print(format_table(rows, f"{parts.splits.name} test set, top-1 (%) with a fraction of the labels"))
    results = Path(args.run) / "results.json"
    if Path(args.run).is_dir():
        merged = json.loads(results.read_text()) if results.is_file() else {}
        for name, metrics in rows.items():
            merged.setdefault(name, {}).update(metrics)
        results.write_text(json.dumps(merged, indent=2))
        print(f"added to {results}", flush=True)
    if args.json:
        print(json.dumps(rows))
    return 0


def _cmd_curate(args: argparse.Namespace) -> int:
    """``selfsup curate``: DINOv2's data curation (deduplicate a pool, retrieve for seeds)."""
    from selfsup.engine.curate import curate
    from selfsup.engine.run import resolve_device

    options = _dataset_options(args.overrides)
    curate(
        args.run,
        args.pool,
        args.seeds,
        args.output,
        threshold=args.threshold,
        dedup_k=args.dedup_k,
        retrieve_k=args.k,
        backend=args.backend,
        center=not args.no_center,
        pool_split=args.pool_split,
        seed_split=args.seed_split,
        options=options,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=resolve_device(args.device),
    )
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    """``selfsup data pack | verify``: decode a data set once into memory-mapped shards."""
    from selfsup.data.packed import pack, source_splits, verify_pack

    if args.action == "verify":
        print(f"{args.source}: {verify_pack(args.source)} images, every shard's checksum matches")
        return 0
    if args.output is None:
        raise ConfigError("selfsup data pack needs SOURCE and OUT (the folder to write the shards to)")
    splits = source_splits(args.source, _dataset_options(args.overrides), args.size)
    manifest = pack(splits, args.output, args.shard_size, args.batch_size, args.workers, source=args.source)
    counts = ", ".join(f"{name}={group['count']}" for name, group in manifest["groups"].items())
    skipped = f", {manifest['skipped']} unreadable skipped" if manifest["skipped"] else ""
    print(
        f"packed {splits.summary()} into {args.output} ({counts}{skipped}); train on it with data.name=packed "
        f"data.root={args.output}"
    )
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from selfsup.registry import BACKBONES, DATASETS, METHODS, VIEW_RECIPES

    if args.what == "configs":
        for name in shipped_configs():
            print(name)
        return 0
    registry = {"methods": METHODS, "backbones": BACKBONES, "datasets": DATASETS, "views": VIEW_RECIPES}[args.what]
    for name in registry.names():
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfsup", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also: SELFSUP_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain an encoder from a YAML config")
    p.add_argument("config", help="YAML config file, or a shipped config's name such as simclr/fashion_mnist")
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
    p.add_argument(
        "protocol",
        choices=["knn", "linear", "finetune", "cluster", "retrieval", "semi", "dense", "zeroshot", "tokenizer"],
    )
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.knn_k=[10,20]")
    p.add_argument(
        "--baselines",
        action="store_true",
        help="also evaluate raw pixels and HOG (cluster, retrieval: and random init)",
    )
    p.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="finetune: train the same architecture from random init (the baseline)",
    )
    p.set_defaults(func=_cmd_eval)

    from selfsup import report  # light: stdlib and yaml only

    report.configure_parser(sub.add_parser("report", help="results tables generated from run folders"))

    p = sub.add_parser("export", help="export a run's encoder (safetensors, ONNX, TorchScript), verified")
    p.add_argument("run", help="run folder, its backbone.safetensors or a checkpoint file")
    p.add_argument("--format", required=True, choices=["safetensors", "onnx", "torchscript"])
    p.add_argument("-o", "--output", help="output file (default: <run>/export/encoder.<format>)")
    p.add_argument("--projector", action="store_true", help="include the projection head (from the checkpoint)")
    p.add_argument("--timm", action="store_true", help="safetensors: timm's parameter names and model arguments")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("embed", help="features of every image of a folder or data set (.npy, resumable)")
    p.add_argument("run", help="run folder, backbone.safetensors or exported .safetensors file")
    p.add_argument("source", help="a folder of images or a registered data set name (e.g. fashion-mnist)")
    p.add_argument("overrides", nargs="*", help="data set options key=value, e.g. root=/data/fmnist")
    p.add_argument("-o", "--output", required=True, help="output folder (features.npy, paths.txt or indices.txt)")
    p.add_argument("--split", default="train", help="data set split: train, test or pretrain (default train)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=4096, help="images per resumable chunk")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding processes (folders)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<index>")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("distill", help="SimCLR v2: fine-tune on 1%%/10%% of the labels, distil into a student")
    p.add_argument("run", help="run folder or checkpoint file (the teacher's pretraining run)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.semi_fractions=[0.01,0.1]")
    p.add_argument("--student-backbone", help="the student's backbone as YAML, e.g. '{name: convnet, width: 16}'")
    p.add_argument("--epochs", type=int, help="distillation epochs over the training set (eval.finetune_epochs)")
    p.add_argument("--lr", type=float, help="distillation peak lr (default eval.finetune_lr)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the soft targets")
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser("curate", help="DINOv2 data curation: deduplicate a pool, retrieve neighbours of seeds")
    p.add_argument("run", help="run folder, backbone.safetensors or exported .safetensors file")
    p.add_argument("pool", help="uncurated images: a folder or a registered data set name")
    p.add_argument("seeds", help="curated seed images: a folder or a registered data set name")
    p.add_argument("overrides", nargs="*", help="data set options key=value, e.g. root=/data/fmnist")
    p.add_argument("-o", "--output", required=True, help="output folder (curated.txt, duplicates.tsv)")
    p.add_argument("--threshold", type=float, default=0.95, help="cosine similarity of duplicates (default 0.95)")
    p.add_argument("--dedup-k", type=int, default=64, help="neighbours searched for duplicates (DINOv2: 64)")
    p.add_argument("--k", type=int, default=4, help="pool images retrieved per seed (DINOv2: 4)")
    p.add_argument("--backend", default="auto", choices=["auto", "faiss", "torch"], help="k-NN search")
    p.add_argument("--no-center", action="store_true", help="do not subtract the pool's mean embedding first")
    p.add_argument("--pool-split", default="train", help="data set split of the pool (default train)")
    p.add_argument("--seed-split", default="train", help="data set split of the seeds (default train)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding processes (folders)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<index>")
    p.set_defaults(func=_cmd_curate)

    p = sub.add_parser("data", help="pack a folder or data set into memory-mapped uint8 shards (data.name=packed)")
    p.add_argument("action", choices=["pack", "verify"], help="pack SOURCE OUT, or verify the checksums of OUT")
    p.add_argument("source", help="pack: a folder of images or a registered data set name; verify: the pack")
    p.add_argument("output", nargs="?", help="pack: the new folder of shards")
    p.add_argument("overrides", nargs="*", help="data set options key=value, e.g. mode=L test_root=/data/val")
    p.add_argument("--size", type=int, help="image side after resize + center crop (image folders: 64)")
    p.add_argument("--shard-size", type=int, default=50_000, help="images per shard file (default 50000)")
    p.add_argument("--batch-size", type=int, default=256, help="images decoded per batch")
    p.add_argument("--workers", type=int, help="decoding processes (default: min(4, cores - 1))")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("list", help="list registered components")
    p.add_argument("what", choices=["methods", "backbones", "datasets", "views", "configs"])
    p.set_defaults(func=_cmd_list)

    from selfsup import visualize  # light: torch is imported only when a command runs

    visualize.configure_parser(
        sub.add_parser("visualize", help="visualise a run (ViT attention maps, MAE reconstructions)")
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with options and dotted overrides in any order: ``pretrain CFG
    --nproc 2 train.epochs=3`` and ``pretrain CFG train.epochs=3 --nproc 2`` are the same.

    (argparse's ``parse_intermixed_args`` refuses sub-commands, so the overrides a
    sub-command's positional list did not take are appended to it here, in order.)
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if "--debug" in extra:  # given after the sub-command
        extra.remove("--debug")
        args.debug = True
    if extra:
        unknown = [e for e in extra if e.startswith("-") or not hasattr(args, "overrides")]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = [*args.overrides, *extra]
    return args


def one_line(err: BaseException) -> str:
    """``err``'s message as one line: a DataLoader worker's wrapped error gives its original
    message, other multi-line messages their first line."""
    text = str(err).strip() or type(err).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Original Traceback" in text and lines:  # torch re-raises a worker's error with its traceback
        last = lines[-1]
        head, sep, rest = last.partition(": ")
        return rest if sep and "." in head and " " not in head else last
    return lines[0] if lines else type(err).__name__


def _storage_error(err: OSError) -> StorageError | None:
    """A full disk (or quota, or read-only file system) anywhere in a command as one error."""
    if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return None
    where = f" writing {err.filename!r}" if err.filename else ""
    return StorageError(f"{os.strerror(err.errno).lower()}{where} (free space, or set run.out_dir to another disk)")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM outside the training steps (which save a checkpoint first) stops the command
    like Ctrl-C does, with exit code 143."""

    def stop(signum: int, frame: Any) -> None:
        raise RunInterrupted("SIGTERM received: stopped (nothing to save at this point)", signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _wrap_visualize(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``selfsup visualize``: a run of the wrong kind or an image index out of range is a
    usage error (exit 2), not a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (TypeError, ValueError, IndexError, FileNotFoundError) as err:
            if isinstance(err, SelfsupError):
                raise
            raise ConfigError(f"visualize: {one_line(err)}") from err

    return run


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    debug = args.debug or os.environ.get("SELFSUP_DEBUG", "") not in ("", "0")
    func = _wrap_visualize(args.func) if args.command == "visualize" else args.func
    try:
        with _sigterm_as_interrupt():
            return int(func(args) or 0)
    except KeyboardInterrupt:
        err: BaseException = RunInterrupted("interrupted (Ctrl-C)", signal.SIGINT)
        if debug:
            raise
    except SelfsupError as known:
        if debug:
            raise
        err = known
    except OSError as os_err:
        storage = _storage_error(os_err)
        if storage is None or debug:
            raise
        err = storage
    except FloatingPointError as diverged:  # the training loop's NonFiniteLossError outside a run
        if debug:
            raise
        err = diverged
    code = getattr(err, "exit_code", 5 if isinstance(err, FloatingPointError) else 1)
    print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
