"""Getting a trained encoder out of a run: :func:`load_encoder` and :func:`export_encoder`.

An :class:`Encoder` is a run's evaluation backbone (optionally followed by its projection
head) together with the preprocessing it was trained with: images scaled to ``[0, 1]``,
centre-resized to ``image_size`` and normalised per channel with the pretraining data's
``mean`` and ``std`` (the "eval" view). ``encoder.preprocess(images)`` does that;
``encoder(x)`` maps normalised images ``(B, C, S, S)`` to features ``(B, D)``.

Exports (``selfsup export RUN --format safetensors|onnx|torchscript``) hold the weights or
the traced graph with a dynamic batch dimension, and the preprocessing as metadata
(:func:`encoder_metadata`: safetensors metadata, ONNX ``metadata_props``, a TorchScript
extra file ``selfsup.json``). Every export is read back right after writing and compared
with the eager model on random and real images (onnxruntime runs the ONNX file).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.config import ConfigError, from_dict, load_config
from selfsup.errors import CheckpointError, DataError, SelfsupError
from selfsup.transforms import to_float
from selfsup.transforms.views import eval_view

__all__ = [
    "EXPORT_FORMATS",
    "Encoder",
    "ExportError",
    "ExportResult",
    "Preprocessing",
    "encoder_metadata",
    "export_encoder",
    "load_encoder",
    "timm_model_args",
    "timm_state_dict",
]

#: ``--format`` -> file suffix of the export.
EXPORT_FORMATS = {"safetensors": ".safetensors", "onnx": ".onnx", "torchscript": ".torchscript.pt"}
#: Largest max-abs difference between an export and the eager model that passes verification.
TOLERANCE = 1e-4
#: The install hint for the optional packages of each format.
_EXTRA_HINT = "pip install 'selfsup[export]'"
#: What the metadata's ``format`` key says (bump when the meaning of a key changes).
METADATA_FORMAT = "selfsup-encoder/1"
_TORCHSCRIPT_EXTRA = "selfsup.json"


class ExportError(SelfsupError):
    """An export that does not reproduce the eager model within the tolerance."""

    exit_code = 4


# ------------------------------------------------------------------------------ metadata


@dataclass(frozen=True)
class Preprocessing:
    """What an encoder expects: ``in_channels`` x ``image_size`` squares in ``[0, 1]``,
    normalised per channel as ``(x - mean) / std``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    in_channels: int


def encoder_metadata(
    backbone_cfg: Mapping[str, Any],
    in_channels: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    **extra: Any,
) -> dict[str, str]:
    """The string metadata every encoder file carries (``backbone.safetensors`` and exports).

    Keys: ``backbone`` (JSON of the backbone config: name and options), ``in_channels``,
    ``image_size`` (the side the backbone was built for), ``eval_image_size`` (the eval
    view's side), ``mean`` and ``std`` (JSON lists, one per channel, of images in [0, 1]),
    ``preprocessing`` (the same in words) and ``format``; ``extra`` adds more (non-string
    values are JSON-encoded).
    """
    mean_l, std_l = [float(m) for m in mean], [float(s) for s in std]
    meta = {
        "format": METADATA_FORMAT,
        "backbone": json.dumps(dict(backbone_cfg)),
        "in_channels": str(int(in_channels)),
        "image_size": str(int(image_size)),
        "eval_image_size": str(int(image_size)),
        "mean": json.dumps(mean_l),
        "std": json.dumps(std_l),
        "preprocessing": (
            f"float images in [0, 1] (uint8 / 255), {in_channels} channel(s), shorter side resized to "
            f"{image_size} (bilinear, antialiased) and centre-cropped, then (x - mean) / std per channel"
        ),
    }
    for key, value in extra.items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return meta


def _preprocessing_from(meta: Mapping[str, str]) -> Preprocessing | None:
    """The preprocessing recorded in ``meta``, or ``None`` when its mean/std are missing
    (files written before they were recorded)."""
    if "mean" not in meta or "std" not in meta:
        return None
    size = int(meta.get("eval_image_size", meta["image_size"]))
    return Preprocessing(
        tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"])), size, int(meta["in_channels"])
    )


# ------------------------------------------------------------------------------- encoder


