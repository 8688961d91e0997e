"""Visualise a trained run: the class token's self-attention maps of a ViT (DINO's Figure 1),
or a masked autoencoder's reconstructions (MAE's Figure 2).

    selfsup visualize attention runs/dino-digits-... --images 0 1 2 3
    selfsup visualize attention runs/dino-digits-.../checkpoints/last.pt --images photos/ --out maps/
    selfsup visualize reconstruction runs/mae-digits-... --images 0 1 2 3

``attention`` writes one PNG per image: the image, then the last block's attention of the
class token to every patch, one panel per head, upsampled to the image size.
``reconstruction`` writes one PNG grid: input, masked input and reconstruction per image.
``colorization`` writes one PNG grid: grayscale input, predicted colours, ground truth.
``embeddings`` writes a t-SNE (or UMAP) scatter of test features coloured by label;
``knn-curve`` the online kNN accuracy over training from the run's ``metrics.jsonl``.

References: Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"
(DINO), arXiv:2104.14294, Section 4.2.1 and the reference ``visualize_attention.py``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# torch and the engine are imported inside the functions: `selfsup --help` and the
# argument parsing below stay instant (the CLI imports this module to build its parser).
if TYPE_CHECKING:
    from torch import Tensor, nn

    from selfsup.data.base import DataSplits
    from selfsup.methods.base import Method

__all__ = [
    "attention_maps",
    "cls_attention_maps",
    "colorization_grid",
    "configure_parser",
    "embedding_plot",
    "knn_curve",
    "main",
    "reconstruction_grid",
]


def cls_attention_maps(attention: Tensor, grid: tuple[int, int], patch_size: int) -> Tensor:
    """Turn last-block attention ``(B, heads, 1 + L, 1 + L)`` into per-head maps ``(B, heads,
    grid_h * p, grid_w * p)``: row 0 (the class token) over the ``L`` patch tokens, laid out
    on the row-major patch grid and upsampled by nearest neighbour, so every pixel of a patch
    shows that patch's weight (as the reference ``visualize_attention.py`` does)."""
    import torch.nn.functional as F

    b, heads, n, _ = attention.shape
    gh, gw = grid
    if n != 1 + gh * gw:
        raise ValueError(f"attention over {n} tokens does not fit a {gh}x{gw} patch grid plus the class token")
    maps = attention[:, :, 0, 1:].reshape(b, heads, gh, gw)
    return F.interpolate(maps, scale_factor=patch_size, mode="nearest")


def _attention_backbone(method: Method, use_teacher: bool) -> nn.Module:
    """The backbone to visualise: the method's, or its EMA teacher where it declares one
    (DINO's maps come from the teacher)."""
    backbone = method.backbone
    if use_teacher:
        for student, teacher in method.ema_pairs():
            if student is backbone:
                return teacher
    return backbone


def _load_images(
    source: str | Path | Sequence[int], splits: DataSplits, image_size: int, in_channels: int, split: str
) -> tuple[Tensor, list[str]]:
    """``(N, C, S, S)`` uint8 images and a name for each, from a folder / file or indices."""
    import torch

    from selfsup.data.base import ImageDataset
    from selfsup.data.datasets import IMAGE_EXTENSIONS, ImageFolderDataset

    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"no image file or folder at {str(path)!r}")
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(path)!r}")
        dataset = ImageFolderDataset(
            [str(f) for f in files], None, image_size, "L" if in_channels == 1 else "RGB", on_error="raise"
        )
        return torch.stack([dataset.load(i) for i in range(len(dataset))]), [f.stem for f in files]
    data: ImageDataset = getattr(splits, split)
    indices = [int(i) for i in source]
    if not indices:
        raise ValueError("give at least one dataset index")
    out_of_range = [i for i in indices if not 0 <= i < len(data)]
    if out_of_range:
        raise ValueError(
            f"--images {' '.join(map(str, out_of_range))}: the {split} split has {len(data)} images "
            f"(indices 0 to {len(data) - 1})"
        )
    images = []
    for i in indices:
        sample = data[i]
        if sample is None:  # a dataset that skips undecodable files returns None for them
            raise ValueError(f"{split} sample {i} could not be decoded")
        images.append(sample[0])
    return torch.stack(images), [f"{split}_{i}" for i in indices]


