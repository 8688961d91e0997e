"""Getting the encoder out: `selfsup export`, `selfsup embed` and `selfsup.load_encoder`."""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import selfsup
from selfsup.cli import main
from selfsup.config import ConfigError
from selfsup.engine import export as export_mod
from selfsup.engine.build import build_data, build_views
from selfsup.engine.checkpoint import load_checkpoint
from selfsup.engine.embed import embed
from selfsup.engine.export import Encoder, ExportError, export_encoder, load_encoder, timm_state_dict
from selfsup.engine.run import PretrainRun
from selfsup.transforms import to_float
from tests.conftest import tiny_config

BACKBONES: dict[str, dict[str, Any]] = {
    "convnet": {"name": "convnet", "width": 8},
    "resnet18": {"name": "resnet18", "stem": "cifar", "width": 0.125},
    "vit_tiny": {"name": "vit_tiny", "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2},
}
FORMATS = ("safetensors", "onnx", "torchscript")


def _tiny_run(root: Path, backbone: dict[str, Any]) -> Path:
    cfg = tiny_config(root, "simclr", "train.max_steps=1", "train.batch_size=32")
    cfg.backbone.clear()
    cfg.backbone.update(backbone)
    run = PretrainRun(cfg)
    run.fit()
    return run.run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One-step runs on digits (8x8 grayscale) for each backbone family."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("runs")
    return {name: _tiny_run(root / name, spec) for name, spec in BACKBONES.items()}


def _digits(n: int = 5) -> Tensor:
    """uint8 digits images (n, 1, 8, 8) of the test split."""
    splits = build_data(tiny_config(Path("/unused")))
    return splits.test.images[:n]  # type: ignore[attr-defined]


def _read_metadata(path: Path, fmt: str) -> dict[str, str]:
    if fmt == "safetensors":
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata())
    if fmt == "onnx":
        import onnx

        return {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    extra = {"selfsup.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra["selfsup.json"])


def test_new_runs_record_their_preprocessing(runs: dict[str, Path]) -> None:
    splits = build_data(tiny_config(Path("/unused")))
    with safe_open(str(runs["convnet"] / "backbone.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["backbone"]) == BACKBONES["convnet"]
    assert (int(meta["in_channels"]), int(meta["image_size"]), int(meta["eval_image_size"])) == (1, 8, 8)
    assert json.loads(meta["mean"]) == pytest.approx(list(splits.mean))
    assert json.loads(meta["std"]) == pytest.approx(list(splits.std))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_export_round_trips(runs: dict[str, Path], backbone: str, fmt: str, tmp_path: Path) -> None:
    out = tmp_path / f"encoder.{fmt}"
    result = export_encoder(runs[backbone], fmt, out, log=None)
    assert result.path == out and out.is_file()
    assert result.max_abs_diff_random <= 1e-5 and result.max_abs_diff_real <= 1e-5
    meta = _read_metadata(out, fmt)
    encoder = load_encoder(runs[backbone])
    assert json.loads(meta["mean"]) == pytest.approx(list(encoder.mean))
    assert json.loads(meta["std"]) == pytest.approx(list(encoder.std))
    assert (meta["image_size"], meta["in_channels"]) == ("8", "1")
    assert int(meta["num_features"]) == encoder.num_features
    # The exported model itself, on a batch size it was not traced with, equals the eager one.
    x = encoder.preprocess(_digits(5))
    with torch.no_grad():
        want = encoder(x)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    elif fmt == "torchscript":
        got = torch.jit.load(str(out))(x)
    else:
        got = load_encoder(out)(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_export_with_projector(runs: dict[str, Path], tmp_path: Path) -> None:
    result = export_encoder(runs["convnet"], "torchscript", tmp_path / "p.pt", projector=True, log=None)
    state = load_checkpoint(runs["convnet"])
    proj_dim = state["config"]["method"].get("proj_dim", 128)
    module = torch.jit.load(str(result.path))
    assert module(torch.randn(3, 1, 8, 8)).shape == (3, proj_dim)
    assert result.metadata["projector"] == "true" and result.max_abs_diff_random <= 1e-5


@pytest.mark.parametrize(
    ("method", "expected"), [("dino", "teacher_head"), ("simclr", "projector"), ("rotation", None)]
)
def test_projection_head_follows_the_evaluated_encoder(method: str, expected: str | None, tmp_path: Path) -> None:
    """DINO evaluates its teacher, so its projection head is the teacher's; a method without
    a projection head is a one-line error."""
    from selfsup.engine.build import build_components

    model = build_components(tiny_config(tmp_path, method), torch.device("cpu")).method
    if expected is None:
        with pytest.raises(ConfigError, match="no projection head"):
            export_mod.projection_head(model)
    else:
        assert export_mod.projection_head(model) is getattr(model, expected)


def test_export_default_path_and_cli(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(runs["convnet"]), "--format", "safetensors"]) == 0
    line = capsys.readouterr().out
    assert "max |export - eager|" in line and "tolerance" in line
    assert (runs["convnet"] / "export" / "encoder.safetensors").is_file()


def test_missing_onnx_names_the_extra(
    runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ConfigError, match=r"onnxruntime.*pip install 'selfsup\[export\]'"):
        export_encoder(runs["convnet"], "onnx", log=None)
    assert main(["export", str(runs["convnet"]), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "selfsup[export]" in err


class _DictBackbone(nn.Module):
    """A backbone whose output the TorchScript tracer refuses (a dict)."""

    num_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, x: Tensor) -> Any:
        return {"features": self.fc(x.flatten(1))}


class _EighBackbone(_DictBackbone):
    """A backbone with an operator ONNX has no translation for (an eigendecomposition)."""

    def forward(self, x: Tensor) -> Any:
        h = self.fc(x.flatten(1))
        return torch.linalg.eigh(h.T @ h)[0].expand(x.shape[0], -1)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_untraceable_backbone_is_one_line_error(
    runs: dict[str, Path], fmt: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = load_encoder(runs["convnet"])
    backbone = _EighBackbone() if fmt == "onnx" else _DictBackbone()
    bad = Encoder(backbone, real.preprocessing, {"name": "dict_net"})
    monkeypatch.setattr(export_mod, "load_encoder", lambda *a, **k: bad)
    with pytest.raises(ConfigError, match="cannot be traced") as info:
        export_encoder(runs["convnet"], fmt, tmp_path / "bad", log=None)
    assert "\n" not in str(info.value) and "dict_net" in str(info.value)
    assert not (tmp_path / "bad").exists()


def test_export_above_tolerance_fails_and_removes_the_file(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="above the tolerance"):
        export_encoder(runs["convnet"], "onnx", tmp_path / "e.onnx", tolerance=-1.0, log=None)
    assert not (tmp_path / "e.onnx").exists()


@pytest.mark.parametrize("backbone", ["convnet", "vit_tiny"])
def test_load_encoder_matches_the_runs_backbone(runs: dict[str, Path], backbone: str) -> None:
    state = load_checkpoint(runs[backbone])
    cfg = tiny_config(Path("/unused"))
    splits = build_data(cfg)
    from selfsup.config import from_dict
    from selfsup.engine.build import build_components

    parts = build_components(from_dict(state["config"]), torch.device("cpu"))
    parts.method.load_state_dict(state["method"])
    method = parts.method.eval()
    images = _digits(7)
    with torch.no_grad():
        want = method.embed(build_views(cfg, splits, "eval")(to_float(images))[0])
    encoder = selfsup.load_encoder(runs[backbone])
    assert not encoder.training and encoder.image_size == 8 and encoder.in_channels == 1
    assert encoder.mean == pytest.approx(splits.mean) and encoder.std == pytest.approx(splits.std)
    torch.testing.assert_close(encoder.encode(images), want, atol=1e-6, rtol=0)
    # float [0, 1] input and a single image give the same features
    torch.testing.assert_close(encoder.encode(to_float(images)), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(encoder.encode(images[0]), want[:1], atol=1e-6, rtol=0)
    # from the checkpoint instead of backbone.safetensors
    from_ckpt = load_encoder(runs[backbone] / "checkpoints" / "last.pt")
    torch.testing.assert_close(from_ckpt.encode(images), want, atol=1e-6, rtol=0)


def test_old_files_fall_back_to_the_runs_data_stats(runs: dict[str, Path], tmp_path: Path) -> None:
    run = runs["convnet"]
    with safe_open(str(run / "backbone.safetensors"), framework="pt") as handle:
        meta = dict(handle.metadata())
    old_meta = {k: meta[k] for k in ("backbone", "in_channels", "image_size")}  # what older runs wrote
    tensors = load_file(str(run / "backbone.safetensors"))
    inside = run / "old_backbone.safetensors"
    save_file(tensors, str(inside), metadata=old_meta)
    try:
        encoder = load_encoder(inside)
    finally:
        inside.unlink()
    assert encoder.mean == pytest.approx(json.loads(meta["mean"]))
    assert encoder.std == pytest.approx(json.loads(meta["std"]))
    outside = tmp_path / "old.safetensors"
    save_file(tensors, str(outside), metadata=old_meta)
    with pytest.raises(ConfigError, match=r"records no normalisation.*mean=\[\.\.\.\]"):
        load_encoder(outside)
    assert load_encoder(outside, mean=[0.5], std=[0.25]).mean == (0.5,)


def _image_folder(root: Path, n: int) -> list[Path]:
    g = torch.Generator().manual_seed(3)
    paths = []
    for i in range(n):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (8, 8), generator=g, dtype=torch.uint8).numpy()
        path = folder / f"img{i:02d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return sorted(paths)


def test_embed_folder_writes_every_row_and_resumes(runs: dict[str, Path], tmp_path: Path) -> None:
    paths = _image_folder(tmp_path / "images", 10)
    encoder = load_encoder(runs["convnet"])
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(p))).unsqueeze(0) for p in paths])
    want = encoder.encode(images).numpy()

    out = tmp_path / "out"
    result = embed(runs["convnet"], tmp_path / "images", out, batch_size=3, chunk_size=4, progress=False)
    features = np.load(out / "features.npy")
    assert features.shape == (10, encoder.num_features) and result.rows == 10
    assert (out / "paths.txt").read_text().splitlines() == [str(p) for p in paths]
    np.testing.assert_allclose(features, want, atol=1e-5)
    assert np.load(out / "labels.npy").tolist() == [0 if p.parent.name == "a" else 1 for p in paths]

    # An interrupted job left its first chunk (marked here): the re-run keeps it, computes the rest.
    resumed = tmp_path / "resumed"
    (resumed / "chunks").mkdir(parents=True)
    marker = np.full((4, encoder.num_features), 7.0, np.float32)
    np.savez(resumed / "chunks" / "000000.npz", features=marker, indices=np.arange(4), labels=np.zeros(4, np.int64))
    result = embed(runs["convnet"], tmp_path / "images", resumed, batch_size=3, chunk_size=4, progress=False)
    assert (result.resumed_chunks, result.computed_chunks) == (1, 2)
    got = np.load(resumed / "features.npy")
    assert got.shape == (10, encoder.num_features)
    np.testing.assert_array_equal(got[:4], marker)
    np.testing.assert_allclose(got[4:], want[4:], atol=1e-5)


def test_embed_skips_unreadable_images(runs: dict[str, Path], tmp_path: Path) -> None:
    paths = _image_folder(tmp_path / "images", 4)
    paths[1].write_bytes(b"not a png")
    out = tmp_path / "out"
    embed(runs["convnet"], tmp_path / "images", out, chunk_size=2, progress=False)
    assert np.load(out / "features.npy").shape[0] == 3
    assert (out / "paths.txt").read_text().splitlines() == [str(p) for i, p in enumerate(paths) if i != 1]
    assert (out / "skipped.txt").read_text().splitlines() == [str(paths[1])]


def test_embed_dataset_by_name_via_cli(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "digits"
    argv = ["embed", str(runs["vit_tiny"]), "digits", "limit=50", "-o", str(out), "--split", "test"]
    assert main([*argv, "--workers", "0", "--device", "cpu", "--chunk-size", "16"]) == 0
    features = np.load(out / "features.npy")
    splits = build_data(tiny_config(Path("/unused"), "simclr", "data.limit=50"))
    assert features.shape == (len(splits.test), 32)
    assert (out / "indices.txt").read_text().split() == [str(i) for i in range(len(splits.test))]
    assert np.load(out / "labels.npy").tolist() == splits.test.labels.tolist()  # type: ignore[union-attr]
    encoder = load_encoder(runs["vit_tiny"])
    np.testing.assert_allclose(features, encoder.encode(splits.test.images).numpy(), atol=1e-5)  # type: ignore[attr-defined]


def test_import_selfsup_stays_light() -> None:
    code = "import sys, selfsup; assert 'torch' not in sys.modules and 'load_encoder' in selfsup.__all__"
    subprocess.run([sys.executable, "-c", code], check=True)


TIMM_CASES = {
    "resnet18": {"name": "resnet18"},
    "resnet50": {"name": "resnet50", "width": 1.0},
    "vit_tiny": {"name": "vit_tiny", "patch_size": 8, "depth": 2},
    "vit_small_avg": {"name": "vit_small", "patch_size": 8, "depth": 1, "global_pool": "avg"},
}


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_loads_the_export_strictly_and_agrees(case: str) -> None:
    """timm (the `timm` extra) holds our weights with strict=True and computes the same
    features. Skipped where timm cannot be imported."""
    timm = pytest.importorskip("timm")
    from selfsup.registry import BACKBONES

    spec = dict(TIMM_CASES[case])
    name = spec.pop("name")
    ours = BACKBONES.get(name)(in_channels=3, image_size=32, **spec).eval()
    timm_name, kwargs = export_mod.timm_model_args({"name": name, **spec}, 3, 32)
    theirs = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
    theirs.load_state_dict(timm_state_dict(ours, {"name": name, **spec}), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)


def test_timm_layout_export(runs: dict[str, Path], tmp_path: Path) -> None:
    """`--timm` writes timm's names (the ViT's fixed sin-cos pos_embed becomes a tensor of
    the file) and the timm model's arguments; selfsup still loads the file."""
    result = export_encoder(runs["vit_tiny"], "safetensors", tmp_path / "t.safetensors", timm=True, log=None)
    tensors = load_file(str(result.path))
    encoder = load_encoder(runs["vit_tiny"])
    torch.testing.assert_close(tensors["pos_embed"], encoder.backbone.pos_embed)
    assert result.metadata["timm_model"] == "vit_tiny_patch16_224"
    kwargs = json.loads(result.metadata["timm_kwargs"])
    assert kwargs["patch_size"] == 4 and kwargs["embed_dim"] == 32 and kwargs["in_chans"] == 1
    assert kwargs["fc_norm"] is False and kwargs["global_pool"] == "token"
    x = encoder.preprocess(_digits(3))
    torch.testing.assert_close(load_encoder(result.path)(x), encoder(x), atol=0, rtol=0)
    with pytest.raises(ConfigError, match="no timm equivalent"):
        export_encoder(runs["convnet"], "safetensors", tmp_path / "c.safetensors", timm=True, log=None)
    with pytest.raises(ConfigError, match="timm has no resnet18 with stem='cifar'"):
        export_encoder(runs["resnet18"], "safetensors", tmp_path / "r.safetensors", timm=True, log=None)


# Methods whose `embed` is not the configured backbone: CMC's two-view encoder (here the L | ab
# split of colour scenes, two half-width ConvNets) and colorization's lightness input.
METHOD_RUNS: dict[str, tuple[str, ...]] = {
    "cmc": ("method.num_negatives=16",),
    "colorization": ("method.hidden_dim=8",),
}


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One-step runs on 16 px colour scenes."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("method_runs")
    out = {}
    for name, overrides in METHOD_RUNS.items():
        scenes = ("data.name=scenes", "data.num_train=64", "data.num_test=16", "data.image_size=16")
        cfg = tiny_config(root / name, name, *scenes, *overrides, "train.max_steps=1", "train.batch_size=32")
        run = PretrainRun(cfg)
        run.fit()
        out[name] = run.run_dir
    return out


def _method_features(run_dir: Path) -> tuple[Tensor, Tensor]:
    """``(uint8 test images (5, 3, 16, 16), the run's method.embed of their eval view)``."""
    from selfsup.config import from_dict
    from selfsup.engine.build import build_components

    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    cfg = from_dict(state["config"])
    parts = build_components(cfg, torch.device("cpu"))
    parts.method.load_state_dict(state["method"])
    images = torch.stack([parts.splits.test[i][0] for i in range(5)])
    with torch.no_grad():
        want = parts.method.eval().embed(parts.eval_views(to_float(images))[0])
    return images, want


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("method", list(METHOD_RUNS))
def test_method_encoders_load_and_export_as_the_runs_embed(
    method_runs: dict[str, Path], method: str, fmt: str, tmp_path: Path
) -> None:
    """backbone.safetensors records the method's own encoder (``method`` + ``embedder``), so
    load_encoder (file or checkpoint), every export format and a frozen teacher compute the
    run's ``method.embed``, not the configured backbone on the images."""
    from selfsup.engine.build import load_frozen_backbone

    run = method_runs[method]
    images, want = _method_features(run)
    with safe_open(str(run / "backbone.safetensors"), framework="pt") as handle:
        meta = dict(handle.metadata())
    assert meta["method"] == method and "embedder" in meta
    encoder = load_encoder(run)
    assert encoder.num_features == want.shape[1]
    torch.testing.assert_close(encoder.encode(images), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(load_encoder(run / "checkpoints" / "last.pt").encode(images), want, atol=1e-5, rtol=0)
    teacher = load_frozen_backbone({"run": str(run)}, "teacher")
    x = encoder.preprocess(images)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), want, atol=1e-5, rtol=0)

    out = tmp_path / f"encoder.{fmt}"
    result = export_encoder(run, fmt, out, log=None)
    assert result.max_abs_diff_random <= 1e-4 and result.max_abs_diff_real <= 1e-4
    assert _read_metadata(out, fmt)["method"] == method
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    elif fmt == "torchscript":
        got = torch.jit.load(str(out))(x)
    else:
        got = load_encoder(out)(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", list(METHOD_RUNS))
def test_method_encoders_never_load_as_a_plain_backbone(
    method_runs: dict[str, Path], method: str, tmp_path: Path
) -> None:
    """Without the embedder metadata the weights do not fit the configured backbone (a one-line
    error, never a silently different model), and --timm refuses the method's encoder."""
    from selfsup.engine.build import load_frozen_backbone

    file = method_runs[method] / "backbone.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        meta = {k: v for k, v in handle.metadata().items() if k not in ("method", "embedder")}
    stripped = tmp_path / "backbone.safetensors"
    save_file(load_file(str(file)), str(stripped), metadata=meta)
    with pytest.raises(ConfigError, match="do not fit"):
        load_encoder(stripped)
    with pytest.raises(ConfigError, match="do not fit"):
        load_frozen_backbone(str(stripped), "teacher")
    with pytest.raises(ConfigError, match=f"--timm: a {method} run's encoder is not a plain backbone"):
        export_encoder(method_runs[method], "safetensors", tmp_path / "t.safetensors", timm=True, log=None)
