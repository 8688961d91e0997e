"""Zero-shot classification and image-text retrieval of an image-text run (``selfsup eval
zeroshot|retrieval RUN``), written into the run's ``results.json``.

A method takes part when it has a text side: ``encode_image(images) -> (B, D)`` and
``encode_text(texts, device) -> (B, D)``, both L2-normalised in the joint space (CLIP). The
scoring is :mod:`selfsup.eval.zeroshot`'s; this module feeds it the test split:

- zero-shot: the test classes' names in the data set's prompt templates
  (:func:`selfsup.data.captions.prompt_templates`), top-1 on the whole test split and, where
  the data set holds attribute combinations out of training (``scenes`` with ``hold_out``),
  separately on the test images whose labelled object has a held-out combination and on the
  others;
- retrieval: every test image against every distinct test caption, Recall@1/5/10 both ways
  (and on the held-out images' subset where there is one).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from selfsup.config import ConfigError
from selfsup.data.captions import caption_lists, has_captions, held_out_samples, prompt_templates
from selfsup.data.loader import iterate_eval
from selfsup.engine.evaluation import eval_mode
from selfsup.engine.protocols import encoder_row_names
from selfsup.eval.zeroshot import build_prompts, image_text_recall, prompt_ensemble, zeroshot_top1
from selfsup.transforms import to_float

if TYPE_CHECKING:
    from collections.abc import Callable

    from selfsup.config import Config
    from selfsup.data.base import DataSplits, ImageDataset
    from selfsup.methods.base import Method

__all__ = [
    "check_text_method",
    "format_image_text",
    "has_text_side",
    "image_text_rows",
    "merge_results",
    "run_folder",
    "save_retrieval_examples",
    "text_retrieval_rows",
    "zeroshot_rows",
]

TEXT_BATCH = 256


def has_text_side(method: nn.Module) -> bool:
    """Whether ``method`` embeds text and images in one space (``encode_text``/``encode_image``)."""
    return callable(getattr(method, "encode_text", None)) and callable(getattr(method, "encode_image", None))


def check_text_method(method: nn.Module, protocol: str) -> None:
    """A one-line ConfigError unless ``method`` has a text side."""
    if not has_text_side(method):
        raise ConfigError(
            f"eval {protocol} needs an image-text run (method.name=clip); {type(method).__name__} has no text encoder"
        )


def _hold_out(cfg: Config) -> Any:
    return cfg.options("data").get("hold_out")


@torch.no_grad()
def _image_embeddings(
    method: Method, dataset: ImageDataset, eval_views: nn.Module, device: torch.device, batch_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(N, D)`` joint-space embeddings, ``(N,)`` labels and ``(N,)`` indices of ``dataset``
    (images that fail to decode are left out, so indices say which remain)."""
    feats, labels, indices = [], [], []
    encode_image: Callable[[Tensor], Tensor] = getattr(method, "encode_image")  # noqa: B009 (checked above)
    with eval_mode(method):
        for images, y, idx in iterate_eval(dataset, batch_size):
            x = eval_views(to_float(images.to(device)))[0]
            feats.append(encode_image(x).float().cpu())
            labels.append(y)
            indices.append(idx)
    if not feats:
        raise ConfigError("the test split has no readable images to evaluate")
    return torch.cat(feats), torch.cat(labels), torch.cat(indices)


@torch.no_grad()
def _text_embeddings(method: Method, texts: list[str], device: torch.device) -> Tensor:
    encode_text: Callable[[list[str], torch.device], Tensor] = getattr(method, "encode_text")  # noqa: B009
    with eval_mode(method):
        parts = [encode_text(texts[s : s + TEXT_BATCH], device).float().cpu() for s in range(0, len(texts), TEXT_BATCH)]
    return torch.cat(parts)