class Encoder(nn.Module):
    """A trained encoder in eval mode with its preprocessing.

    ``backbone`` is the module that computes the run's ``method.embed`` (``Method.embedder``):
    the trained backbone, or a method's own encoder (CMC's two views, colorization's lightness
    input), then recorded in ``embedder``.
    ``encoder.preprocess(images)``: uint8 ``[0, 255]`` or float ``[0, 1]`` images ``(B, C, H, W)``
    (or one ``(C, H, W)``) -> normalised ``(B, C, S, S)`` on the encoder's device.
    ``encoder(x)``: normalised ``(B, C, S, S)`` -> features ``(B, D)`` (the backbone's pooled
    features, or the projector's output when built with one). ``encoder.encode(images)``
    does both without gradients. Attributes: ``mean``, ``std``, ``image_size``,
    ``in_channels``, ``num_features``, ``backbone``, ``projector`` (or ``None``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        preprocessing: Preprocessing,
        backbone_cfg: Mapping[str, Any],
        projector: nn.Module | None = None,
        embedder: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.preprocessing = preprocessing
        self.backbone_cfg = dict(backbone_cfg)
        # ``{"method", "embedder"}`` metadata when ``backbone`` is a method's own encoder (see
        # ``Method.embedder``), which the backbone config alone does not rebuild.
        self.embedder = dict(embedder or {})
        self.view = eval_view(
            preprocessing.image_size, preprocessing.in_channels, preprocessing.mean, preprocessing.std
        )
        self.eval()

    @property
    def mean(self) -> tuple[float, ...]:
        return self.preprocessing.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.preprocessing.std

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    @property
    def in_channels(self) -> int:
        return self.preprocessing.in_channels

    @property
    def num_features(self) -> int:
        """Width ``D`` of :meth:`forward`'s output."""
        width: Any = self.backbone.num_features
        if self.projector is None:
            return int(width)
        with torch.no_grad():
            probe = torch.zeros(2, int(width), device=_device_of(self.backbone))
            return int(_eval_copy_call(self.projector, probe).shape[-1])

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 or ``[0, 1]`` float images ``(B, C, H, W)`` / ``(C, H, W)`` -> normalised
        float32 ``(B, C, S, S)`` on the encoder's device (the run's eval view)."""
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images (B, {self.in_channels}, H, W), got {tuple(images.shape)} (this encoder takes "
                f"{self.in_channels}-channel images)"
            )
        return self.view(to_float(images.to(_device_of(self.backbone))))[0]

    def forward(self, x: Tensor) -> Tensor:
        """Normalised images ``(B, C, S, S)`` -> features ``(B, D)``."""
        features = self.backbone(x)
        return features if self.projector is None else self.projector(features)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """:meth:`preprocess` then :meth:`forward`, without gradients: ``(B, D)``."""
        return self(self.preprocess(images))

    def metadata(self, **extra: Any) -> dict[str, str]:
        """:func:`encoder_metadata` of this encoder (plus ``num_features`` and ``projector``)."""
        p = self.preprocessing
        return encoder_metadata(
            self.backbone_cfg,
            p.in_channels,
            p.image_size,
            p.mean,
            p.std,
            num_features=str(self.num_features),
            projector="true" if self.projector is not None else "false",
            **self.embedder,
            **extra,
        )


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _eval_copy_call(module: nn.Module, x: Tensor) -> Tensor:
    was = module.training
    module.eval()
    try:
        return module(x)
    finally:
        module.train(was)


# ------------------------------------------------------------------------------- loading


def _resolve(source: str | Path, want_projector: bool = False) -> tuple[str, Path]:
    """``("safetensors" | "checkpoint", file)`` for a run folder, a ``.safetensors`` file or
    a checkpoint ``.pt`` file."""
    path = Path(source)
    if path.is_dir():
        weights, ckpt = path / "backbone.safetensors", path / "checkpoints" / "last.pt"
        if weights.is_file() and not want_projector:
            return "safetensors", weights
        if ckpt.is_file():
            return "checkpoint", ckpt
        if weights.is_file():
            raise CheckpointError(
                f"{str(path)!r} has no checkpoints/last.pt, which the projector head is read from "
                "(backbone.safetensors holds the backbone only; leave out --projector)"
            )
        raise CheckpointError(
            f"{str(path)!r} holds neither backbone.safetensors nor checkpoints/last.pt (give the folder of "
            "a run, e.g. runs/<name>, a backbone.safetensors file or a checkpoint .pt file)"
        )
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} does not exist (give a run folder, e.g. runs/<name>, or a file in it)")
    if path.suffix == ".safetensors":
        if want_projector:
            raise ConfigError(
                f"{str(path)!r} holds weights only; --projector needs the run folder or its checkpoints/last.pt"
            )
        return "safetensors", path
    return "checkpoint", path


def _run_dir_of(file: Path) -> Path | None:
    """The run folder a ``backbone.safetensors`` or checkpoint lies in, if it has a config."""
    for folder in (file.parent, file.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder
    return None


def _data_stats(file: Path, why: str) -> Preprocessing:
    """Fallback for files without recorded normalisation: recompute the pretraining data's
    statistics from the run's ``config.yaml``."""
    from selfsup.engine.build import build_data

    run_dir = _run_dir_of(file)
    if run_dir is None:
        raise ConfigError(
            f"{file} {why} and lies in no run folder with a config.yaml to recompute it from; pass "
            "mean=[...], std=[...] to load_encoder, or re-export it from its run folder with `selfsup export`"
        )
    cfg = load_config(str(run_dir / "config.yaml"))
    try:
        splits = build_data(cfg)
    except (DataError, OSError) as err:
        raise ConfigError(
            f"{file} {why}; recomputing it from {run_dir / 'config.yaml'} failed ({str(err).splitlines()[0]}); "
            "pass mean=[...], std=[...] to load_encoder"
        ) from None
    print(
        f"note: {file.name} {why}: using the statistics of the run's data ({splits.name}), recomputed from "
        f"{run_dir / 'config.yaml'}",
        flush=True,
    )
    return Preprocessing(tuple(splits.mean), tuple(splits.std), splits.image_size, splits.in_channels)


