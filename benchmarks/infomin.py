"""InfoMin's "reverse-U": the information two views share against the accuracy of the encoder
trained on them, for a grid of one view parameter (the overlap of two crops), on Fashion-MNIST.

For each shift ``d`` in ``--shifts``: two ``--crop`` px crops of every image, the second shifted
by ``d`` px from the first (horizontally or vertically, at random; both inside the image), so
the crops overlap by ``(crop - d) / crop`` of their area along one axis. A ConvNet with a
projection head is trained for ``--steps`` steps with InfoNCE on such pairs (in-batch negatives,
temperature ``--temperature``). Then, on held-out test pairs of the same shift,

* ``I_NCE = log(B) - L_NCE``: the InfoNCE lower bound on the mutual information of the two views,
  estimated with the trained critic on batches of ``B = --batch-size`` (as the paper estimates
  ``I_NCE`` with its trained encoders; at most ``log B`` nats);
* downstream top-1: kNN (k = 20, cosine, weighted votes) and, with ``--linear``, a linear probe,
  of the encoder's features of the centred ``--crop`` px crop, training set -> test set.

The paper's claim: accuracy peaks at an intermediate ``I_NCE`` (the "sweet spot"): views that
share too much (small shifts) let the encoder keep nuisance detail, views that share too little
(large shifts) lose the task-relevant information. Printed: a table (shift, overlap, I_NCE,
accuracies, training loss), also written with ``--out`` as ``infomin.md`` / ``infomin.json`` and
a plot ``infomin.png`` (accuracy against I_NCE, each point labelled with its shift), together
with the command that made them. Cost: about 2 minutes per shift on 2 cores (estimate from a
smoke run; the linear probe adds to it).

    python benchmarks/infomin.py --out docs/infomin   # the measured run: 7 shifts x 600 steps
    python benchmarks/infomin.py --steps 20 --train-limit 2000 --shifts 0 8   # a smoke run

References: Tian, Sun, Poole, Krishnan, Schmid & Isola, "What Makes for Good Views for
Contrastive Learning?", NeurIPS 2020 (arXiv:2005.10243; the experiment with patches at
increasing distance); van den Oord et al. 2018, arXiv:1807.03748 (the InfoNCE bound).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from selfsup.data.datasets import build_fashion_mnist
from selfsup.eval.knn import knn_predict
from selfsup.eval.linear import linear_probe
from selfsup.losses import info_nce
from selfsup.nn.heads import mlp_head
from selfsup.registry import BACKBONES


def shifted_crops(images: Tensor, crop: int, shift: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two ``crop`` px crops of each image ``(B, C, H, W)``, the second ``shift`` px right of or
    below the first (each sample its own direction and position); batched by indexing."""
    b, c, h, w = images.shape
    if crop + shift > min(h, w):
        raise ValueError(f"--crop {crop} + shift {shift} exceeds the {min(h, w)} px image: lower either")
    vertical = torch.rand(b, generator=generator) < 0.5
    span_y = torch.where(vertical, h - crop - shift, h - crop)
    span_x = torch.where(vertical, w - crop, w - crop - shift)
    y = (torch.rand(b, generator=generator) * (span_y + 1)).long()
    x = (torch.rand(b, generator=generator) * (span_x + 1)).long()
    steps = torch.arange(crop)
    sample = torch.arange(b)[:, None, None, None]
    channel = torch.arange(c)[None, :, None, None]

    def take(top: Tensor, left: Tensor) -> Tensor:
        rows = (top[:, None] + steps)[:, None, :, None]
        cols = (left[:, None] + steps)[:, None, None, :]
        return images[sample, channel, rows, cols]

    return take(y, x), take(y + shift * vertical, x + shift * ~vertical)


def centre_crop(images: Tensor, crop: int) -> Tensor:
    h, w = images.shape[-2:]
    top, left = (h - crop) // 2, (w - crop) // 2
    return images[..., top : top + crop, left : left + crop]


class Critic(nn.Module):
    """Encoder (evaluated) + projection head (the InfoNCE critic's embedding)."""

    def __init__(self, width: int, proj_dim: int) -> None:
        super().__init__()
        self.backbone = BACKBONES.build("convnet", in_channels=1, width=width)
        features = int(self.backbone.num_features)
        self.projector = mlp_head(features, 4 * proj_dim, proj_dim, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))


def normalise(images: Tensor, mean: float, std: float) -> Tensor:
    return (images.float() / 255 - mean) / std


@torch.no_grad()
def features(model: Critic, images: Tensor, crop: int, mean: float, std: float, batch: int = 1024) -> Tensor:
    model.eval()
    return torch.cat([model.backbone(normalise(centre_crop(x, crop), mean, std)) for x in images.split(batch)])