def zeroshot_rows(
    method: Method, cfg: Config, splits: DataSplits, eval_views: nn.Module, device: torch.device
) -> dict[str, dict[str, float]]:
    """``{run row: {"zeroshot_top1", "zeroshot_chance", and with held-out combinations
    "zeroshot_top1_seen", "zeroshot_top1_heldout"}}`` on the test split."""
    check_text_method(method, "zeroshot")
    if splits.num_classes < 2 or splits.test.labels is None:
        raise ConfigError(f"eval zeroshot needs a labelled test split; {splits.name!r} has no labels")
    try:
        prompts = build_prompts(splits.test.class_names or [], prompt_templates(splits.name))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    weights = prompt_ensemble(_text_embeddings(method, prompts, device), splits.num_classes)
    images, labels, indices = _image_embeddings(method, splits.test, eval_views, device, cfg.eval.batch_size)
    metrics = {"zeroshot_top1": zeroshot_top1(images, weights, labels), "zeroshot_chance": 1.0 / splits.num_classes}
    held = held_out_samples(splits.test, _hold_out(cfg))
    if held is not None:
        held = held[indices]
        metrics["zeroshot_top1_seen"] = zeroshot_top1(images[~held], weights, labels[~held])
        metrics["zeroshot_top1_heldout"] = zeroshot_top1(images[held], weights, labels[held])
        metrics["zeroshot_heldout_images"] = float(held.sum())
    return {encoder_row_names(cfg)[0]: metrics}


def _relevance(lists: list[list[str]]) -> tuple[list[str], Tensor]:
    """Distinct captions (first-seen order) and the ``(N, M)`` bool relevance of image ``i``
    to caption ``j`` (``j`` is one of image ``i``'s captions)."""
    ids: dict[str, int] = {}
    rows, cols = [], []
    for i, captions in enumerate(lists):
        for c in captions:
            rows.append(i)
            cols.append(ids.setdefault(c, len(ids)))
    relevant = torch.zeros(len(lists), len(ids), dtype=torch.bool)
    relevant[torch.tensor(rows), torch.tensor(cols)] = True
    return list(ids), relevant


def text_retrieval_rows(
    method: Method,
    cfg: Config,
    splits: DataSplits,
    eval_views: nn.Module,
    device: torch.device,
    examples: Path | None = None,
) -> dict[str, dict[str, float]]:
    """``{run row: {"i2t_recall@K", "t2i_recall@K" (K = 1, 5, 10), "retrieval_texts", and for
    held-out combinations "i2t_recall@1_heldout" (the held-out images as queries) and
    "t2i_recall@1_heldout" (their captions as queries), each against the whole gallery}}``;
    with ``examples``, a PNG there of the first test images and their top-3 captions."""
    check_text_method(method, "retrieval")
    if not has_captions(splits.test):
        raise ConfigError(f"image-text retrieval needs captions on the test split; {splits.name!r} has none")
    clock = time.perf_counter()
    images, _, indices = _image_embeddings(method, splits.test, eval_views, device, cfg.eval.batch_size)
    image_seconds = time.perf_counter() - clock
    lists = caption_lists(splits.test)
    kept = [lists[i] for i in indices.tolist()]
    texts, relevant = _relevance(kept)
    clock = time.perf_counter()
    text_emb = _text_embeddings(method, texts, device)
    text_seconds = time.perf_counter() - clock
    metrics = image_text_recall(images, text_emb, relevant)
    metrics["retrieval_texts"] = float(len(texts))
    # Inference throughput of each side (images incl. loading and the eval view; texts incl.
    # tokenisation), on this machine: the two towers' costs apart.
    metrics["images_per_s"] = len(images) / max(image_seconds, 1e-9)
    metrics["texts_per_s"] = len(texts) / max(text_seconds, 1e-9)
    held = held_out_samples(splits.test, _hold_out(cfg))
    if held is not None and bool(held[indices].any()):
        held = held[indices]
        i2t = image_text_recall(images[held], text_emb, relevant[held], ks=(1,))
        cols = relevant[held].any(0)
        t2i = image_text_recall(images, text_emb[cols], relevant[:, cols], ks=(1,))
        metrics["i2t_recall@1_heldout"] = i2t["i2t_recall@1"]
        metrics["t2i_recall@1_heldout"] = t2i["t2i_recall@1"]
    if examples is not None:
        shown = indices[:8]
        top = (images[: len(shown)] @ text_emb.T).topk(min(3, len(texts)), dim=1).indices
        rows = [
            (splits.test[i], [(texts[j], bool(relevant[n, j])) for j in top[n].tolist()])
            for n, i in enumerate(shown.tolist())
        ]
        save_retrieval_examples(rows, examples)
    return {encoder_row_names(cfg)[0]: metrics}


