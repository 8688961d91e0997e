"""DINOv2-style data curation on a real, polluted pool: duplicate removal and retrieval.

Embeddings are centred by the pool's mean embedding before cosines (``curate_features``'s
default). The pool is a class-imbalanced subset of Fashion-MNIST's training set (class ``c`` kept in
proportion ``imbalance ** (c / 9)``), polluted with

* injected copies of some pool images: exact copies, copies with Gaussian pixel noise
  (std 8/255), copies shifted by one pixel, and horizontally flipped copies, each placed after
  its original (so the original is the one a deterministic deduplication keeps);
* out-of-distribution images: scikit-learn's 8x8 digits, upscaled (bilinear) to 28 px.

The seed set is a class-balanced draw of Fashion-MNIST *test* images (``--seeds-per-class``).
The pipeline of :mod:`selfsup.engine.curate` (k-NN duplicate groups above a cosine threshold,
then ``k`` pool neighbours per seed) runs on each encoder's embeddings:

* ``raw``: raw pixels (no training at all);
* ``random``: a random-init ConvNet (width 32), seeded;
* any run folder or encoder file (``--runs runs/simclr-...``): a trained encoder.

Printed per encoder: precision / recall of the duplicate removal for several thresholds
(a removed image counts as correct when it is an injected copy; Fashion-MNIST's own natural
near-duplicates therefore count against precision), recall per kind of copy, and for the
retrieved set: its size, its class balance against the pool's (normalised entropy, the
largest / smallest class ratio), the fraction of digits (OOD) retrieved against their share of
the pool, and how often a retrieved image has the class of the seed that found it best.

    python benchmarks/curation.py                                # raw pixels + random init
    python benchmarks/curation.py --runs runs/simclr-fashion-mnist-... --pool-size 20000
    python benchmarks/curation.py --backend faiss                # faiss (selfsup[curate])

References: Oquab et al. 2023, "DINOv2", arXiv:2304.07193 (sec. 3, appendix A).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.data.datasets import build_digits, build_fashion_mnist
from selfsup.engine.curate import curate_features
from selfsup.eval.neighbors import faiss_available

KINDS = ("exact", "noise", "shift", "flip")
OOD_LABEL = -1


def _pool(args: argparse.Namespace, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(images (N, 1, 28, 28) uint8, labels (N,) with -1 = OOD, source (N,) = index of the
    original for a copy else -1, kind (N,) = index into KINDS for a copy else -1)``."""
    fm = build_fashion_mnist(args.root)
    images, labels = fm.train.images, fm.train.labels
    assert labels is not None
    keep = torch.tensor([args.imbalance ** (c / 9) for c in range(10)])
    per_class = (keep / keep.sum() * args.pool_size).round().long()
    chosen = []
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        chosen.append(idx[torch.randperm(idx.numel(), generator=g)[: int(per_class[c])]])
    pick = torch.cat(chosen)
    pick = pick[torch.randperm(pick.numel(), generator=g)]
    base, base_labels = images[pick], labels[pick]
    n = base.shape[0]

    originals = torch.randperm(n, generator=g)[: args.copies]
    kinds = torch.arange(args.copies) % len(KINDS)
    copies = base[originals].clone()
    x = copies.float()
    noise = kinds == KINDS.index("noise")
    x[noise] = (x[noise] + 8.0 * torch.randn(x[noise].shape, generator=g)).clamp(0, 255).round()
    shift = kinds == KINDS.index("shift")
    x[shift] = torch.roll(x[shift], shifts=1, dims=3)
    flip = kinds == KINDS.index("flip")
    x[flip] = torch.flip(x[flip], dims=[3])
    copies = x.to(torch.uint8)

    digits = build_digits().train.images[: args.ood]
    ood = F.interpolate(digits.float(), size=28, mode="bilinear", align_corners=False).round().clamp(0, 255)

    all_images = torch.cat([base, copies, ood.to(torch.uint8)])
    all_labels = torch.cat([base_labels, base_labels[originals], torch.full((ood.shape[0],), OOD_LABEL)])
    source = torch.cat([torch.full((n,), -1), originals, torch.full((ood.shape[0],), -1)])
    kind = torch.cat([torch.full((n,), -1), kinds, torch.full((ood.shape[0],), -1)])
    return all_images, all_labels, source, kind


def _seeds(args: argparse.Namespace, g: torch.Generator) -> tuple[Tensor, Tensor]:
    fm = build_fashion_mnist(args.root)
    images, labels = fm.test.images, fm.test.labels
    assert labels is not None
    idx = torch.cat(
        [
            torch.nonzero(labels == c).flatten()[torch.randperm(1000, generator=g)[: args.seeds_per_class]]
            for c in range(10)
        ]
    )
    return images[idx], labels[idx]


def _encoders(args: argparse.Namespace) -> dict[str, Callable[[Tensor], Tensor]]:
    encoders: dict[str, Callable[[Tensor], Tensor]] = {}
    if "raw" in args.encoders:
        encoders["raw pixels"] = lambda x: (x.float() / 255.0).flatten(1)
    if "random" in args.encoders:
        from selfsup.nn.backbones.convnet import ConvNet

        torch.manual_seed(args.seed)
        net = ConvNet(in_channels=1, width=32).eval()
        encoders["random-init convnet"] = lambda x: net((x.float() / 255.0 - 0.286) / 0.353)
    for run in args.runs:
        from selfsup.engine.export import load_encoder

        encoder = load_encoder(run)
        encoders[f"trained: {Path(run).name}"] = encoder.encode
    return encoders


