"""InstDisc (NPID): every image is its own class, a memory bank of all features, NCE.

References: Wu, Xiong, Yu & Lin, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", CVPR 2018 (arXiv:1805.01978).

The non-parametric softmax over the ``N`` training images (eq. 2), with ``v = f(x)`` the
L2-normalised 128-d feature of image ``i`` and ``v_j`` the bank's entries::

    P(i | v) = exp(v_i . v / T) / Z_i,    Z_i = sum_j exp(v_j . v / T)       (T = 0.07)

is learnt by noise-contrastive estimation (section 3.2) with ``m = 4096`` noise samples drawn
uniformly, ``P_n = 1 / N``, and the posterior that ``v`` came from the data::

    h(i, v) = P(i | v) / (P(i | v) + m P_n)
    J_NCE   = -E_data[log h(i, v_i)] - m E_noise[log(1 - h(i, v'))]

``Z`` is a constant estimated once by Monte Carlo, ``Z ~ N E_j[exp(v_j . v / T)]``, here from
the first batch's scores (positive and noise columns), as the authors' implementation does.
After each step the bank rows of the batch become ``normalize(0.5 v_i + 0.5 f_i)``
(``on_step_end``). The proximal regulariser of section 3.4 adds ``lambda |v_i^t - v_i^{t-1}|^2``
(the current feature against its bank entry) to the data term; it is off by default
(``proximal=0``): the authors' released code, which reproduces the paper's ImageNet
results, trains without it; the paper's value is ``lambda = 30``.

Measured caveat (digits, Fashion-MNIST-sized banks): with ``Z`` fixed from the first batch,
when the bank still holds random vectors, ``Z`` is several nats too small once the bank holds
real features (which are far from orthogonal), every noise posterior saturates at 1, the
noise term pushes all features the same way and the bank collapses (loss rising from ~10 to
hundreds, bank mean cosine -> 0.9). ``z_estimate="per_batch"`` re-estimates ``Z`` from every
batch (same Monte Carlo formula, no gradient) and trains stably; the shipped NCE configs use it.

``objective="softmax"`` trains eq. 2 itself instead of its NCE approximation: the exact
cross-entropy over all ``N`` bank rows, ``J = -mean_b log P(i_b | v_b)`` with ``T = 0.07``
(``selfsup.losses.bank_softmax_loss``, scored in chunks of rows so ImageNet-sized banks fit).
As in the authors' code (``LinearAverage``, used when ``nce_k = 0``), the numerator's
``v_i`` is the image's bank entry (the momentum average of its features from earlier
visits, before this step's update), not its current feature, and the denominator holds every bank row including that
entry; no ``Z`` is estimated. The bank is replicated on every process
(``IndexMemoryBank.update`` gathers all processes' rows), so each process scores its local
batch against the whole bank and nothing is gathered in the forward. The paper's ImageNet
method is NCE (the full softmax costs ``O(N)`` per sample); on CIFAR-10, where eq. 2 is
computed exactly (Table 1), NCE approaches the exact softmax only with many noise samples. NCE stays the default; the
``fashion_mnist_softmax`` config uses the softmax because on a 60k bank a step costs only
1.3-1.5x an NCE step (measured, 1 thread) and it removes NCE's two approximations (4096 noise
rows, a Monte Carlo ``Z``), with which the short NCE runs end below a random-init encoder.

``bank_init="features"`` departs from the paper, whose bank starts as random unit vectors (as
the authors' code): before the first step (``on_epoch_start`` of a fresh run, one pass over
the pretraining set) every row ``i`` becomes ``normalize(head(f(x_i)))``, what a training
step would write. Why: with random rows, every positive of the first epoch is a random vector
and each row is refreshed once per epoch with momentum 0.5, so the positives stay noisy for
several epochs; the paper trains 200 epochs where this washes out, a 7-epoch run does not
(Fashion-MNIST, 7 epochs: online kNN 66.7 after epoch 1 against 82.7 for the random-init
encoder, 80.0 at the end). Measured (Fashion-MNIST 12800-image subset, ConvNet width 16,
batch 128, 3 epochs, NCE, kNN@20; seeds 0 / 1): random 75.6 / 75.0, features 79.6 / 80.1,
random-init encoder 77.4 / 78.2; after epoch 1, 69.7 / 70.2 against 77.0 / 76.5 (softmax
objective, seeds 0 / 1: random 75.3 / 75.7, features 79.9 / 80.0). The view is the evaluation view (the
un-augmented image): the one the epoch hook's pass provides, a deterministic point (nothing to
seed or to reproduce on resume) and the natural centre of the augmented features the momentum
average then tracks. BatchNorm normalises each pass batch with
its own statistics, as in a training step (:func:`batch_statistics`; running statistics
untouched): at initialisation the running statistics are the identity, and eval-mode
embeddings are nearly collapsed (mean pairwise cosine 0.965 against 0.754 with batch
statistics, width 32), which measured 77.1 instead of 79.6 in the setting above. The pass
costs one forward over the data: 11% of an NCE epoch (60000 images, width 32, 1 thread).
Under DDP each process encodes its shard and the shards are gathered, so every process holds
the same bank (with BatchNorm its rows depend on the pass's batches, as training steps do).
The ``bank_filled`` buffer records the fill, so a resumed run keeps its checkpoint's bank.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from selfsup.errors import ConfigError, DataError
from selfsup.losses import bank_softmax_loss, nce_loss
from selfsup.methods.base import Batch, EpochContext, Method, StepInfo, StepOutputs
from selfsup.monitors import feature_std_tensor
from selfsup.nn.backbones.protocol import feature_dim
from selfsup.nn.distributed import all_reduce_mean
from selfsup.nn.memory import IndexMemoryBank
from selfsup.registry import METHODS


def check_index(index: Tensor, batch_size: int, num_samples: int, method: str) -> None:
    """One-line ``DataError`` unless ``index`` holds each sample's data-set index in
    ``[0, num_samples)`` as a ``(B,)`` integer tensor: a memory bank has one row per sample."""
    if index is None or index.ndim != 1 or index.shape[0] != batch_size or index.is_floating_point():
        shape = None if index is None else tuple(index.shape)
        raise DataError(
            f"{method} needs each image's data-set index (Batch.index of shape ({batch_size},)), got {shape}; "
            "use a data set that yields (image, label, index)"
        )
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= num_samples:
        raise DataError(
            f"{method}: sample index {high if high >= num_samples else low} is outside the memory bank's "
            f"0..{num_samples - 1}; num_samples must be the pretraining set's size and the indices its positions"
        )


#: How a memory bank starts: the paper's random unit vectors, or one feature pass's embeddings.
BANK_INITS = ("random", "features")


def check_bank_init(bank_init: str) -> None:
    """One-line ``ConfigError`` unless ``bank_init`` is one of ``BANK_INITS``."""
    if bank_init not in BANK_INITS:
        raise ConfigError(
            f"method.bank_init must be 'random' (the paper: random unit vectors) or 'features' "
            f"(each row set to its image's embedding before the first step), got {bank_init!r}"
        )


def _local_batch_norm(module: _BatchNorm, x: Tensor) -> Tensor:
    """``module``'s BatchNorm with the statistics of ``x`` alone: running statistics neither
    used nor updated, nothing exchanged between processes (running statistics for a batch
    with one value per channel, where batch statistics are undefined)."""
    if x.numel() // x.shape[1] <= 1 and module.running_mean is not None:
        running = (module.running_mean, module.running_var)
        return F.batch_norm(x, *running, module.weight, module.bias, False, 0.0, module.eps)
    return F.batch_norm(x, None, None, module.weight, module.bias, True, 0.0, module.eps)


@contextlib.contextmanager
def batch_statistics(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode except that every BatchNorm normalises each batch with that
    batch's own statistics, as in a training step, but without side effects: running
    statistics untouched, no cross-process synchronisation (so shards of different batch
    counts cannot dead-lock a synchronised BatchNorm). Modes and ``forward`` are restored."""
    was_training = module.training
    patched = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    module.eval()
    for m in patched:
        m.forward = (lambda bn: lambda x: _local_batch_norm(bn, x))(m)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in patched:
            del m.forward
        module.train(was_training)