def attention_maps(
    run_dir_or_ckpt: str | Path,
    images_path_or_dataset_indices: str | Path | Sequence[int],
    out_dir: str | Path,
    *,
    split: str = "test",
    image_size: int | None = None,
    use_teacher: bool = True,
    device: str = "cpu",
) -> list[Path]:
    """Write one PNG per image with the class token's last-block attention of every head.

    Args:
        run_dir_or_ckpt: a run folder or a checkpoint file written by ``selfsup pretrain``;
            its backbone must be a ViT (anything with ``get_last_self_attention`` and
            ``patch_size``).
        images_path_or_dataset_indices: an image file, a folder of image files (searched
            recursively), or indices into the run's dataset split ``split``.
        out_dir: folder for the PNGs (created).
        split: ``"test"``, ``"train"`` or ``"pretrain"``, for dataset indices.
        image_size: side to view the images at (a multiple of the patch size; the ViT
            interpolates its position embeddings); default the run's training size.
        use_teacher: use the EMA teacher's backbone when the method has one (DINO's maps
            come from the teacher).
        device: where to run the backbone.

    Returns:
        The written PNG paths, in input order.

    Raises:
        TypeError: the run's backbone is not a ViT.
    """
    import matplotlib
    import torch

    from selfsup.config import from_dict
    from selfsup.engine.build import build_data, build_method
    from selfsup.engine.checkpoint import load_checkpoint
    from selfsup.nn.backbones.protocol import as_token_backbone
    from selfsup.registry import VIEW_RECIPES

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state = load_checkpoint(run_dir_or_ckpt)
    cfg = from_dict(state["config"])
    splits = build_data(cfg)
    method = build_method(cfg, splits)
    backbone = _attention_backbone(method, use_teacher)
    if not hasattr(backbone, "get_last_self_attention"):
        raise TypeError(
            f"attention maps need a ViT backbone (vit_tiny, vit_small, vit_base); this run's "
            f"backbone is {cfg.backbone['name']!r} ({type(backbone).__name__})"
        )
    method.load_state_dict(state["method"])
    vit = as_token_backbone(backbone.to(device).eval())
    patch = int(vit.patch_size)
    size = image_size or splits.image_size
    if size % patch:
        raise ValueError(f"image_size {size} is not a multiple of the patch size {patch}")

    images, names = _load_images(images_path_or_dataset_indices, splits, size, splits.in_channels, split)
    # The evaluation recipe at `size`: resize (a no-op for files decoded at that size) and
    # normalise with the training statistics.
    views = VIEW_RECIPES.build(
        "eval", image_size=size, in_channels=splits.in_channels, mean=splits.mean, std=splits.std
    )
    x = views(images)[0]
    with torch.no_grad():
        attention = vit.get_last_self_attention(x.to(device)).float().cpu()
    maps = cls_attention_maps(attention, (size // patch, size // patch), patch)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shown = images.float().div(255.0).permute(0, 2, 3, 1)
    paths: list[Path] = []
    heads = maps.shape[1]
    for i, name in enumerate(names):
        fig, axes = plt.subplots(1, heads + 1, figsize=(2.2 * (heads + 1), 2.4), squeeze=False)
        img = shown[i].squeeze(-1) if shown.shape[-1] == 1 else shown[i]
        axes[0, 0].imshow(img.numpy(), cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0)
        axes[0, 0].set_title(name, fontsize=8)
        for h in range(heads):
            axes[0, h + 1].imshow(maps[i, h].numpy(), cmap="inferno")
            axes[0, h + 1].set_title(f"head {h}", fontsize=8)
        for ax in axes[0]:
            ax.axis("off")
        fig.tight_layout()
        path = out / f"attention_{i:03d}_{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _method_and_inputs(
    run_dir_or_ckpt: str | Path,
    source: str | Path | Sequence[int],
    split: str,
    device: str,
    needs: str,
    hint: str,
) -> tuple[Method, DataSplits, Tensor, list[str]]:
    """A run's method with its trained weights (eval mode, on ``device``), its data, and the
    chosen images through the eval view ``(N, C, S, S)`` with their names; a ``TypeError``
    naming ``hint`` when the method has no ``needs`` method (e.g. ``reconstruct``)."""
    from selfsup.config import from_dict
    from selfsup.engine.build import build_data, build_method
    from selfsup.engine.checkpoint import load_checkpoint
    from selfsup.registry import VIEW_RECIPES

    state = load_checkpoint(run_dir_or_ckpt)
    cfg = from_dict(state["config"])
    splits = build_data(cfg)
    method = build_method(cfg, splits)
    if not callable(getattr(method, needs, None)):
        raise TypeError(f"method {cfg.method['name']!r} ({type(method).__name__}) has no {needs}(); {hint}")
    method.load_state_dict(state["method"])
    method = method.to(device).eval()
    size = splits.image_size
    images, names = _load_images(source, splits, size, splits.in_channels, split)
    views = VIEW_RECIPES.build(
        "eval", image_size=size, in_channels=splits.in_channels, mean=splits.mean, std=splits.std
    )
    return method, splits, views(images)[0].to(device), names


def _image_grid_figure(names: list[str], columns: Sequence[tuple[str, Tensor]], out_path: str | Path) -> Path:
    """Writes a PNG with one row per image and one column per ``(title, (B, H, W, C) in [0, 1])``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(names), len(columns), figsize=(2.2 * len(columns), 2.2 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        for j, (title, batch) in enumerate(columns):
            img = batch[i].float().cpu()
            gray = img.shape[-1] == 1
            pixels = img.squeeze(-1).numpy() if gray else img.numpy()
            axes[i, j].imshow(pixels, cmap="gray" if gray else None, vmin=0.0, vmax=1.0)
            axes[i, j].set_title(f"{name}: {title}" if j == 0 else title, fontsize=8)
            axes[i, j].axis("off")
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def reconstruction_grid(
    run_dir_or_ckpt: str | Path,
    images_path_or_dataset_indices: str | Path | Sequence[int],
    out_path: str | Path,
    *,
    split: str = "test",
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """Write one PNG grid of masked-image-modelling reconstructions (MAE's Figure 2).

    One row per image, three columns: the input, the masked input (hidden patches black),
    and the reconstruction (prediction on masked patches, input on visible ones). Needs a
    method with ``reconstruct(images) -> (masked_input, reconstruction)`` (MAE); one that
    returns two other images names them in ``reconstruction_titles`` (``vq_tokenizer``: the
    decoder on the continuous encodings and on their tokens; BEiT: the tokens it predicts,
    decoded by its pixel tokenizer).

    Args:
        run_dir_or_ckpt: a run folder or a checkpoint file written by ``selfsup pretrain``.
        images_path_or_dataset_indices: an image file, a folder of images, or indices into
            the run's dataset split ``split``.
        out_path: the PNG file to write (parent folders are created).
        split: ``"test"``, ``"train"`` or ``"pretrain"``, for dataset indices.
        seed: seeds the random masks, so a figure can be redrawn identically.
        device: where to run the model.

    Returns:
        ``out_path`` as a Path.

    Raises:
        TypeError: the run's method cannot reconstruct images.

    References: He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners",
    arXiv:2111.06377, Figure 2.
    """
    import torch

    method, splits, x, names = _method_and_inputs(
        run_dir_or_ckpt,
        images_path_or_dataset_indices,
        split,
        device,
        "reconstruct",
        "reconstructions need a masked autoencoder such as mae, or a tokenizer (vq_tokenizer)",
    )
    torch.manual_seed(seed)  # masks draw from the global generator
    masked, recon = method.reconstruct(x)  # type: ignore[operator]
    channels = splits.in_channels
    mean = torch.tensor(list(splits.mean) * (channels // len(splits.mean))).view(1, -1, 1, 1)
    std = torch.tensor(list(splits.std) * (channels // len(splits.std))).view(1, -1, 1, 1)

    def shown(t: Tensor) -> Tensor:
        """Undo the normalisation and lay out ``(B, H, W, C)`` in [0, 1] for imshow."""
        return (t.detach().float().cpu() * std + mean).clamp(0.0, 1.0).permute(0, 2, 3, 1)

    # A method may name its two images (a tokenizer shows its decoded encodings and tokens).
    titles = getattr(method, "reconstruction_titles", ("masked", "reconstruction"))
    columns = [("input", shown(x)), (titles[0], shown(masked)), (titles[1], shown(recon))]
    return _image_grid_figure(names, columns, out_path)


def colorization_grid(
    run_dir_or_ckpt: str | Path,
    images_path_or_dataset_indices: str | Path | Sequence[int],
    out_path: str | Path,
    *,
    split: str = "test",
    temperature: float | None = None,
    device: str = "cpu",
) -> Path:
    """Write one PNG grid of a colorization run's predictions (Colorful Image Colorization, Fig. 1).

    One row per image, three columns: the grayscale input (its lightness), the predicted colours
    (annealed mean of the predicted ab distribution on that lightness) and the ground truth.
    Needs a method with ``colorize(images) -> (grayscale, predicted, truth)`` (colorization).

    Args:
        run_dir_or_ckpt: a run folder or a checkpoint file written by ``selfsup pretrain``.
        images_path_or_dataset_indices: an image file, a folder of images, or indices into
            the run's dataset split ``split``.
        out_path: the PNG file to write (parent folders are created).
        split: ``"test"``, ``"train"`` or ``"pretrain"``, for dataset indices.
        temperature: annealed-mean temperature (default: the method's, the paper's 0.38).
        device: where to run the model.

    Returns:
        ``out_path`` as a Path.

    Raises:
        TypeError: the run's method cannot colorize images.

    References: Zhang, Isola & Efros 2016, "Colorful Image Colorization", arXiv:1603.08511.
    """
    method, _, x, names = _method_and_inputs(
        run_dir_or_ckpt,
        images_path_or_dataset_indices,
        split,
        device,
        "colorize",
        "colour predictions need a colorization run",
    )
    shown = method.colorize(x, temperature)  # type: ignore[operator]
    titles = ("grayscale input", f"predicted (T={temperature or getattr(method, 'temperature', '')})", "ground truth")
    columns = [(title, batch.permute(0, 2, 3, 1)) for title, batch in zip(titles, shown)]
    return _image_grid_figure(names, columns, out_path)


def _run_folder(run_dir_or_ckpt: str | Path) -> Path:
    """The run folder of a run folder or of a checkpoint file in its ``checkpoints/``."""
    run = Path(run_dir_or_ckpt)
    return run if run.is_dir() else run.parent.parent


def embedding_plot(
    run_dir_or_ckpt: str | Path,
    out_path: str | Path,
    *,
    method: str = "tsne",
    samples: int = 2000,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """Write a PNG of the run's test features embedded in 2-D, coloured by label.

    A seeded random ``samples`` of the test split is encoded by the run's encoder (eval mode,
    un-augmented eval view) and embedded by t-SNE (scikit-learn; perplexity 30, PCA
    initialisation) or UMAP (``umap-learn``, the ``umap`` extra).

    Args:
        run_dir_or_ckpt: a run folder or a checkpoint file written by ``selfsup pretrain``.
        out_path: the PNG file to write (parent folders are created).
        method: ``"tsne"`` or ``"umap"``.
        samples: test images to embed (all of them when the split is smaller).
        seed: seeds the sample and the embedding.
        device: where to run the encoder.

    Returns:
        ``out_path`` as a Path.

    References: van der Maaten & Hinton, "Visualizing Data using t-SNE", JMLR 2008;
    McInnes, Healy & Melville, "UMAP", arXiv:1802.03426.
    """
    import matplotlib
    import numpy as np
    import torch

    from selfsup.config import ConfigError, from_dict
    from selfsup.engine.build import build_data, build_method
    from selfsup.engine.checkpoint import load_checkpoint
    from selfsup.engine.evaluation import encode, eval_mode
    from selfsup.registry import VIEW_RECIPES

    if method not in ("tsne", "umap"):
        raise ValueError(f"--method {method!r} is not tsne or umap")
    if samples < 2:
        raise ValueError(f"--samples {samples} is too few (at least 2)")
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise ConfigError(
                "--method umap needs umap-learn: pip install 'selfsup[umap]' (or use --method tsne)"
            ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state = load_checkpoint(run_dir_or_ckpt)
    cfg = from_dict(state["config"])
    splits = build_data(cfg)
    if splits.num_classes < 2:
        raise ValueError(f"dataset {splits.name!r} has no labels to colour the embedding by")
    model = build_method(cfg, splits)
    model.load_state_dict(state["method"])
    model = model.to(device)
    views = VIEW_RECIPES.build(
        "eval", image_size=splits.image_size, in_channels=splits.in_channels, mean=splits.mean, std=splits.std
    )
    test = splits.test
    if samples < len(test):
        chosen = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:samples]
        test = test.subset(torch.sort(chosen).values)
    with eval_mode(model):
        features, labels = encode(model.embed, test, views.to(device), torch.device(device), cfg.eval.batch_size)
    x = features.double().numpy()
    if method == "umap":
        points = umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    else:
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (x.shape[0] - 1) / 3)  # t-SNE needs perplexity < samples
        points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    names = splits.test.class_names or [str(c) for c in range(splits.num_classes)]
    y = labels.numpy()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    cmap = plt.get_cmap("tab10" if splits.num_classes <= 10 else "tab20")
    for c in np.unique(y):
        hit = y == c
        label = names[c] if c < len(names) else str(c)
        ax.scatter(points[hit, 0], points[hit, 1], s=4, color=cmap(int(c) % cmap.N), label=label)
    ax.legend(markerscale=3, fontsize=7, loc="best", frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    shown = "t-SNE" if method == "tsne" else "UMAP"
    ax.set_title(f"{_run_folder(run_dir_or_ckpt).name}: {shown} of {len(y)} test images")
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def knn_curve(run_dir: str | Path, out_path: str | Path) -> Path:
    """Write a PNG of the online kNN top-1 over training, from the run's ``metrics.jsonl``.

    The engine logs ``knn_top1`` (k = 20, on ``train.knn_samples`` images) every
    ``train.knn_every`` epochs; the x axis is in epochs (from the logged step-to-epoch ratio)
    and the final full-test-set kNN@20 of ``results.json`` is marked when present.

    Args:
        run_dir: a run folder (or a checkpoint file in its ``checkpoints/``).
        out_path: the PNG file to write (parent folders are created).

    Returns:
        ``out_path`` as a Path.

    Raises:
        ValueError: the run logged no kNN accuracy.
    """
    import json

    import matplotlib

    from selfsup.engine.logging import read_metrics

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = _run_folder(run_dir)
    if not (run / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {str(run)!r} (not a run folder)")
    records = read_metrics(run)
    knn = [(r["step"], 100 * r["knn_top1"]) for r in records if "knn_top1" in r]
    if not knn:
        raise ValueError(f"{str(run)!r} logged no online kNN accuracy (it ran with train.knn_every=0)")
    ratios = [r["step"] / r["epoch"] for r in records if r.get("epoch") and "step" in r]
    per_epoch = ratios[-1] if ratios else None
    x = [s / per_epoch if per_epoch else s for s, _ in knn]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [a for _, a in knn], "o-", color="tab:orange", label="online kNN@20 (train.knn_samples)")
    results = run / "results.json"
    if results.is_file():
        first: dict[str, float] = next(iter(json.loads(results.read_text()).values()), {})
        if "knn_top1@20" in first:
            end = max(r["step"] for r in records if "step" in r)  # the run's last step
            ax.plot(
                [end / per_epoch if per_epoch else end],
                [100 * first["knn_top1@20"]],
                "*",
                ms=12,
                color="tab:red",
                label="final kNN@20 (whole test set)",
            )
    ax.set_xlabel("epoch" if per_epoch else "step")
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title(run.name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``attention`` and ``reconstruction`` sub-commands to ``parser`` (``selfsup visualize``); the parsed
    arguments carry ``func`` returning the exit status."""
    sub = parser.add_subparsers(dest="visualization", required=True)
    p = sub.add_parser("attention", help="class-token attention maps of a ViT run (DINO)")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument(
        "--images", nargs="+", required=True, help="an image file, a folder of images, or dataset indices (e.g. 0 1 2)"
    )
    p.add_argument("--out", default=None, help="output folder (default: RUN/attention)")
    p.add_argument(
        "--split", default="test", choices=["test", "train", "pretrain"], help="dataset split the indices refer to"
    )
    p.add_argument("--image-size", type=int, default=None, help="view the images at this side")
    p.add_argument("--student", action="store_true", help="use the student even if there is an EMA teacher")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_attention)

    p = sub.add_parser("reconstruction", help="masked-autoencoder reconstructions of a run (MAE)")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument(
        "--images",
        nargs="+",
        default=["0", "1", "2", "3"],
        help="an image file, a folder of images, or dataset indices (default 0 1 2 3)",
    )
    p.add_argument("--out", default=None, help="output PNG (default: RUN/reconstruction.png)")
    p.add_argument(
        "--split", default="test", choices=["test", "train", "pretrain"], help="dataset split the indices refer to"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_reconstruction)

    p = sub.add_parser("colorization", help="grayscale input, predicted and true colours of a colorization run")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument(
        "--images",
        nargs="+",
        default=["0", "1", "2", "3", "4", "5"],
        help="an image file, a folder of images, or dataset indices (default 0 to 5)",
    )
    p.add_argument("--out", default=None, help="output PNG (default: RUN/colorization.png)")
    p.add_argument(
        "--split", default="test", choices=["test", "train", "pretrain"], help="dataset split the indices refer to"
    )
    p.add_argument("--temperature", type=float, default=None, help="annealed-mean temperature (default 0.38)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_colorization)

    p = sub.add_parser("embeddings", help="t-SNE (or UMAP) of a run's test features coloured by label")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--out", default=None, help="output PNG (default: RUN/embeddings_<method>.png)")
    p.add_argument("--method", default="tsne", choices=["tsne", "umap"], help="umap needs the umap extra")
    p.add_argument("--samples", type=int, default=2000, help="test images to embed (seeded random sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_embeddings)

    p = sub.add_parser("knn-curve", help="online kNN accuracy over training, from the run's metrics.jsonl")
    p.add_argument("run", help="run folder")
    p.add_argument("--out", default=None, help="output PNG (default: RUN/knn_curve.png)")
    p.set_defaults(func=_cmd_knn_curve)


def _image_source(items: list[str]) -> str | list[int]:
    """``--images``: dataset indices, or one file or folder."""
    if all(item.lstrip("-").isdigit() for item in items):
        return [int(item) for item in items]
    if len(items) == 1:
        return items[0]
    raise SystemExit("--images takes one file or folder, or dataset indices")


def _cmd_embeddings(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else _run_folder(args.run) / f"embeddings_{args.method}.png"
    print(embedding_plot(args.run, out, method=args.method, samples=args.samples, seed=args.seed, device=args.device))
    return 0


def _cmd_knn_curve(args: argparse.Namespace) -> int:
    print(knn_curve(args.run, Path(args.out) if args.out else _run_folder(args.run) / "knn_curve.png"))
    return 0


def _cmd_reconstruction(args: argparse.Namespace) -> int:
    run = Path(args.run)
    out = Path(args.out) if args.out else (run if run.is_dir() else run.parent.parent) / "reconstruction.png"
    print(
        reconstruction_grid(run, _image_source(args.images), out, split=args.split, seed=args.seed, device=args.device)
    )
    return 0


def _cmd_colorization(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else _run_folder(args.run) / "colorization.png"
    source = _image_source(args.images)
    print(colorization_grid(args.run, source, out, split=args.split, temperature=args.temperature, device=args.device))
    return 0


def _cmd_attention(args: argparse.Namespace) -> int:
    source = _image_source(args.images)
    run = Path(args.run)
    out = Path(args.out) if args.out else (run if run.is_dir() else run.parent.parent) / "attention"
    paths = attention_maps(
        run, source, out, split=args.split, image_size=args.image_size, use_teacher=not args.student, device=args.device
    )
    for path in paths:
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m selfsup.visualize attention|reconstruction RUN --images ...``."""
    parser = argparse.ArgumentParser(
        prog="selfsup visualize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    configure_parser(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
