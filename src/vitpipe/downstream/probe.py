"""Linear probe on cached features: a sweep of heads, over several feature sets, trained in one pass.

Each head is BatchNorm without affine + Linear (the MAE protocol). BatchNorm has no parameters and
normalises each channel on its own, so one BatchNorm over all the sets' channels computes exactly
what each head's own would; every head has its own parameters and its own learning rate and weight
decay, and the summed loss gives each head the gradient it would get alone. The sets are the
layers of one encoder (same width): every layer's K heads, and with ``joined`` K more over the
layers side by side (the concatenation candidate), come out of one batched matmul per step. One
pass over the features trains them all; a set trained with others ends where it would alone
(the same batches in the same order; tests/test_probe_sets.py). The pick of a head (and, in
evaluate.py, of a layer) is judged on held-out train images: one split, or k folds and a refit
where one split would be too small to tell near-ties apart (``ProbeSettings.folds``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from vitpipe.config import ConfigError
from vitpipe.ssl.engine.schedules import warmup_cosine

DEFAULT_LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # BatchNorm'd features often want lr >= 1
DEFAULT_WDS = (0.0, 1e-4, 1e-3)
# A held-out top-1 on n images has a standard error of ~sqrt(p (1 - p) / n): 1.7 points at the
# demo's 600, 0.6 at 5,000. Among near-ties a smaller split picks by noise (benchmarks/RESULTS.md,
# "The demo's learning rate": one image apart moved the demo's headline 1.7 points).
MIN_JUDGED = 5000
AUTO_FOLDS = 3
"""Every train image judged once either way; 3 folds cost 3 sweeps on 2/3 of train and a refit
(the demo's two probes ~12 s each; 5 folds ~19 s, of a 3-minute budget)."""


@dataclass
class ProbeSettings:
    lrs: tuple[float, ...] = DEFAULT_LRS
    """Learning rates of the sweep (SGD, momentum 0.9, cosine decay)."""
    weight_decays: tuple[float, ...] = DEFAULT_WDS
    """Weight decays of the sweep (every lr x every wd is one head)."""
    epochs: int = 30
    """Passes over the probe's train features (0 would score the untrained heads)."""
    batch_size: int = 256
    val_fraction: float = 0.1
    """Held out from train to pick the head (one split); the test split is only used for the report."""
    folds: int = 0
    """What judges the pick: 1 = one held-out split of ``val_fraction`` (the heads keep its other
    images); k > 1 = k-fold cross-validation (every train image judged once, then every head refit
    on all of train); 0 = auto: 1 where one split holds at least ``MIN_JUDGED`` images, else
    ``AUTO_FOLDS``."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.folds < 0 or not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"--folds must be >= 0 (0 = auto) and the probe's val_fraction in (0, 1); got folds "
                              f"{self.folds}, val_fraction {self.val_fraction}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lrs or not self.weight_decays \
                or min(self.lrs) <= 0 or min(self.weight_decays) < 0:
            raise ConfigError(f"probe epochs and batch size must be >= 1, learning rates > 0, weight decays >= 0: "
                              f"epochs {self.epochs}, batch size {self.batch_size}, lrs {list(self.lrs)}, "
                              f"weight decays {list(self.weight_decays)}")


@dataclass
class ProbeResult:
    top1: float
    top5: float
    val_top1: float
    lr: float
    weight_decay: float
    folds: int = 1
    """How many held-out folds judged the pick (1: one split; k: k-fold, every train image once)."""
    judged: int = 0
    """Train images the pick's ``val_top1`` was measured on."""
    sweep: list[dict[str, float]] = field(default_factory=list)


class LinearHeads(nn.Module):
    """K independent heads on each of L feature sets of width D, and with ``joined`` K more on the
    L sets side by side (set L): [B, L, D] (or [B, D] for one set) -> logits [S, K, B, C]."""

    def __init__(self, dim: int, classes: int, count: int, sets: int = 1, joined: bool = False) -> None:
        super().__init__()
        self.sets, self.joined = sets, joined
        self.norm = nn.BatchNorm1d(sets * dim, affine=False)  # per channel: each set's own BatchNorm
        # zero init: a convex problem needs no symmetry breaking, and a head then starts the same
        # whatever else is in the sweep. [L, D, own | joined part, K, C]
        self.weights = nn.Parameter(torch.zeros(sets, dim, 1 + joined, count, classes))
        self.biases = nn.Parameter(torch.zeros(sets + joined, count, classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.batch_major(features).permute(1, 2, 0, 3)

    def batch_major(self, features: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> [B, S, K, C]."""
        return self.logits(self.normalise(features))

    def normalise(self, features: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> [L, B, D], each channel through the (parameter-free) BatchNorm."""
        sets, dim = self.weights.shape[:2]
        return self.norm(features.reshape(len(features), sets * dim)).view(-1, sets, dim).transpose(0, 1)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """[L, B, D] -> [B, S, K, C] by one batched [L, B, D] x [L, D, (1 + joined) K C] matmul."""
        sets, dim, parts, count, classes = self.weights.shape
        out = torch.bmm(normed, self.weights.flatten(2)).view(sets, -1, parts, count, classes)
        own = out[:, :, 0].transpose(0, 1)
        if self.joined:
            own = torch.cat([own, out[:, :, 1].sum(dim=0).unsqueeze(1)], dim=1)
        return own + self.biases

    def grads(self, normed: torch.Tensor, d_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradients of (weights, biases) given the loss's gradient [B, S, K, C] at ``logits``:
        one batched matmul, as the forward (the joined heads see every layer's slice)."""
        sets = self.weights.shape[0]
        d_out = d_logits[:, :sets].transpose(0, 1)
        if self.joined:
            d_out = torch.stack([d_out, d_logits[:, sets].unsqueeze(0).expand_as(d_out)], dim=2)
        d_weights = torch.bmm(normed.transpose(1, 2), d_out.reshape(sets, len(d_logits), -1))
        return d_weights.view_as(self.weights), d_logits.sum(dim=0)

    def head(self, index: int, set_index: int = 0) -> tuple[torch.Tensor, torch.Tensor, slice]:
        """(weight [D_s, C], bias [C], the set's channels in ``norm``) of head ``index`` of a set."""
        sets, dim = self.weights.shape[:2]
        if set_index == sets:  # the joined set: the layers' slices in order, as concatenated features
            return self.weights[:, :, 1, index].reshape(sets * dim, -1), self.biases[set_index, index], slice(None)
        return (self.weights[set_index, :, 0, index], self.biases[set_index, index],
                slice(set_index * dim, (set_index + 1) * dim))


def _cross_entropy_grad(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, H, C] logits of H heads, [B] labels -> the gradient of the sum over heads of each head's
    mean cross-entropy: (softmax - one-hot) / B. Written out, not by autograd: the sweep's loss
    needs no value, and autograd's slicing and gather backward zero-fill whole tensors every step
    (1.26x the probe step; benchmarks/RESULTS.md, "The 12-block linear probe").

    A class more than 60 below the top one gets a gradient of exactly zero (its probability is <
    exp(-60) ~ 1e-26), not a subnormal float: a sweep's high-lr heads are that sure of most samples,
    and subnormal operands made every matmul of the step several times slower on x86 (the 12-block
    probe 438 -> 80 s on cached features)."""
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    keep = shifted >= -60.0
    grad = shifted.clamp_(min=-60.0).exp_()
    grad.div_(grad.sum(dim=-1, keepdim=True)).mul_(keep)
    index = labels.view(-1, 1, 1).expand(-1, grad.shape[1], 1)
    grad.scatter_add_(-1, index, torch.full(index.shape, -1.0, dtype=grad.dtype))
    return grad.div_(len(logits))


def _stacked(features: np.ndarray | list[np.ndarray] | torch.Tensor) -> torch.Tensor:
    """One [N, D] array or a list of L [N, D] arrays -> float32 [N, L, D]; a tensor as it is."""
    if torch.is_tensor(features):
        return features
    if isinstance(features, np.ndarray):
        features = [features]
    return torch.from_numpy(np.stack([np.asarray(f, dtype=np.float32) for f in features], axis=1))


def train_heads(features: np.ndarray | list[np.ndarray] | torch.Tensor, labels: np.ndarray, classes: int, lrs: list[float],
                wds: list[float], epochs: int, batch_size: int, seed: int, joined: bool = False) -> LinearHeads:
    """Heads i = (lrs[i], wds[i]) on every feature set (an [N, D] array, or a list of them of one
    width), trained together on the same batches in the same order.

    All heads live in one tensor so a step costs about the same for 1 or 24 heads; SGD (momentum
    0.9, cosine decay, as torch.optim.SGD computes it) is applied by hand because torch's
    optimizers take one learning rate per tensor, not per slice.
    """
    x = _stacked(features)
    y = torch.from_numpy(labels.astype(np.int64))
    count, sets = len(lrs), x.shape[1]
    heads = LinearHeads(x.shape[2], classes, count, sets, joined)
    params = [heads.weights, heads.biases]
    lr, wd = torch.tensor(lrs, dtype=torch.float32), torch.tensor(wds, dtype=torch.float32)
    lr_of, wd_of = [lr.view(1, 1, 1, count, 1), lr.view(1, count, 1)], [wd.view(1, 1, 1, count, 1), wd.view(1, count, 1)]
    momentum = [torch.zeros_like(p) for p in params]
    steps_per_epoch = max(1, len(x) // batch_size)
    total = epochs * steps_per_epoch
    order_rng = torch.Generator().manual_seed(seed)
    heads.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=order_rng)
        for batch in range(steps_per_epoch):
            index = order[batch * batch_size:(batch + 1) * batch_size]
            with torch.no_grad():
                normed = heads.normalise(x[index])
                logits = heads.logits(normed)
                # every head's mean loss, summed: each gets its own gradient
                d_logits = _cross_entropy_grad(logits.flatten(1, 2), y[index]).view_as(logits)
                grads = heads.grads(normed, d_logits)
                decay = warmup_cosine(step, total)
                for param, grad, buf, head_lr, head_wd in zip(params, grads, momentum, lr_of, wd_of):
                    buf.mul_(0.9).add_(grad + head_wd * param)
                    param.sub_(head_lr * decay * buf)
            step += 1
    return heads.eval()


@torch.no_grad()
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return (top == labels.unsqueeze(-1)).any(dim=-1).float().mean().item()


def split_train_val(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(count)
    cut = max(1, int(round(count * fraction))) if fraction > 0 else 0
    return np.sort(order[cut:]), np.sort(order[:cut])


def fold_count(count: int, settings: ProbeSettings) -> int:
    """The folds that judge the pick among ``count`` train images (``settings.folds``, 0 = auto)."""
    if settings.folds:  # more folds than images would train sweeps that judge nothing
        return min(settings.folds, count)
    return 1 if count * settings.val_fraction >= MIN_JUDGED else AUTO_FOLDS


def held_out_splits(count: int, settings: ProbeSettings) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit, held-out) index pairs: one ``val_fraction`` split, or k disjoint folds covering all."""
    folds = fold_count(count, settings)
    if folds == 1:
        return [split_train_val(count, settings.val_fraction, settings.seed)]
    parts = np.array_split(np.random.default_rng(settings.seed).permutation(count), folds)
    return [(np.sort(np.concatenate(parts[:i] + parts[i + 1:])), np.sort(part)) for i, part in enumerate(parts)]


class Sweep(NamedTuple):
    heads: LinearHeads
    grid: list[tuple[float, float]]
    """(lr, weight decay) of each head."""
    scores: list[list[float]]
    """Held-out top-1 per set and head."""
    best: list[int]
    """The picked head of each set."""
    folds: int
    judged: int
    """Images the scores were measured on (all of train with k folds)."""


def fit_sweep(features: np.ndarray | list[np.ndarray], labels: np.ndarray, classes: int, settings: ProbeSettings,
              joined: bool = False) -> Sweep:
    """Train every (lr, wd) head on every feature set and pick one per set on held-out images (one
    split, or k folds whose counts add up, then a refit on all). Ties go to the earlier head."""
    grid = [(lr, wd) for lr in settings.lrs for wd in settings.weight_decays]
    x = _stacked(features)
    splits = held_out_splits(len(x), settings)
    correct = None
    for fit_idx, val_idx in splits:
        heads = train_heads(x[torch.from_numpy(fit_idx)], labels[fit_idx], classes,
                            [g[0] for g in grid], [g[1] for g in grid], settings.epochs, settings.batch_size,
                            settings.seed, joined)
        with torch.no_grad():
            val_logits = heads(x[torch.from_numpy(val_idx)])
        val_y = torch.from_numpy(labels[val_idx].astype(np.int64))
        hits = (val_logits.argmax(dim=-1) == val_y).sum(dim=-1)  # [S, K] images right
        correct = hits if correct is None else correct + hits
    judged = sum(len(val_idx) for _, val_idx in splits)
    if len(splits) > 1:  # the folds judged the grid; the reported heads learn from every image
        heads = train_heads(x, labels, classes, [g[0] for g in grid], [g[1] for g in grid], settings.epochs,
                            settings.batch_size, settings.seed, joined)
    scores = (correct.double() / judged).tolist()
    best = [max(range(len(grid)), key=lambda i: (row[i], -i)) for row in scores]
    return Sweep(heads, grid, scores, best, len(splits), judged)


def probe_sets(train_x: list[np.ndarray], train_y: np.ndarray, test_x: list[np.ndarray], test_y: np.ndarray,
               settings: ProbeSettings = ProbeSettings(), joined: bool = False) -> list[ProbeResult]:
    """The probe of each feature set (one width), plus with ``joined`` the probe of all of them
    side by side, trained in one pass: one ProbeResult per set (the joined one last)."""
    classes = int(max(train_y.max(), test_y.max())) + 1
    sweep_fit = fit_sweep(train_x, train_y, classes, settings, joined)
    heads, grid, val_top1, best = sweep_fit.heads, sweep_fit.grid, sweep_fit.scores, sweep_fit.best
    with torch.no_grad():
        test_logits = heads(_stacked(test_x))
    test_labels = torch.from_numpy(test_y.astype(np.int64))
    results = []
    for logits, scores, pick in zip(test_logits, val_top1, best):
        sweep = [{"lr": lr, "weight_decay": wd, "val_top1": scores[index],
                  "test_top1": topk_accuracy(logits[index], test_labels, 1)} for index, (lr, wd) in enumerate(grid)]
        results.append(ProbeResult(top1=sweep[pick]["test_top1"], top5=topk_accuracy(logits[pick], test_labels, 5),
                                   val_top1=scores[pick], lr=grid[pick][0], weight_decay=grid[pick][1],
                                   folds=sweep_fit.folds, judged=sweep_fit.judged, sweep=sweep))
    return results


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 settings: ProbeSettings = ProbeSettings()) -> ProbeResult:
    return probe_sets([train_x], train_y, [test_x], test_y, settings)[0]


def fit_linear_head(features: np.ndarray, labels: np.ndarray, classes: int,
                    settings: ProbeSettings = ProbeSettings()) -> tuple[nn.Linear, dict[str, float]]:
    """The sweep's best head (picked on a held-out split) as one Linear layer over raw features.

    BatchNorm without affine is a fixed affine map at eval time, so it folds exactly into the Linear:
    ((f - mean) / std) @ W + b = f @ (W / std) + (b - (mean / std) @ W).
    """
    heads, grid, scores, best, _, _ = fit_sweep(features, labels, classes, settings)
    best, scores = best[0], scores[0]
    with torch.no_grad():
        head_weight, head_bias, _ = heads.head(best)
        std = torch.sqrt(heads.norm.running_var + heads.norm.eps)
        weight = head_weight / std[:, None]  # [D, C]
        bias = head_bias - (heads.norm.running_mean / std) @ head_weight
        linear = nn.Linear(features.shape[1], classes)
        linear.weight.copy_(weight.T)
        linear.bias.copy_(bias)
    return linear, {"lr": grid[best][0], "weight_decay": grid[best][1], "val_top1": scores[best]}
