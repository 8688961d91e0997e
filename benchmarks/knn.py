"""Speed of the weighted kNN evaluation (cosine, T = 0.07, k = 20 and 200) against its floors.

On one feature set, one process alternates, round after round (the order rotates every round,
so load from other processes hits every variant alike):

old      the pre-issue-25 ``knn_predict``: a (1024, N) similarity block per chunk, a full top-k
         over N columns, one scatter-add per k (kept here verbatim as the reference);
topk     plain torch: the same blocks, ``topk(k_max)`` and nothing else (no vote);
torch    ``knn_predict(backend="torch")``: 16M-value blocks, a grouped top-k (group maxima,
         then top-k over the best groups' columns only), one scatter-add for every k;
faiss    ``knn_predict(backend="faiss")``: faiss's exact ``IndexFlatIP`` search, same vote
         (only when ``import faiss`` works).

Reported per thread count: the median seconds over the rounds, each variant's ratio to faiss
and to plain torch, and whether its predictions equal ``old``'s (ties aside they must: every
variant is an exact search). The matrix product alone (``matmul``) is the floor of the torch
paths.

Features are synthetic (10 Gaussian clusters in D dimensions, L2-normalised, like a trained
encoder's), or saved ones: ``--features f.pt`` with ``{"train": (x, y), "test": (x, y)}``.

    python benchmarks/knn.py                               # 60k x 10k x 256, 1 and 2 threads
    python benchmarks/knn.py --test 2000 --rounds 3 --threads 1 2
    python benchmarks/knn.py --features /tmp/feat_simclr.pt --threads 1

References: Wu et al. 2018 (arXiv:1805.01978); Johnson, Douze & Jegou 2019 (faiss,
arXiv:1702.08734).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.eval.knn import knn_predict
from selfsup.eval.neighbors import faiss_available


def old_knn_predict(
    train: Tensor, labels: Tensor, test: Tensor, ks: list[int], temperature: float, num_classes: int
) -> dict[int, Tensor]:
    """The kNN vote as ``selfsup.eval.knn`` computed it before issue 25 (the reference)."""
    train = F.normalize(train.float(), dim=1)
    preds = {k: torch.empty(test.shape[0], dtype=torch.int64) for k in ks}
    for start in range(0, test.shape[0], 1024):
        query = F.normalize(test[start : start + 1024].float(), dim=1)
        sim, idx = (query @ train.T).topk(ks[-1], dim=1)
        neighbour_labels, weights = labels[idx], (sim / temperature).exp()
        for k in ks:
            votes = torch.zeros(query.shape[0], num_classes).scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            preds[k][start : start + query.shape[0]] = votes.argmax(dim=1)
    return preds


def plain_topk(train: Tensor, test: Tensor, k: int) -> Tensor:
    """Plain torch: per 1024 test rows, the similarity block and its top-k indices."""
    train = F.normalize(train.float(), dim=1)
    out = [
        (F.normalize(test[s : s + 1024].float(), dim=1) @ train.T).topk(k, dim=1).indices
        for s in range(0, test.shape[0], 1024)
    ]
    return torch.cat(out)


def matmul_only(train: Tensor, test: Tensor) -> None:
    """The floor of the torch paths: the similarity blocks alone."""
    train = F.normalize(train.float(), dim=1)
    for s in range(0, test.shape[0], 1024):
        F.normalize(test[s : s + 1024].float(), dim=1) @ train.T


def synthetic(n_train: int, n_test: int, dim: int, classes: int, seed: int) -> tuple[Tensor, ...]:
    """Clustered features: class centres plus isotropic noise (neighbours mostly share a label)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    y_train = torch.randint(0, classes, (n_train,), generator=g)
    y_test = torch.randint(0, classes, (n_test,), generator=g)
    x_train = centres[y_train] + 1.5 * torch.randn(n_train, dim, generator=g)
    x_test = centres[y_test] + 1.5 * torch.randn(n_test, dim, generator=g)
    return x_train, y_train, x_test, y_test


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=60000, help="training rows N")
    p.add_argument("--test", type=int, default=10000, help="test rows M")
    p.add_argument("--dim", type=int, default=256, help="feature dimension D")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--k", type=int, nargs="+", default=[20, 200])
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--features", help="a .pt file {'train': (x, y), 'test': (x, y)} instead of synthetic data")
    p.add_argument("--no-matmul", action="store_true", help="skip the matmul-only floor")
    args = p.parse_args()

    if args.features:
        saved = torch.load(args.features)
        (x_train, y_train), (x_test, y_test) = saved["train"], saved["test"]
        x_test, y_test = x_test[: args.test], y_test[: args.test]
    else:
        x_train, y_train, x_test, y_test = synthetic(args.train, args.test, args.dim, args.classes, 0)
    ks, classes = sorted(set(args.k)), int(max(y_train.max(), y_test.max())) + 1
    shape = f"{x_train.shape[0]} train x {x_test.shape[0]} test x {x_train.shape[1]}-d, k={ks}"
    print(f"weighted kNN, {shape}, T={args.temperature}; {args.rounds} interleaved rounds, medians")
    print(f"load average at start: {open('/proc/loadavg').read().split()[:3]} (shared machine: ratios are the result)")

    variants: dict[str, Callable[[], object]] = {
        "old": lambda: old_knn_predict(x_train, y_train, x_test, ks, args.temperature, classes),
        "topk": lambda: plain_topk(x_train, x_test, ks[-1]),
        "torch": lambda: knn_predict(x_train, y_train, x_test, ks, args.temperature, classes, backend="torch"),
    }
    if faiss_available():
        variants["faiss"] = lambda: knn_predict(
            x_train, y_train, x_test, ks, args.temperature, classes, backend="faiss"
        )
    else:
        print("faiss not installed (pip install faiss-cpu): no faiss row")
    if not args.no_matmul:
        variants["matmul"] = lambda: matmul_only(x_train, x_test)

    for threads in args.threads:
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {name: [] for name in variants}
        results: dict[str, object] = {}
        names = list(variants)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = time.perf_counter()
                results[name] = variants[name]()
                times[name].append(time.perf_counter() - start)
        reference = results["old"]
        assert isinstance(reference, dict)
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"\n{threads} thread(s)")
        print(f"{'variant':8s} {'median s':>9s} {'min s':>7s} {'/ faiss':>8s} {'/ topk':>7s}  predictions")
        for name, seconds in med.items():
            out = results[name]
            if isinstance(out, dict):
                agree = all(torch.equal(out[k], reference[k]) for k in ks)
                same = "= old" if agree else "DIFFER from old (ties?)"
                accs = " ".join(f"top1@{k}={100 * float((out[k] == y_test).float().mean()):.2f}" for k in ks)
                same += f" ({accs})"
            else:
                same = "-"
            vs_faiss = f"{seconds / med['faiss']:.2f}x" if "faiss" in med else "-"
            print(
                f"{name:8s} {seconds:9.2f} {min(times[name]):7.2f} {vs_faiss:>8s} {seconds / med['topk']:6.2f}x  {same}"
            )


if __name__ == "__main__":
    main()