def _load_weights_into(module: nn.Module, state: dict[str, Tensor], file: Path, what: str) -> None:
    """Strict load that tolerates tensors of non-persistent buffers (a timm-layout ViT file
    holds the fixed sin-cos ``pos_embed``) when they equal the module's own."""
    buffers = dict(module.named_buffers())
    persistent = set(module.state_dict())
    for key in [k for k in state if k not in persistent and k in buffers]:
        own = buffers[key]
        if own.shape != state[key].shape or not torch.allclose(own.float(), state[key].float(), atol=1e-6):
            raise ConfigError(f"{file}: {key} differs from the one {what} computes (a different architecture?)")
        del state[key]
    from selfsup.engine.build import enable_saved_mask_token

    enable_saved_mask_token(module, state)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        raise ConfigError(
            f"the weights in {file} do not fit {what}: {lines[1] if len(lines) > 1 else lines[0]}"
        ) from None


def _from_safetensors(
    file: Path, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[nn.Module, Mapping[str, Any], Preprocessing, dict[str, Tensor], dict[str, str]]:
    """``(encoder, backbone config, preprocessing, projector tensors, embedder metadata)``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from selfsup.engine.build import rebuild_encoder

    try:
        with safe_open(str(file), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
    except Exception as err:  # safetensors raises its own SafetensorError for damaged files
        raise CheckpointError(f"cannot read {str(file)!r} as safetensors ({str(err).splitlines()[0]})") from None
    try:
        backbone_cfg = json.loads(meta["backbone"])
        in_channels, image_size = int(meta["in_channels"]), int(meta["image_size"])
        # Initialising draws from the global generator: leave the caller's stream alone.
        with torch.random.fork_rng(devices=[]):
            backbone = rebuild_encoder(meta, file.name)
    except (KeyError, ValueError) as err:
        raise ConfigError(
            f"{file} lacks the metadata to rebuild its architecture ({err}); export it with `selfsup export`"
        ) from None
    embedder = {k: meta[k] for k in ("method", "embedder") if "embedder" in meta}
    tensors = load_file(str(file))
    head = {k: v for k, v in tensors.items() if k.startswith("projector.")}
    state = {k: v for k, v in tensors.items() if not k.startswith("projector.")}
    what = f"the {meta['method']} encoder" if embedder else f"a {backbone_cfg} backbone"
    _load_weights_into(backbone, state, file, what)
    if mean is not None and std is not None:
        pre = Preprocessing(tuple(float(m) for m in mean), tuple(float(s) for s in std), image_size, in_channels)
    else:
        found = _preprocessing_from(meta)
        pre = found if found is not None else _data_stats(file, "records no normalisation (mean, std)")
    return backbone, backbone_cfg, pre, head, embedder


def projection_head(method: nn.Module) -> nn.Module:
    """The projection head that follows the method's evaluation backbone: ``projector`` (or
    a ``head`` the method keeps an EMA teacher of, as DINO), and its EMA teacher when the
    method evaluates its teacher (DINO). ``ConfigError`` when the method has none."""
    pairs = {id(s): t for s, t in getattr(method, "ema_pairs", lambda: [])()}
    uses_teacher = getattr(method, "eval_backbone", None) is not getattr(method, "backbone", None)
    for name in ("projector", "head"):
        head = getattr(method, name, None)
        # A "head" without an EMA teacher may act on tokens or pixels (SimMIM), not on features.
        if not isinstance(head, nn.Module) or (name == "head" and id(head) not in pairs):
            continue
        return pairs.get(id(head), head) if uses_teacher else head
    raise ConfigError(f"method {type(method).__name__} has no projection head to export (leave out --projector)")


def _from_checkpoint(
    file: Path, projector: bool, device: torch.device
) -> tuple[nn.Module, Mapping[str, Any], Preprocessing, nn.Module | None, dict[str, str]]:
    from selfsup.engine.build import build_components
    from selfsup.engine.checkpoint import load_checkpoint

    state = load_checkpoint(file)
    cfg = from_dict(state["config"])
    with torch.random.fork_rng(devices=[]):  # building seeds the global generator; leave the caller's alone
        parts = build_components(cfg, device)
    parts.method.load_state_dict(state["method"])
    splits = parts.splits
    pre = Preprocessing(tuple(splits.mean), tuple(splits.std), splits.image_size, splits.in_channels)
    head = copy.deepcopy(projection_head(parts.method)) if projector else None
    # What computes the run's ``embed``: the evaluated backbone, or the method's own encoder.
    module, spec = parts.method.embedder()
    embedder = {} if spec is None else {"method": str(cfg.method["name"]), "embedder": json.dumps(spec)}
    return copy.deepcopy(module), cfg.backbone, pre, head, embedder


def load_encoder(
    source: str | Path,
    *,
    projector: bool = False,
    device: str | torch.device = "cpu",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Encoder:
    """A run's trained encoder, in eval mode, with its preprocessing.

    Args:
        source: a run folder (its ``backbone.safetensors``, else ``checkpoints/last.pt``), a
            ``.safetensors`` file (a run's or one ``selfsup export`` wrote) or a checkpoint.
        projector: also the projection head (read from the run's checkpoint).
        device: where the encoder lives.
        mean, std: the normalisation, for files that do not record it (older runs outside
            their run folder); otherwise read from the file or, for older runs, recomputed
            from the run's data as its ``config.yaml`` describes.

    Example::

        encoder = selfsup.load_encoder("runs/simclr-fashion-mnist")
        features = encoder.encode(images_uint8)          # (B, D)

    References: the "eval" view recipe of ``selfsup.transforms.views``.
    """
    device = torch.device(device)
    kind, file = _resolve(source, projector)
    head: nn.Module | None = None
    if kind == "safetensors":
        backbone, backbone_cfg, pre, _, embedder = _from_safetensors(file, mean, std)
    else:
        backbone, backbone_cfg, pre, head, embedder = _from_checkpoint(file, projector, device)
        if mean is not None and std is not None:
            pre = Preprocessing(tuple(mean), tuple(std), pre.image_size, pre.in_channels)
    if len(pre.mean) not in (1, pre.in_channels) or len(pre.std) != len(pre.mean):
        raise ConfigError(
            f"mean/std need 1 or {pre.in_channels} entries each, got {list(pre.mean)} and {list(pre.std)}"
        )
    return Encoder(backbone, pre, backbone_cfg, head, embedder).to(device).eval()


# --------------------------------------------------------------------------------- timm


_TIMM_VITS = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}


def timm_model_args(backbone_cfg: Mapping[str, Any], in_channels: int, image_size: int) -> tuple[str, dict[str, Any]]:
    """``(timm model name, timm.create_model keyword arguments)`` of the timm model that
    :func:`timm_state_dict`'s weights load into with ``strict=True`` and that computes the
    same features (``num_classes=0``: pooled features, no classifier).

    ResNet-18/34/50 with the ImageNet stem (timm has no CIFAR stem) and the ViTs.
    """
    name = backbone_cfg.get("name")
    if name in ("resnet18", "resnet34", "resnet50"):
        if backbone_cfg.get("stem", "imagenet") != "imagenet" or float(backbone_cfg.get("width", 1.0)) != 1.0:
            raise ConfigError(f"timm has no {name} with stem={backbone_cfg.get('stem')!r} / width != 1")
        return name, {"num_classes": 0, "in_chans": in_channels}
    if name in _TIMM_VITS:
        import inspect

        from selfsup.registry import BACKBONES

        defaults = {
            k: p.default
            for k, p in inspect.signature(BACKBONES.get(name)).parameters.items()
            if p.default is not p.empty
        }
        opts = {**defaults, **{k: v for k, v in backbone_cfg.items() if k != "name"}}
        return _TIMM_VITS[name], {
            "num_classes": 0,
            "in_chans": in_channels,
            "img_size": image_size,
            "patch_size": opts["patch_size"],
            "embed_dim": opts["embed_dim"],
            "depth": opts["depth"],
            "num_heads": opts["num_heads"],
            "mlp_ratio": opts["mlp_ratio"],
            "qkv_bias": opts["qkv_bias"],
            "global_pool": "token" if opts["global_pool"] == "cls" else "avg",
            # Ours normalises every token before pooling; timm's fc_norm would normalise after.
            "fc_norm": False,
        }
    raise ConfigError(f"no timm equivalent is known for backbone {name!r} (resnet18/34/50 and vit_tiny/small/base)")


def timm_state_dict(backbone: nn.Module, backbone_cfg: Mapping[str, Any]) -> dict[str, Tensor]:
    """The backbone's weights under timm's names. Our module names follow timm's already
    (``conv1``, ``layer1.0.bn2``, ``blocks.0.attn.qkv``, ...); a ViT with fixed sin-cos
    position embeddings keeps them in a non-persistent buffer, which timm holds as the
    parameter ``pos_embed`` ``(1, 1 + L, D)``, so it is added (the class token's slot is 0)."""
    state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    pos = getattr(backbone, "pos_embed", None)
    if str(backbone_cfg.get("name", "")).startswith("vit_") and isinstance(pos, Tensor) and "pos_embed" not in state:
        state["pos_embed"] = pos.detach().clone()
    # timm's ViT has no mask token (SimMIM/iBOT's); it is unused by forward.
    state.pop("mask_token", None)
    return state


# -------------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    """Where an export went and how far it is from the eager model (max abs difference)."""

    path: Path
    max_abs_diff_random: float
    max_abs_diff_real: float
    metadata: dict[str, str]


def _require(fmt: str) -> None:
    """ConfigError naming the extra to install when a format's packages are missing."""
    if fmt != "onnx":
        return
    missing = []
    for package in ("onnx", "onnxruntime"):
        try:
            __import__(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise ConfigError(
            f"--format onnx needs the package(s) {', '.join(missing)}, which are not installed ({_EXTRA_HINT})"
        )


def _real_images(encoder: Encoder, file: Path, n: int = 6) -> tuple[Tensor, str]:
    """``n`` real images from the run's test split (its config.yaml), else smooth synthetic
    images (low-frequency noise, as natural images are), normalised: ``(n, C, S, S)``."""
    run_dir = _run_dir_of(file)
    if run_dir is not None:
        try:
            from selfsup.engine.build import build_data

            splits = build_data(load_config(str(run_dir / "config.yaml")))
            split = splits.test if len(splits.test) else splits.pretrain
            samples = [split[i] for i in range(min(n, len(split)))]
            images = torch.stack([s[0] for s in samples if s is not None])
            if len(images) and images.shape[1] == encoder.in_channels:
                return encoder.preprocess(images), f"{len(images)} {splits.name} images"
        except (SelfsupError, OSError, ValueError, RuntimeError):
            pass
    g = torch.Generator().manual_seed(1)
    low = torch.rand(n, encoder.in_channels, 4, 4, generator=g)
    images = nn.functional.interpolate(low, size=(encoder.image_size,) * 2, mode="bicubic", align_corners=False)
    return encoder.preprocess(images.clamp(0, 1)), f"{n} synthetic smooth images"


def _trace_error(fmt: str, encoder: Encoder, err: BaseException) -> ConfigError:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    first = lines[0] if lines else type(err).__name__
    return ConfigError(
        f"backbone {encoder.backbone_cfg.get('name')!r} cannot be traced for --format {fmt}: {first} "
        "(use --format safetensors, which needs no tracing)"
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences torch's deprecation and tracer warnings for the legacy exporters (the
    verification after writing checks what they produced)."""
    # The ONNX exporter also prints the whole graph when an operator is not supported.
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        yield


def _write_safetensors(encoder: Encoder, out: Path, meta: dict[str, str], timm: bool) -> Callable[[Tensor], Tensor]:
    from safetensors.torch import load_file, save_file

    state = timm_state_dict(encoder.backbone, encoder.backbone_cfg) if timm else encoder.backbone.state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if encoder.projector is not None:
        tensors.update(
            {f"projector.{k}": v.detach().contiguous().cpu() for k, v in encoder.projector.state_dict().items()}
        )
    save_file(tensors, str(out), metadata=meta)
    back = load_file(str(out))
    if set(back) != set(tensors) or any(not torch.equal(back[k], tensors[k]) for k in tensors):
        raise ExportError(f"{out}: the tensors read back differ from those written")
    reloaded, _, _, head, _ = _from_safetensors(out, None, None)
    projector = None
    if encoder.projector is not None:
        projector = copy.deepcopy(encoder.projector)
        _load_weights_into(projector, {k[len("projector.") :]: v for k, v in head.items()}, out, "the projector")
    rebuilt = Encoder(reloaded, encoder.preprocessing, encoder.backbone_cfg, projector, encoder.embedder).eval()
    return rebuilt


def _write_onnx(encoder: Encoder, out: Path, meta: dict[str, str], example: Tensor) -> Callable[[Tensor], Tensor]:
    import onnx
    import onnxruntime

    try:
        with _quiet():
            torch.onnx.export(
                encoder,
                (example,),
                str(out),
                dynamo=False,  # the TorchScript-based exporter needs no onnxscript
                input_names=["images"],
                output_names=["features"],
                dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
                opset_version=17,
            )
    except Exception as err:
        out.unlink(missing_ok=True)
        raise _trace_error("onnx", encoder, err) from None
    model = onnx.load(str(out))
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(out))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    stored = session.get_modelmeta().custom_metadata_map
    if any(stored.get(k) != v for k, v in meta.items()):
        raise ExportError(f"{out}: the metadata read back differs from the one written")

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run(["features"], {"images": x.cpu().numpy()})[0])

    return run


def _write_torchscript(
    encoder: Encoder, out: Path, meta: dict[str, str], example: Tensor
) -> Callable[[Tensor], Tensor]:
    extra = {_TORCHSCRIPT_EXTRA: ""}
    try:
        with _quiet():
            traced = torch.jit.trace(encoder, (example,), check_trace=False)
            torch.jit.save(traced, str(out), _extra_files={_TORCHSCRIPT_EXTRA: json.dumps(meta)})
            loaded = torch.jit.load(str(out), map_location="cpu", _extra_files=extra)
    except Exception as err:
        out.unlink(missing_ok=True)
        raise _trace_error("torchscript", encoder, err) from None
    if json.loads(extra[_TORCHSCRIPT_EXTRA]) != meta:
        raise ExportError(f"{out}: the metadata read back differs from the one written")
    return loaded


def export_encoder(
    source: str | Path,
    fmt: str,
    out: str | Path | None = None,
    *,
    projector: bool = False,
    timm: bool = False,
    tolerance: float = TOLERANCE,
    log: Callable[[str], None] | None = print,
) -> ExportResult:
    """Writes a run's encoder as ``fmt`` and checks it against the eager model.

    Args:
        source: run folder, ``backbone.safetensors`` or checkpoint (see :func:`load_encoder`).
        fmt: ``"safetensors"`` (weights + metadata), ``"onnx"`` (graph, opset 17, input
            ``images`` ``(batch, C, S, S)`` normalised, output ``features`` ``(batch, D)``) or
            ``"torchscript"`` (a traced module; metadata in the extra file ``selfsup.json``).
        out: the output file (default ``<run>/export/encoder[_projector]<suffix>``).
        projector: export backbone + projection head (read from the run's checkpoint).
        timm: safetensors only: timm's parameter names (:func:`timm_state_dict`) and the
            timm model's name and arguments in the metadata (``timm_model``, ``timm_kwargs``).
        tolerance: largest max-abs difference to the eager model that passes.
        log: where the verification line goes (``None``: nowhere).

    Raises:
        ConfigError: unknown format, missing package (names the extra to install), a
            backbone that cannot be traced.
        ExportError: the export differs from the eager model by more than ``tolerance``
            (the file is removed).
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    if timm and fmt != "safetensors":
        raise ConfigError("--timm writes timm's parameter names and applies to --format safetensors only")
    _require(fmt)
    kind, file = _resolve(source, projector)
    encoder = load_encoder(source, projector=projector).float().eval()
    extra: dict[str, Any] = {}
    if timm:
        if projector:
            raise ConfigError("--timm exports the backbone only (leave out --projector)")
        if encoder.embedder:
            raise ConfigError(
                f"--timm: a {encoder.embedder['method']} run's encoder is not a plain backbone (its features "
                "are not those of a timm model on the images); leave out --timm"
            )
        name, kwargs = timm_model_args(encoder.backbone_cfg, encoder.in_channels, encoder.image_size)
        extra = {"timm_model": name, "timm_kwargs": kwargs}
    meta = encoder.metadata(**extra)
    if out is None:
        run_dir = file.parent.parent if file.parent.name == "checkpoints" else file.parent
        stem = "encoder_projector" if projector else ("encoder_timm" if timm else "encoder")
        out = run_dir / "export" / f"{stem}{EXPORT_FORMATS[fmt]}"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    g = torch.Generator().manual_seed(0)
    shape = (encoder.in_channels, encoder.image_size, encoder.image_size)
    example = torch.randn(2, *shape, generator=g)
    # Other batch sizes than the traced one: the batch dimension must really be dynamic.
    random_inputs = torch.randn(3, *shape, generator=g)
    real_inputs, real_what = _real_images(encoder, file)
    with torch.no_grad():
        if fmt == "safetensors":
            exported = _write_safetensors(encoder, out, meta, timm)
        elif fmt == "onnx":
            exported = _write_onnx(encoder, out, meta, example)
        else:
            exported = _write_torchscript(encoder, out, meta, example)
        diffs = []
        for x in (random_inputs, real_inputs):
            want, got = encoder(x), exported(x)
            if not isinstance(want, Tensor) or want.ndim != 2:
                out.unlink(missing_ok=True)
                raise ConfigError(
                    f"backbone {encoder.backbone_cfg.get('name')!r} does not return (B, D) features, so it cannot "
                    "be exported"
                )
            if got.shape != want.shape:
                out.unlink(missing_ok=True)
                raise ExportError(
                    f"{fmt} export gives features {tuple(got.shape)}, the eager model "
                    f"{tuple(want.shape)}; removed {out}"
                )
            diffs.append(float((got.float() - want.float()).abs().max()) if want.numel() else 0.0)
    line = (
        f"{fmt}: {out}  max |export - eager| = {diffs[0]:.2e} on 3 random inputs, {diffs[1]:.2e} on {real_what} "
        f"(tolerance {tolerance:.0e})"
    )
    if log is not None:
        log(line)
    if max(diffs) > tolerance:
        out.unlink(missing_ok=True)
        raise ExportError(f"{line}: above the tolerance, the export was removed")
    return ExportResult(out, diffs[0], diffs[1], meta)