def initial_bank_features(method: nn.Module, ctx: EpochContext, embed: Callable[[Tensor], Tensor]) -> Tensor:
    """``embed`` of every pretraining image ``(N, D)``, row ``i`` = sample ``i``, for
    ``bank_init="features"``: one pass of the epoch hook (eval view, each process its shard,
    gathered), with ``method`` under :func:`batch_statistics` (see the module docstring)."""
    with batch_statistics(method), torch.no_grad():
        return ctx.encode(embed)


def bank_scores(features: Tensor, bank: Tensor, index: Tensor, temperature: float) -> Tensor:
    """``features (B, D) . bank[index] / T`` for ``index (B, K)`` -> ``(B, K)``, float32.

    Two equal computations, the cheaper one chosen: gathering ``B * K * D`` bank values
    (ImageNet, ``N >> K``), or scoring every row ``(B, N)`` and picking ``K`` of them (small
    data sets, where ``B * K * D`` floats would cost more memory than ``B * N``).
    """
    f = features.float()
    with torch.autocast(f.device.type, enabled=False):
        if bank.shape[0] <= index.shape[1] * bank.shape[1] // 8:
            return torch.gather(f @ bank.T, 1, index) / temperature
        return torch.einsum("bd,bkd->bk", f, bank[index]) / temperature


