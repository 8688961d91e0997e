"""Typed run configuration: YAML files, dotted command-line overrides, validation, dump.

A config has fixed engine sections (``optim``, ``train``, ``eval``, ``run``) that are
dataclasses, and component sections (``data``, ``backbone``, ``method``, ``views``) that are
a ``name`` plus keyword options of the registered factory. Component options are checked
against the factory's signature, so the defaults live in one place (the method's or
backbone's signature) and an unknown key or a wrong type is an error naming the key and the
closest valid key::

    cfg = load_config("configs/simclr/fashion_mnist.yaml", ["train.epochs=5", "method.temperature=0.2"])
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from selfsup.errors import ConfigError

__all__ = [
    "Config",
    "ConfigError",
    "EvalConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "check_options",
    "dump_config",
    "from_dict",
    "load_config",
    "resolve_config_path",
    "validate_values",
    "yaml_load",
]


class _Loader(yaml.SafeLoader):
    """YAML with the 1.2 core schema's numbers: ``1e-3`` is a float (YAML 1.1, PyYAML's
    default, reads it as a string because it lacks a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parses YAML text with YAML 1.2 number rules (see ``_Loader``)."""
    return yaml.load(text, Loader=_Loader)


@dataclass
class OptimConfig:
    """Optimiser and schedules. ``lr`` is the base rate at batch 256 (scaled by ``lr_scaling``).

    Attributes:
        name: ``"sgd"``, ``"adamw"`` or ``"lars"`` (You et al. 2017, arXiv:1708.03888).
        lr_scaling: ``"linear"`` (lr * B / 256, Goyal et al. 2017), ``"sqrt"`` or ``"none"``;
            ``None`` takes the method's default.
        weight_decay_end: final weight decay of a cosine schedule (DINO); ``None`` = constant.
        warmup_epochs: linear lr warm-up length; may be fractional.
        min_lr_ratio: final lr of the cosine decay as a fraction of the peak.
        clip_grad: max global gradient norm, 0 = no clipping.
    """

    name: Literal["sgd", "adamw", "lars"] = "sgd"
    lr: float = 0.1
    lr_scaling: Literal["linear", "sqrt", "none"] | None = None
    weight_decay: float = 1e-4
    weight_decay_end: float | None = None
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    lars_eta: float = 0.001
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0
    clip_grad: float = 0.0


@dataclass
class TrainConfig:
    """The training loop.

    Attributes:
        epochs: passes over the pretraining split (may be fractional).
        max_steps: stop after this many optimisation steps (``None`` = epochs decide).
        batch_size: images per process per optimisation step (all micro-batches together).
        accum_steps: micro-batches per optimisation step (gradient accumulation).
        precision: ``"bf16"`` runs the forward under bfloat16 autocast; losses stay float32.
            ``"auto"``: bf16 on a CUDA GPU that supports it, and on a CPU with native bf16
            units (AMX, AVX512-BF16) where a quick measurement finds it faster; else fp32.
        compile: ``torch.compile`` the method's forward (needs a C++ compiler on the CPU;
            the first steps are slow while it compiles).
        ema_momentum: ``[start, end]`` of the cosine teacher-momentum schedule (``None`` =
            the method's default).
        checkpoint_every: also checkpoint every N steps (0 = only at epoch ends and the end).
        knn_every: online kNN monitor every N epochs on the labelled split (0 = off).
        knn_samples: at most this many labelled train/test images for the online monitor.
        num_workers: DataLoader workers for datasets that decode or read files (``None`` =
            ``min(4, cores - 1)``; in-memory data sets never use workers).
        threads: torch intra-op threads (0 = leave PyTorch's default).
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.
    """

    epochs: float = 10.0
    max_steps: int | None = None
    batch_size: int = 256
    accum_steps: int = 1
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    ema_momentum: tuple[float, float] | None = None
    checkpoint_every: int = 0
    log_every: int = 20
    knn_every: int = 1
    knn_samples: int = 10000
    num_workers: int | None = None
    threads: int = 0
    device: str = "auto"
    sync_batchnorm: bool = False
    progress: bool = True


@dataclass
class EvalConfig:
    """Evaluation after pretraining (``selfsup eval`` uses the same keys).

    Attributes:
        knn_k: neighbour counts of the weighted kNN classifier (Wu et al. 2018).
        knn_temperature: temperature of the kNN vote weights.
        linear: also train a linear probe on frozen features.
        linear_epochs: epochs of the linear probe.
        baselines: also evaluate a random-init encoder and raw pixels.
        batch_size: feature-extraction batch size.
        finetune_epochs: epochs of ``selfsup eval finetune`` (end-to-end, MAE Appendix A.2).
        finetune_batch_size: fine-tuning batch size.
        finetune_lr: peak AdamW lr of fine-tuning (used as given, not batch-scaled).
        finetune_weight_decay: AdamW weight decay of fine-tuning (MAE: 0.05).
        finetune_layer_decay: layer-wise lr decay for ViT encoders (MAE ViT-B: 0.65).
        finetune_label_smoothing: label smoothing of the fine-tuning loss (MAE: 0.1).
        finetune_warmup_epochs: linear lr warm-up of fine-tuning.
        finetune_label_fraction: fine-tune on a class-balanced, seeded fraction of the
            training labels (0.01 / 0.1: the semi-supervised protocol of SimCLR sec. 4.2).
        cluster: also score k-means (k = classes) on the test features: ACC, NMI, ARI.
        retrieval: also score test-to-train retrieval (cosine, labels as relevance): mAP@R,
            Recall@1/5 (Musgrave et al. 2020).
        semi: also fine-tune on each of ``semi_fractions`` of the labels, pretrained and
            from random init, with the ``finetune_*`` recipe (SimCLR sec. 4.2; slow).
        semi_fractions: the class-balanced, seeded label fractions of ``semi``.
        dense: also score a linear segmentation probe on the frozen feature maps (mIoU, pixel
            accuracy; needs a data set with masks: scenes), like ``selfsup eval dense``.
        dense_epochs: epochs of the dense (segmentation) linear probe of ``selfsup eval dense``.
        dense_min_steps: at least this many Adam steps of the dense probe (small sets).
    """

    knn_k: list[int] = field(default_factory=lambda: [20, 200])
    knn_temperature: float = 0.07
    linear: bool = True
    linear_epochs: int = 100
    baselines: bool = True
    batch_size: int = 512
    at_end: bool = True
    finetune_epochs: int = 10
    finetune_batch_size: int = 128
    finetune_lr: float = 1e-3
    finetune_weight_decay: float = 0.05
    finetune_layer_decay: float = 0.75
    finetune_label_smoothing: float = 0.1
    finetune_warmup_epochs: float = 1.0
    finetune_label_fraction: float = 1.0
    cluster: bool = False
    retrieval: bool = False
    semi: bool = False
    semi_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1])
    dense: bool = False
    dense_epochs: int = 10
    dense_min_steps: int = 300


@dataclass
class RunConfig:
    """Where a run lives. ``resume``: ``None``, ``"auto"`` (latest checkpoint of this run
    folder if any) or a checkpoint path. A run folder that already holds files is refused
    unless ``resume`` is ``"auto"`` (continue it) or ``overwrite`` is true (replace the run's
    files in it)."""

    out_dir: str = "runs"
    name: str | None = None
    resume: str | None = None
    tensorboard: bool = True
    overwrite: bool = False


ENGINE_SECTIONS: dict[str, type] = {
    "optim": OptimConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "run": RunConfig,
}
COMPONENT_SECTIONS = ("data", "backbone", "method", "views")
DEFAULT_COMPONENTS: dict[str, dict[str, Any]] = {
    "data": {"name": "fashion-mnist"},
    "backbone": {"name": "convnet"},
    "method": {"name": "simclr"},
    "views": {"name": None},
}


@dataclass
class Config:
    """A whole run: engine sections as dataclasses, components as ``{"name": ..., **options}``."""

    data: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_COMPONENTS["data"]))
    backbone: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_COMPONENTS["backbone"]))
    method: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_COMPONENTS["method"]))
    views: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_COMPONENTS["views"]))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for section in COMPONENT_SECTIONS:
            out[section] = dict(getattr(self, section))
        for section in ENGINE_SECTIONS:
            out[section] = _plain(dataclasses.asdict(getattr(self, section)))
        return out

    def options(self, section: str) -> dict[str, Any]:
        """The keyword options of a component section (everything but ``name``)."""
        return {k: v for k, v in getattr(self, section).items() if k != "name"}


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so the YAML dump is plain data."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------- type checking
def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Checks ``value`` against a type annotation, converting lossless cases (int -> float,
    list -> tuple). Raises ``ConfigError`` naming ``key`` otherwise."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(annotation)}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}{hint}")
        return value
    if origin in (list, tuple, Sequence, typing.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


def _unknown_key(key: str, valid: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(valid), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown key {key!r} in {where}{hint} (valid: {', '.join(sorted(valid))})")


def check_options(
    factory: Callable[..., Any],
    options: Mapping[str, Any],
    section: str,
    reserved: Sequence[str] = (),
    error: type[Exception] = ConfigError,
    require: bool = False,
) -> dict[str, Any]:
    """Validates keyword ``options`` against ``factory``'s signature (names and types) and
    returns them type-coerced; raises ``error`` naming the key and the closest valid one.

    ``reserved`` names are passed by the engine itself (e.g. ``in_channels``) and may not be
    set by the user. With ``require``, parameters without a default must be present.
    """
    target = factory.__init__ if inspect.isclass(factory) else factory
    signature = inspect.signature(factory)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolved forward references: fall back to no type checks
        hints = {}
    params = {
        name: p
        for name, p in signature.parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name not in reserved
    }
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    checked = {}
    try:
        for key, value in options.items():
            if key in reserved:
                raise ConfigError(f"{section}.{key} is set by the engine and cannot be configured")
            if key not in params:
                if accepts_any:
                    checked[key] = value
                    continue
                raise _unknown_key(f"{section}.{key}", list(params), f"section {section!r}")
            checked[key] = coerce(value, hints.get(key, params[key].annotation), f"{section}.{key}")
        missing = [k for k, p in params.items() if require and p.default is p.empty and k not in options]
        if missing:
            raise ConfigError(
                f"{section} needs {', '.join(f'{k}=...' for k in missing)} (valid options: {', '.join(params)})"
            )
    except ConfigError as err:
        if error is ConfigError:
            raise
        raise error(str(err)) from None
    return checked


# ---------------------------------------------------------------------------- load / merge
def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=5"`` -> ``(["train", "epochs"], 5)``; values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if len(path) < 2:
        raise ConfigError(f"override {text!r} must name a section and a key, e.g. train.epochs=5")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: cannot parse value: {err}") from None
    return path, value


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(tree: Mapping[str, Any]) -> Config:
    """Builds a validated ``Config`` from plain data (engine sections fully type-checked,
    component sections checked later against their factories by ``validate_components``)."""
    sections = set(COMPONENT_SECTIONS) | set(ENGINE_SECTIONS)
    for key in tree:
        if key not in sections:
            raise _unknown_key(str(key), sorted(sections), "the config")
    cfg = Config()
    for section in COMPONENT_SECTIONS:
        value = tree.get(section)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"section {section!r} must be a mapping with a 'name'")
        merged = dict(DEFAULT_COMPONENTS[section])
        if "name" in value and value["name"] != merged.get("name"):
            merged = {"name": value["name"]}  # another component: the old options don't apply
        merged.update(value)
        setattr(cfg, section, merged)
    for section, cls in ENGINE_SECTIONS.items():
        value = tree.get(section) or {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"section {section!r} must be a mapping")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, item in value.items():
            if key not in names:
                raise _unknown_key(f"{section}.{key}", names, f"section {section!r}")
            kwargs[key] = coerce(item, hints[key], f"{section}.{key}")
        setattr(cfg, section, cls(**kwargs))
    validate_values(cfg)
    return cfg


# ---------------------------------------------------------------------------- value ranges
#: ``(section.key, test, what the value must be)`` for every engine option with a range.
_RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("optim.lr", lambda v: v > 0, "> 0"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.weight_decay_end", lambda v: v is None or v >= 0, ">= 0, or null"),
    ("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.betas", lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    ("optim.lars_eta", lambda v: v > 0, "> 0"),
    ("optim.warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("optim.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("optim.clip_grad", lambda v: v >= 0, ">= 0; 0 = no clipping"),
    ("train.epochs", lambda v: v > 0, "> 0"),
    ("train.max_steps", lambda v: v is None or v >= 1, ">= 1, or null to let the epochs decide"),
    ("train.batch_size", lambda v: v >= 1, ">= 1"),
    ("train.accum_steps", lambda v: v >= 1, ">= 1"),
    ("train.ema_momentum", lambda v: v is None or all(0 <= m <= 1 for m in v), "two numbers in [0, 1], or null"),
    ("train.checkpoint_every", lambda v: v >= 0, ">= 0; 0 = at epoch ends only"),
    ("train.log_every", lambda v: v >= 1, ">= 1"),
    ("train.knn_every", lambda v: v >= 0, ">= 0; 0 = off"),
    ("train.knn_samples", lambda v: v >= 1, ">= 1"),
    ("train.num_workers", lambda v: v is None or v >= 0, ">= 0, or null for min(4, cores - 1)"),
    ("train.threads", lambda v: v >= 0, ">= 0; 0 = PyTorch's default"),
    ("eval.knn_k", lambda v: len(v) > 0 and all(k >= 1 for k in v), "a non-empty list of integers >= 1"),
    ("eval.knn_temperature", lambda v: v > 0, "> 0"),
    ("eval.linear_epochs", lambda v: v >= 1, ">= 1"),
    ("eval.batch_size", lambda v: v >= 1, ">= 1"),
    ("eval.finetune_epochs", lambda v: v >= 1, ">= 1"),
    ("eval.finetune_batch_size", lambda v: v >= 1, ">= 1"),
    ("eval.finetune_lr", lambda v: v > 0, "> 0"),
    ("eval.finetune_weight_decay", lambda v: v >= 0, ">= 0"),
    ("eval.finetune_layer_decay", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("eval.finetune_label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("eval.finetune_warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("eval.finetune_label_fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("eval.semi_fractions", lambda v: len(v) > 0 and all(0 < f <= 1 for f in v), "a non-empty list in (0, 1]"),
    ("eval.dense_epochs", lambda v: v >= 1, ">= 1"),
    ("eval.dense_min_steps", lambda v: v >= 0, ">= 0"),
]
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")


def validate_values(cfg: Config) -> None:
    """Checks the range of every engine option (types are already checked) and the form of
    ``train.device``; raises ``ConfigError`` naming the option and the valid range. Whether
    the device exists is checked when the run starts (``selfsup.engine.run.resolve_device``),
    before any data is loaded."""
    for key, ok, rule in _RANGES:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            raise ConfigError(f"{key}={value!r} is out of range (it must be {rule})")
    if not _DEVICE.match(cfg.train.device):
        raise ConfigError(f"train.device={cfg.train.device!r} is not a device (use auto, cpu, cuda or cuda:<index>)")
    if cfg.train.batch_size % cfg.train.accum_steps:
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) must be divisible by "
            f"train.accum_steps ({cfg.train.accum_steps})"
        )
    if cfg.run.resume is not None and cfg.run.overwrite:
        raise ConfigError("run.overwrite=true and run.resume are exclusive (overwrite starts afresh; drop one)")


# ---------------------------------------------------------------------------- shipped configs
def _config_dirs() -> list[Path]:
    """Where shipped configs live: the repository checkout this package runs from (an
    editable install or ``PYTHONPATH=src``), then the data files of a regular install
    (``<prefix>/share/selfsup/configs``, see ``[tool.setuptools.data-files]``)."""
    import sys
    import sysconfig

    dirs = [Path(__file__).resolve().parents[2] / "configs"]
    for prefix in (sysconfig.get_path("data"), sys.prefix, sys.base_prefix):
        dirs.append(Path(prefix) / "share" / "selfsup" / "configs")
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def shipped_configs() -> list[str]:
    """The names (``<method>/<dataset>``) of the configs that ship with selfsup."""
    names: set[str] = set()
    for folder in _config_dirs():
        names.update(str(p.relative_to(folder).with_suffix("")) for p in folder.glob("*/*.yaml"))
    return sorted(names)


def resolve_config_path(spec: str | Path) -> Path:
    """A config file from a path, or from a shipped config's name (``simclr/fashion_mnist``,
    with or without ``.yaml``, optionally starting with ``configs/``); a path that exists wins."""
    path = Path(spec)
    if path.is_file():
        return path
    name = str(spec).removeprefix("configs/").removesuffix(".yaml")
    if re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", name):
        for folder in _config_dirs():
            candidate = folder / f"{name}.yaml"
            if candidate.is_file():
                return candidate
    close = difflib.get_close_matches(name, shipped_configs(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else " (`selfsup list configs` lists the shipped ones)"
    raise ConfigError(f"config file {str(spec)!r} does not exist and is not a shipped config name{hint}")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Reads a YAML config (a path or a shipped config's name such as ``simclr/digits``; or
    starts from defaults) and applies dotted overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            loaded = yaml_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded or {}
    return from_dict(apply_overrides(tree, overrides))


def apply_overrides(tree: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Plain config data with dotted ``section.key=value`` overrides merged in."""
    merged = dict(tree)
    for text in overrides:
        key_path, value = parse_override(text)
        update: dict[str, Any] = {}
        _set_path(update, key_path, value)
        merged = _merge(merged, update)
    return merged


def dump_config(cfg: Config, path: str | Path) -> None:
    """Writes the resolved config as YAML (loadable by ``load_config``)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