@torch.no_grad()
def _embed(fn: Callable[[Tensor], Tensor], images: Tensor, batch: int = 1024) -> Tensor:
    return torch.cat([fn(images[i : i + batch]).float() for i in range(0, images.shape[0], batch)])


def _balance(labels: Tensor) -> tuple[float, float]:
    """(normalised entropy of the class histogram, largest / smallest class count)."""
    counts = torch.bincount(labels[labels >= 0], minlength=10).double()
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(10))
    ratio = float(counts.max() / counts.min()) if counts.min() > 0 else math.inf
    return entropy, ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--pool-size", type=int, default=10000, help="Fashion-MNIST images in the pool")
    parser.add_argument("--imbalance", type=float, default=0.1, help="smallest / largest class share of the pool")
    parser.add_argument("--copies", type=int, default=800, help="injected copies (exact, noise, shift, flip)")
    parser.add_argument("--ood", type=int, default=1000, help="digits images added to the pool")
    parser.add_argument("--seeds-per-class", type=int, default=50)
    parser.add_argument("--k", type=int, default=4, help="pool images retrieved per seed (DINOv2: 4)")
    parser.add_argument("--dedup-k", type=int, default=64, help="neighbours searched for duplicates (DINOv2: 64)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.95, 0.98, 0.99])
    parser.add_argument("--encoders", nargs="*", default=["raw", "random"], choices=["raw", "random"])
    parser.add_argument("--runs", nargs="*", default=[], help="trained run folders or encoder files")
    parser.add_argument("--backend", default="auto", choices=["auto", "faiss", "torch"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(args.seed)
    images, labels, source, kind = _pool(args, g)
    seed_images, seed_labels = _seeds(args, g)
    injected = source >= 0
    backend = ("faiss" if faiss_available() else "torch") if args.backend == "auto" else args.backend
    n_ood = int((labels == OOD_LABEL).sum())
    print(
        f"pool: {images.shape[0]} images = {int((~injected).sum()) - n_ood} Fashion-MNIST (imbalance "
        f"{args.imbalance}) + {int(injected.sum())} injected copies + {n_ood} digits (OOD); "
        f"seeds: {seed_images.shape[0]} class-balanced test images; k-NN backend: {backend}"
    )
    pool_entropy, pool_ratio = _balance(labels[~injected])
    print(
        f"pool class balance: entropy {pool_entropy:.3f}, largest/smallest {pool_ratio:.1f}; "
        f"OOD share {n_ood / len(labels):.1%}"
    )
    report: dict[str, dict[str, object]] = {}
    for name, fn in _encoders(args).items():
        start = time.perf_counter()
        feats, seed_feats = _embed(fn, images), _embed(fn, seed_images)
        print(f"\n== {name} (D={feats.shape[1]}, embedded in {time.perf_counter() - start:.1f} s)")
        print("threshold  removed  precision  recall  " + "  ".join(f"{k:>6}" for k in KINDS) + "  retrieved")
        rows: dict[str, object] = {}
        for threshold in args.thresholds:
            start = time.perf_counter()
            result = curate_features(
                feats, seed_feats, threshold=threshold, dedup_k=args.dedup_k, retrieve_k=args.k, backend=backend
            )
            seconds = time.perf_counter() - start
            removed = torch.zeros(len(labels), dtype=torch.bool)
            removed[result.removed] = True
            hits = int((removed & injected).sum())
            precision = hits / max(int(removed.sum()), 1)
            recall = hits / max(int(injected.sum()), 1)
            per_kind = [
                float((removed & (kind == i)).sum()) / max(int((kind == i).sum()), 1) for i in range(len(KINDS))
            ]
            got = labels[result.retrieved]
            entropy, ratio = _balance(got)
            ood_share = float((got == OOD_LABEL).float().mean())
            sims = F.normalize(feats[result.retrieved], dim=1) @ F.normalize(seed_feats, dim=1).T
            agree = float((seed_labels[sims.argmax(dim=1)] == got).float().mean())
            print(
                f"{threshold:9.3f}  {int(removed.sum()):7d}  {precision:9.1%}  {recall:6.1%}  "
                + "  ".join(f"{v:6.1%}" for v in per_kind)
                + f"  {result.retrieved.numel():5d}: entropy {entropy:.3f} (pool {pool_entropy:.3f}), "
                f"largest/smallest {ratio:.1f} (pool {pool_ratio:.1f}), OOD {ood_share:.1%} "
                f"(pool {n_ood / len(labels):.1%}), seed-class agreement {agree:.1%}  [{seconds:.1f} s]"
            )
            rows[str(threshold)] = {
                "removed": int(removed.sum()),
                "precision": precision,
                "recall": recall,
                **{f"recall_{k}": v for k, v in zip(KINDS, per_kind, strict=True)},
                "retrieved": int(result.retrieved.numel()),
                "retrieved_entropy": entropy,
                "retrieved_max_min_ratio": ratio,
                "retrieved_ood_share": ood_share,
                "retrieved_seed_class_agreement": agree,
            }
        report[name] = rows
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": report}, indent=2) + "\n")


if __name__ == "__main__":
    main()