@torch.no_grad()
def estimate_log_z(scores: Tensor, num_samples: int) -> Tensor:
    """``log Z`` with ``Z = N * mean(exp(scores))`` over ``(B, K)`` scores (already ``/ T``),
    averaged over processes, as a ``(1,)`` tensor: the paper's Monte Carlo estimate of the
    softmax's normaliser (section 3.2), kept fixed afterwards."""
    # mean(exp(s)) = exp(logsumexp(s) - log(count)): no overflow at T = 0.07.
    log_mean = torch.logsumexp(scores.float().flatten(), 0) - math.log(scores.numel())
    mean = all_reduce_mean(torch.exp(log_mean).reshape(1))
    return torch.log(mean) + math.log(num_samples)


@METHODS.register("instdisc")
class InstDisc(Method):
    """Instance discrimination with a memory bank: NCE (paper default) or the exact softmax.

    Args:
        backbone: encoder ``(B, C, H, W) -> (B, num_features)``.
        num_samples: size of the pretraining set ``N`` (set by the engine): one bank row each.
        feat_dim: width of the L2-normalised embedding (paper: 128, a linear layer replacing
            the classifier).
        temperature: softmax temperature ``T`` (paper: 0.07).
        num_negatives: noise samples ``m`` per image, drawn uniformly from the bank with
            replacement (paper: 4096).
        bank_momentum: bank update ``v_i <- normalize(m v_i + (1 - m) f_i)`` (paper: 0.5).
        proximal: weight ``lambda`` of the proximal term ``|f_i - v_i|^2`` (paper section 3.4:
            30; 0 = off, the default, as the authors' released code).
        z_estimate: ``"first_batch"`` (the paper: ``Z`` estimated once and kept in the
            ``z_log`` buffer) or ``"per_batch"`` (re-estimated from each batch; see the module
            docstring for why the small-data configs need it). NCE only.
        objective: ``"nce"`` (section 3.2, the paper's method and the default) or
            ``"softmax"`` (eq. 2 exactly: cross-entropy over the whole bank).
        chunk_size: bank rows scored at once by the softmax (memory ``B * chunk_size``).
        bank_init: ``"random"`` (the paper: random unit vectors) or ``"features"`` (before the
            first step, every row becomes its image's embedding; see the module docstring).

    Forward: one view ``(B, C, H, W)`` (the paper's single augmented image), its features
    ``f (B, feat_dim)``; NCE scores against the bank rows ``[i, noise_1..m] (B, 1 + m)``,
    softmax scores against all ``N`` rows.
    """

    view_recipe = "single_view"
    engine_facts = ("num_samples",)
    lr_scaling = "linear"

    z_log: Tensor
    bank_filled: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        num_samples: int = 1281167,
        feat_dim: int = 128,
        temperature: float = 0.07,
        num_negatives: int = 4096,
        bank_momentum: float = 0.5,
        proximal: float = 0.0,
        z_estimate: str = "first_batch",
        objective: str = "nce",
        chunk_size: int = 65536,
        bank_init: str = "random",
    ) -> None:
        super().__init__()
        check_bank_init(bank_init)
        if objective not in ("nce", "softmax"):
            raise ValueError(f"objective must be 'nce' (paper section 3.2) or 'softmax' (eq. 2), got {objective!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (bank rows scored at once), got {chunk_size}")
        if z_estimate not in ("first_batch", "per_batch"):
            raise ValueError(f"z_estimate must be 'first_batch' (paper) or 'per_batch', got {z_estimate!r}")
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1 (paper: 4096), got {num_negatives}")
        if not 0.0 <= bank_momentum < 1.0:
            raise ValueError(f"bank_momentum must be in [0, 1) (paper: 0.5), got {bank_momentum}")
        self.backbone = backbone
        self.head = nn.Linear(feature_dim(backbone), feat_dim)
        self.bank = IndexMemoryBank(num_samples, feat_dim)
        self.num_samples = num_samples
        self.temperature = temperature
        self.num_negatives = num_negatives
        self.bank_momentum = bank_momentum
        self.proximal = proximal
        self.z_estimate = z_estimate
        self.objective = objective
        self.chunk_size = chunk_size
        self.bank_init = bank_init
        if bank_init == "features":
            # 1 once the bank holds the feature pass's embeddings: persistent, so a resumed
            # run (whose bank is the checkpoint's) never fills it again.
            self.register_buffer("bank_filled", torch.zeros((), dtype=torch.long))
        if objective == "nce":
            # log Z; -inf (Z = 0, impossible) until the first step estimates it. Persistent, so
            # a resumed run keeps the estimate. The exact softmax has no Z to keep.
            self.register_buffer("z_log", torch.full((1,), float("-inf")))

    @property
    def z_estimated(self) -> bool:
        """Whether ``Z`` has been estimated (by the first step's ``on_step_end``); NCE only."""
        return self.objective == "nce" and bool(torch.isfinite(self.z_log).all())

    def embedding(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, feat_dim)`` L2-normalised features ``v = f(x)``."""
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)

    def on_epoch_start(self, ctx: EpochContext) -> None:
        # bank_init="features": fill the bank once, before the first step of a fresh run.
        if self.bank_init == "features" and not bool(self.bank_filled):
            self.bank.fill(initial_bank_features(self, ctx, self.embedding))
            self.bank_filled.fill_(1)

    def noise_index(self, batch_size: int, device: torch.device) -> Tensor:
        """``(B, m)`` noise indices drawn uniformly from ``[0, N)`` (``P_n = 1 / N``)."""
        return torch.randint(self.num_samples, (batch_size, self.num_negatives), device=device)

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        x = batch.views[0]
        check_index(batch.index, x.shape[0], self.num_samples, "instdisc")
        v = self.embedding(x)
        index = batch.index.to(v.device, torch.long)
        outputs: dict[str, Tensor]
        if self.objective == "softmax":
            ce = bank_softmax_loss(v, self.bank.bank, index, self.temperature, self.chunk_size)
            outputs = {"loss": ce, "softmax_loss": ce.detach()}
        else:
            outputs = self._nce(v, index)
        outputs.update(z_std=feature_std_tensor(v), features=v.detach(), index=index)
        if self.proximal > 0:
            prox = (v - self.bank.bank[index]).square().sum(dim=1).mean()
            outputs["loss"] = outputs["loss"] + self.proximal * prox
            outputs["proximal_loss"] = prox.detach()
        return outputs

    def _nce(self, v: Tensor, index: Tensor) -> dict[str, Tensor]:
        """NCE (section 3.2) of features ``v (B, D)`` against their bank rows and ``m`` noise rows."""
        candidates = torch.cat([index[:, None], self.noise_index(v.shape[0], v.device)], dim=1)
        scores = bank_scores(v, self.bank.bank, candidates, self.temperature)  # (B, 1 + m)
        # Z is estimated from the first batch and then held fixed (a constant, no gradient).
        fixed = self.z_estimated and self.z_estimate == "first_batch"
        z_log = self.z_log if fixed else estimate_log_z(scores.detach(), self.num_samples)
        log_p = scores - z_log
        nce = nce_loss(log_p[:, 0], log_p[:, 1:], -math.log(self.num_samples))
        return {"loss": nce, "nce_loss": nce.detach(), "z_log": z_log.detach().expand(v.shape[0])}

    def on_step_end(self, step: StepInfo, outputs: StepOutputs) -> None:
        # The bank and Z change only here, after the optimiser step: the bank rows of this
        # step's images (every process's, gathered in IndexMemoryBank.update) move toward
        # their new features.
        if self.objective == "nce" and (not self.z_estimated or self.z_estimate == "per_batch"):
            self.z_log.copy_(outputs["z_log"][:1])  # the last estimate (logged, and kept for resume)
        self.bank.update(outputs["index"], outputs["features"], momentum=self.bank_momentum)