def run_shift(
    shift: int, data: dict[str, Tensor], args: argparse.Namespace, mean: float, std: float
) -> dict[str, float]:
    """Train on pairs at ``shift`` and measure I_NCE and the downstream accuracy."""
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = Critic(args.width, args.proj_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    pool = data["pretrain"]
    losses = []
    model.train()
    for step in range(args.steps):
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))  # cosine decay
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(pool), (args.batch_size,), generator=g)
        a, b = shifted_crops(pool[idx], args.crop, shift, g)
        flip = torch.rand(args.batch_size, generator=g) < 0.5  # the same flip for both views
        a = torch.where(flip[:, None, None, None], a.flip(-1), a)
        b = torch.where(flip[:, None, None, None], b.flip(-1), b)
        za, zb = model(normalise(torch.cat([a, b]), mean, std)).chunk(2)
        loss = 0.5 * (info_nce(za, zb, temperature=args.temperature) + info_nce(zb, za, temperature=args.temperature))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    # I_NCE on held-out pairs (test images), with the trained critic, in eval mode.
    model.eval()
    test = data["test_images"]
    estimates = []
    with torch.no_grad():
        for start in range(0, len(test) - args.batch_size + 1, args.batch_size):
            a, b = shifted_crops(test[start : start + args.batch_size], args.crop, shift, g)
            za, zb = model(normalise(torch.cat([a, b]), mean, std)).chunk(2)
            nce = 0.5 * (
                info_nce(za, zb, temperature=args.temperature) + info_nce(zb, za, temperature=args.temperature)
            )
            estimates.append(math.log(args.batch_size) - float(nce))
    train_f = features(model, data["train_images"], args.crop, mean, std)
    test_f = features(model, test, args.crop, mean, std)
    pred = knn_predict(train_f, data["train_labels"], test_f, k=20, num_classes=10)[20]
    row = {
        "shift": shift,
        "overlap": (args.crop - shift) / args.crop,
        "i_nce": sum(estimates) / len(estimates),
        "knn_top1": float((pred == data["test_labels"]).float().mean()),
        "train_loss": sum(losses[-20:]) / len(losses[-20:]),
    }
    if args.linear:
        probe = linear_probe(train_f, data["train_labels"], test_f, data["test_labels"], num_classes=10)
        assert isinstance(probe, dict)
        row["linear_top1"] = float(probe["linear_top1"])
    return row


def table(rows: list[dict[str, float]]) -> str:
    keys = [k for k in ("shift", "overlap", "i_nce", "knn_top1", "linear_top1", "train_loss") if k in rows[0]]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [
            f"{int(r[k])}" if k == "shift" else f"{100 * r[k]:.2f}" if k.endswith("top1") else f"{r[k]:.3f}"
            for k in keys
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, float]], path: Path, crop: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    x = [r["i_nce"] for r in rows]
    ax.plot(x, [100 * r["knn_top1"] for r in rows], "o-", label="kNN top-1")
    if "linear_top1" in rows[0]:
        ax.plot(x, [100 * r["linear_top1"] for r in rows], "s--", label="linear top-1")
    for r in rows:
        ax.annotate(
            f"d={int(r['shift'])}",
            (r["i_nce"], 100 * r["knn_top1"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("I_NCE between the two views (nats)")
    ax.set_ylabel("Fashion-MNIST test accuracy (%)")
    ax.set_title(f"InfoMin reverse-U: {crop} px crops shifted by d px")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--shifts", type=int, nargs="+", default=[0, 2, 4, 6, 8, 10, 12])
    parser.add_argument("--crop", type=int, default=16, help="side of both crops, px")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--proj-dim", type=int, default=64)
    parser.add_argument("--train-limit", type=int, default=10000, help="labelled images for kNN / the probe")
    parser.add_argument("--linear", action="store_true", help="also a linear probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="folder for infomin.md / .json / .png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    splits = build_fashion_mnist(args.root)
    mean, std = splits.mean[0], splits.std[0]
    train = splits.train
    assert train.labels is not None and splits.test.labels is not None
    data = {
        "pretrain": splits.pretrain.images,
        "train_images": train.images[: args.train_limit],
        "train_labels": train.labels[: args.train_limit],
        "test_images": splits.test.images,
        "test_labels": splits.test.labels,
    }
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    rows = []
    for shift in args.shifts:
        started = time.perf_counter()
        rows.append(run_shift(shift, data, args, mean, std))
        print(f"shift {shift}: {rows[-1]} ({time.perf_counter() - started:.0f} s)", flush=True)
    text = table(rows)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "infomin.md").write_text(f"{text}\n\nMade by `{command}`.\n")
        (args.out / "infomin.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
        plot(rows, args.out / "infomin.png", args.crop)


if __name__ == "__main__":
    main()
