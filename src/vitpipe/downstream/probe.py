"""Linear probe on cached features: a sweep of heads trained together in one pass.

Each head is BatchNorm without affine + Linear (the MAE protocol). BatchNorm has no parameters,
so one shared BatchNorm computes exactly what each head's own would; every head has its own
parameters and its own optimizer group (learning rate, weight decay), and the summed loss gives
each head the gradient it would get alone. One pass over the features trains the whole sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from vitpipe.ssl.engine.schedules import warmup_cosine

DEFAULT_LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # BatchNorm'd features often want lr >= 1
DEFAULT_WDS = (0.0, 1e-4, 1e-3)


@dataclass
class ProbeSettings:
    lrs: tuple[float, ...] = DEFAULT_LRS
    """Learning rates of the sweep (SGD, momentum 0.9, cosine decay)."""
    weight_decays: tuple[float, ...] = DEFAULT_WDS
    """Weight decays of the sweep (every lr x every wd is one head)."""
    epochs: int = 30
    batch_size: int = 256
    val_fraction: float = 0.1
    """Held out from train to pick the head; the test split is only used for the report."""
    seed: int = 0


@dataclass
class ProbeResult:
    top1: float
    top5: float
    val_top1: float
    lr: float
    weight_decay: float
    sweep: list[dict[str, float]] = field(default_factory=list)


class LinearHeads(nn.Module):
    """K independent heads over the same normalized features: [B, D] -> [K, B, C]."""

    def __init__(self, dim: int, classes: int, count: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        # zero init: a convex problem needs no symmetry breaking, and a head then starts the same
        # whatever else is in the sweep
        self.weights = nn.Parameter(torch.zeros(count, dim, classes))
        self.biases = nn.Parameter(torch.zeros(count, classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.batch_major(features).transpose(0, 1)

    def batch_major(self, features: torch.Tensor) -> torch.Tensor:
        """[B, D] -> [B, K, C] by one [B, D] x [D, K*C] matmul (einsum would copy the features K times)."""
        count, dim, classes = self.weights.shape
        stacked = self.weights.permute(1, 0, 2).reshape(dim, count * classes)
        return (self.norm(features) @ stacked).view(-1, count, classes) + self.biases


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; ~3x faster than F.cross_entropy on CPU for few classes (torch's
    log_softmax kernel vectorises poorly over a last dimension of ~10), which is most of a sweep step."""
    shifted = logits - logits.detach().max(dim=1, keepdim=True).values
    return (shifted.exp().sum(dim=1).log() - shifted.gather(1, labels[:, None]).squeeze(1)).mean()


def train_heads(features: np.ndarray, labels: np.ndarray, classes: int, lrs: list[float], wds: list[float],
                epochs: int, batch_size: int, seed: int) -> LinearHeads:
    """Heads i = (lrs[i], wds[i]) trained together on the same batches in the same order.

    All heads live in one [K, D, C] tensor so a step costs about the same for 1 or 24 heads; SGD
    (momentum 0.9, cosine decay, as torch.optim.SGD computes it) is applied by hand because
    torch's optimizers take one learning rate per tensor, not per slice.
    """
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    y = torch.from_numpy(labels.astype(np.int64))
    count = len(lrs)
    heads = LinearHeads(x.shape[1], classes, count)
    params = [heads.weights, heads.biases]
    lr = torch.tensor(lrs, dtype=torch.float32)
    wd = torch.tensor(wds, dtype=torch.float32)
    lr_of = [lr.view(count, 1, 1), lr.view(count, 1)]
    wd_of = [wd.view(count, 1, 1), wd.view(count, 1)]
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
            logits = heads.batch_major(x[index])
            # K x the mean over K heads = the sum of each head's own loss: each gets its own gradient
            loss = _cross_entropy(logits.flatten(0, 1), y[index].repeat_interleave(count)) * count
            grads = torch.autograd.grad(loss, params)
            decay = warmup_cosine(step, total)
            with torch.no_grad():
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


def fit_sweep(features: np.ndarray, labels: np.ndarray, classes: int,
              settings: ProbeSettings) -> tuple[LinearHeads, list[tuple[float, float]], list[float], int]:
    """Train every (lr, wd) head on ``features`` minus a held-out split and pick one on that split:
    (heads, grid, held-out top-1 per head, index of the picked head)."""
    grid = [(lr, wd) for lr in settings.lrs for wd in settings.weight_decays]
    fit_idx, val_idx = split_train_val(len(features), settings.val_fraction, settings.seed)
    heads = train_heads(features[fit_idx], labels[fit_idx], classes, [g[0] for g in grid], [g[1] for g in grid],
                        settings.epochs, settings.batch_size, settings.seed)
    with torch.no_grad():
        val_logits = heads(torch.from_numpy(features[val_idx].astype(np.float32)))
    val_y = torch.from_numpy(labels[val_idx].astype(np.int64))
    scores = [topk_accuracy(val_logits[i], val_y, 1) for i in range(len(grid))]
    return heads, grid, scores, max(range(len(grid)), key=lambda i: (scores[i], -i))


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 settings: ProbeSettings = ProbeSettings()) -> ProbeResult:
    classes = int(max(train_y.max(), test_y.max())) + 1
    heads, grid, val_top1, best = fit_sweep(train_x, train_y, classes, settings)
    with torch.no_grad():
        test_logits = heads(torch.from_numpy(test_x.astype(np.float32)))
    test_labels = torch.from_numpy(test_y.astype(np.int64))
    sweep = [{"lr": lr, "weight_decay": wd, "val_top1": val_top1[index],
              "test_top1": topk_accuracy(test_logits[index], test_labels, 1)}
             for index, (lr, wd) in enumerate(grid)]
    return ProbeResult(top1=sweep[best]["test_top1"], top5=topk_accuracy(test_logits[best], test_labels, 5),
                       val_top1=val_top1[best], lr=grid[best][0], weight_decay=grid[best][1], sweep=sweep)


def fit_linear_head(features: np.ndarray, labels: np.ndarray, classes: int,
                    settings: ProbeSettings = ProbeSettings()) -> tuple[nn.Linear, dict[str, float]]:
    """The sweep's best head (picked on a held-out split) as one Linear layer over raw features.

    BatchNorm without affine is a fixed affine map at eval time, so it folds exactly into the Linear:
    ((f - mean) / std) @ W + b = f @ (W / std) + (b - (mean / std) @ W).
    """
    heads, grid, scores, best = fit_sweep(features, labels, classes, settings)
    with torch.no_grad():
        std = torch.sqrt(heads.norm.running_var + heads.norm.eps)
        weight = heads.weights[best] / std[:, None]  # [D, C]
        bias = heads.biases[best] - (heads.norm.running_mean / std) @ heads.weights[best]
        linear = nn.Linear(features.shape[1], classes)
        linear.weight.copy_(weight.T)
        linear.bias.copy_(bias)
    return linear, {"lr": grid[best][0], "weight_decay": grid[best][1], "val_top1": scores[best]}