def save_retrieval_examples(rows: list[tuple[Any, list[tuple[str, bool]]]], path: Path) -> None:
    """A PNG of image->text retrieval: each row an image (``(C, S, S)`` uint8 first in its
    sample) and its ranked captions, green where the caption is the image's, red elsewhere."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 2, figsize=(7, 1.1 * len(rows)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 5]})  # fmt: skip
    for (sample, ranked), (left, right) in zip(rows, axes):
        image = sample[0].permute(1, 2, 0).numpy()
        left.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None)
        for n, (text, correct) in enumerate(ranked):
            right.text(0, 0.8 - 0.3 * n, f"{n + 1}. {text}", color="green" if correct else "red", fontsize=8)
        for ax in (left, right):
            ax.axis("off")
    fig.suptitle("image -> text retrieval: top captions (green = the image's own)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def image_text_rows(
    method: Method, cfg: Config, splits: DataSplits, eval_views: nn.Module, device: torch.device, run_dir: Path
) -> dict[str, dict[str, float]]:
    """What a pretraining run of an image-text method adds to its results at the end: the
    zero-shot metrics (labelled test split) and the retrieval metrics (captioned test split,
    with ``retrieval_examples.png`` in ``run_dir``)."""
    rows: dict[str, dict[str, float]] = {}
    parts = []
    if splits.num_classes >= 2 and splits.test.labels is not None:
        parts.append(zeroshot_rows(method, cfg, splits, eval_views, device))
    if has_captions(splits.test):
        parts.append(text_retrieval_rows(method, cfg, splits, eval_views, device, run_dir / "retrieval_examples.png"))
    for part in parts:
        for name, metrics in part.items():
            rows.setdefault(name, {}).update(metrics)
    return rows


def run_folder(run: str | Path) -> Path:
    """The run folder of ``run`` (a run folder or a checkpoint file inside it)."""
    path = Path(run)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def merge_results(run: str | Path, rows: dict[str, dict[str, float]]) -> Path:
    """Adds ``rows``' metrics to the run's ``results.json`` (rows and metrics not named are
    kept; the run's own row stays first), so ``selfsup report`` tables them."""
    path = run_folder(run) / "results.json"
    results: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else {}
    for name, metrics in rows.items():
        results.setdefault(name, {}).update(metrics)
    path.write_text(json.dumps(results, indent=2))
    return path


def format_image_text(rows: dict[str, dict[str, float]], title: str = "") -> str:
    """A plain-text table of the rows' metrics: accuracies and recalls in percent, counts and
    throughputs as integers (``retrieval_texts``, ``zeroshot_heldout_images``, ``*_per_s``)."""
    columns: list[str] = []
    for metrics in rows.values():
        columns += [k for k in metrics if k not in columns]
    name_width = max([len("encoder")] + [len(r) for r in rows])
    widths = [max(len(c), 6) for c in columns]

    def cell(key: str, metrics: dict[str, float]) -> str:
        if key not in metrics:
            return "-"
        value = metrics[key]
        return f"{value:.0f}" if key.endswith(("_texts", "_images", "_per_s")) else f"{100 * value:.2f}"

    header = "encoder".ljust(name_width) + "  " + "  ".join(c.rjust(w) for c, w in zip(columns, widths))
    lines = ([title] if title else []) + [header, "-" * len(header)]
    for name, metrics in rows.items():
        cells = "  ".join(cell(c, metrics).rjust(w) for c, w in zip(columns, widths))
        lines.append(name.ljust(name_width) + "  " + cells)
    return "\n".join(lines)
