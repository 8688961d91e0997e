"""Zero-shot classification and image-text retrieval on joint-space embeddings (tensors only).

Zero-shot (CLIP sec. 3.1.2, 3.1.4): each class name is put into several prompt templates
("a photo of a {}."), the text encoder embeds every prompt, and a class's weight is the mean
of its L2-normalised prompt embeddings, normalised again (prompt ensembling); an image is
classified as the class whose weight has the largest cosine similarity with it.

Retrieval: image->text ranks all texts for each image, text->image all images for each text;
Recall@K is the fraction of queries with a relevant item among the first K. An image may have
several captions and the same caption several images (templated captions repeat), so
relevance is a ``(N_images, N_texts)`` boolean matrix, not the diagonal.

References: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision" (CLIP), arXiv:2103.00020, sec. 3.1 and Table 13 (Recall@1/5/10 on Flickr30k and
MSCOCO).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.eval.retrieval import iter_topk, recall_at_k

__all__ = [
    "build_prompts",
    "check_class_names",
    "image_text_recall",
    "prompt_ensemble",
    "zeroshot_predict",
    "zeroshot_top1",
]


def check_class_names(names: Sequence[str] | None) -> list[str]:
    """The class names as a list; ``ValueError`` (one line) for none, an empty or a duplicate
    name: two classes with one name would get the same text weight."""
    if not names:
        raise ValueError("zero-shot classification needs class names; the data set has none")
    names = [str(n) for n in names]
    seen: set[str] = set()
    for name in names:
        key = name.strip().lower()
        if not key:
            raise ValueError("zero-shot classification: a class name is empty")
        if key in seen:
            raise ValueError(f"zero-shot classification: the class name {name!r} occurs twice; class names must differ")
        seen.add(key)
    return names


def build_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """``C * T`` prompts, class-major: prompt ``c * T + t`` is template ``t`` of class ``c``."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"prompt templates must each contain '{{}}' for the class name, got {list(templates)}")
    return [t.format(name) for name in check_class_names(class_names) for t in templates]


def prompt_ensemble(prompt_emb: Tensor, num_classes: int) -> Tensor:
    """``(C * T, D)`` class-major prompt embeddings -> ``(C, D)`` unit class weights: the mean
    of each class's normalised prompt embeddings, renormalised."""
    if prompt_emb.ndim != 2 or prompt_emb.shape[0] % num_classes:
        raise ValueError(f"prompt embeddings {tuple(prompt_emb.shape)} are not {num_classes} classes x T templates")
    z = F.normalize(prompt_emb.float(), dim=1).view(num_classes, -1, prompt_emb.shape[1])
    return F.normalize(z.mean(1), dim=1)


def zeroshot_predict(image_emb: Tensor, class_weights: Tensor) -> Tensor:
    """``(N, D)`` image embeddings, ``(C, D)`` class weights -> ``(N,)`` predicted classes (cosine)."""
    return (F.normalize(image_emb.float(), dim=1) @ F.normalize(class_weights.float(), dim=1).T).argmax(1)


def zeroshot_top1(image_emb: Tensor, class_weights: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in ``[0, 1]`` of :func:`zeroshot_predict` (``nan`` for no images)."""
    if labels.numel() == 0:
        return float("nan")
    pred = zeroshot_predict(image_emb, class_weights)
    return float((pred.cpu() == labels.cpu()).float().mean())


def image_text_recall(
    image_emb: Tensor, text_emb: Tensor, relevant: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Image->text and text->image Recall@K in ``[0, 1]``.

    Args:
        image_emb: ``(N, D)`` image embeddings.
        text_emb: ``(M, D)`` text embeddings.
        relevant: ``(N, M)`` bool, ``relevant[i, j]`` when text ``j`` describes image ``i``.
        ks: the cut-offs (capped at the gallery sizes).

    Returns:
        ``{"i2t_recall@K": ..., "t2i_recall@K": ...}`` for each ``K``.
    """
    n, m = image_emb.shape[0], text_emb.shape[0]
    if relevant.shape != (n, m):
        raise ValueError(f"relevant must be ({n}, {m}) images x texts, got {tuple(relevant.shape)}")
    out: dict[str, float] = {}
    for name, query, gallery, rel in (
        ("i2t", image_emb, text_emb, relevant),
        ("t2i", text_emb, image_emb, relevant.T),
    ):
        kmax = min(max(ks), gallery.shape[0])
        hits: dict[int, list[Tensor]] = {k: [] for k in ks}
        for start, end, top in iter_topk(query, gallery, kmax):
            ranked = rel[start:end].to(top.device).gather(1, top)
            ranked = torch.cat([ranked, ranked[:, -1:].expand(-1, max(ks) - kmax)], 1) if kmax < max(ks) else ranked
            for k, h in recall_at_k(ranked, ks).items():
                hits[k].append(h)
        for k in ks:
            out[f"{name}_recall@{k}"] = float(torch.cat(hits[k]).mean()) if hits[k] else float("nan")
    return out
