"""DINO (Caron et al., 2021): self-distillation with no labels.

Stages: multi-crop views (2 global crops at the run's resolution + ``dino.local_crops`` local ones
at a smaller one, each with the paper's photometric augmentations; made in the loader workers) ->
student = backbone + projection head on every view; teacher = EMA copy of both, on the global
views only -> cross-entropy between the teacher's centred, sharpened distribution of one global
view and the student's of every other view. The centre (a running mean of the teacher's outputs,
all-reduced over processes) and the sharpening keep the teacher from collapsing to a constant or
to one dimension; ``teacher_entropy`` and ``teacher_kl_to_uniform`` are logged to catch both.
Evaluation and export use the teacher backbone. ``dino.koleo`` adds DINOv2's KoLeo regulariser.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from vitpipe.config import PretrainConfig, check
from vitpipe.pipeline.transforms import MultiView, ToNormalized
from vitpipe.ssl.engine.distributed import all_reduce_mean, is_first_process
from vitpipe.ssl.engine.ema import cosine_momentum, ema_update
from vitpipe.ssl.objective import Objective, ObjectiveSpec, Output
from vitpipe.ssl.vit import VisionTransformer, init_weights


@dataclass
class DINOConfig:
    local_crops: int = 8
    """Local views per image (the paper: 8 to 10), besides the 2 global ones."""
    local_size: int = 0
    """Side of a local view in pixels; 0 = 96/224 of data.image_size, rounded to whole patches."""
    global_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    """Area range of a global crop (fraction of the image)."""
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    """Area range of a local crop."""
    out_dim: int = 4096
    """Prototypes: width of the head's output (the paper: 65536 on ImageNet)."""
    hidden_dim: int = 1024
    """Head MLP width (the paper: 2048)."""
    bottleneck_dim: int = 256
    """Head bottleneck before the weight-normalised last layer."""
    student_temp: float = 0.1
    """Softmax temperature of the student."""
    teacher_temp: float = 0.07
    """Teacher temperature after the warm-up."""
    warmup_teacher_temp: float = 0.04
    """Teacher temperature at step 0, rising linearly to ``teacher_temp``."""
    warmup_teacher_temp_fraction: float = 0.3
    """Fraction of training over which the teacher temperature warms up (the paper: 30 of 100 epochs)."""
    center_momentum: float = 0.9
    """Running mean of the centre: c <- m * c + (1 - m) * batch mean of the teacher's outputs."""
    ema_start: float = 0.996
    """Teacher momentum at step 0, rising on a half cosine to ``ema_end``."""
    ema_end: float = 1.0
    """Teacher momentum at the last step."""
    freeze_last_layer_fraction: float = 0.01
    """The head's last layer gets no update for this fraction of training (the paper: 1 of 100 epochs)."""
    koleo: float = 0.0
    """Weight of DINOv2's KoLeo regulariser on the student's pooled global features (0 = off; DINOv2: 0.1)."""
    color_jitter: float = 0.8
    """Probability of colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) on every view."""
    grayscale: float = 0.2
    """Probability of turning a colour view grey."""
    blur: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])
    """Gaussian-blur probability of [global view 1, global view 2, each local view]."""
    solarize: float = 0.2
    """Solarisation probability of global view 2 (the other views are never solarised)."""
    hflip: bool = True
    """Random horizontal flips (off for data whose left and right differ in meaning)."""

    def __post_init__(self) -> None:
        check(self.local_crops >= 0 and self.local_size >= 0, "dino.local_crops and dino.local_size must be >= 0")
        for name in ("global_scale", "local_scale"):
            low, high = getattr(self, name)
            check(0 < low <= high <= 1, f"dino.{name} must be [low, high] within (0, 1]")
        check(min(self.hidden_dim, self.bottleneck_dim) >= 1, "dino.hidden_dim and dino.bottleneck_dim must be >= 1")
        check(self.out_dim >= 2, "dino.out_dim must be >= 2 (over one prototype every loss is 0)")
        check(min(self.student_temp, self.teacher_temp, self.warmup_teacher_temp) > 0, "dino temperatures must be > 0")
        check(0 <= self.warmup_teacher_temp_fraction <= 1 and 0 <= self.freeze_last_layer_fraction <= 1,
              "dino fractions must be in [0, 1]")
        check(0 <= self.center_momentum < 1 and 0 <= self.ema_start <= self.ema_end <= 1,
              "dino.center_momentum must be in [0, 1) and 0 <= ema_start <= ema_end <= 1")
        check(self.koleo >= 0, "dino.koleo must be >= 0")
        check(len(self.blur) == 3 and all(0 <= p <= 1 for p in [*self.blur, self.color_jitter, self.grayscale,
                                                                   self.solarize]),
              "dino.blur must be 3 probabilities; dino.color_jitter, grayscale and solarize in [0, 1]")


def local_size(config: DINOConfig, image_size: int, patch: int) -> int:
    if config.local_size:
        return config.local_size
    return max(patch, round(image_size * 96 / 224 / patch) * patch)


def view_transform(size: int, scale: list[float], data, config: DINOConfig, blur: float,
                   solarize: float) -> v2.Compose:
    """One view: random resized crop, flip, colour jitter and greyscale (``dino.*`` probabilities),
    Gaussian blur (probability ``blur``; sigma 0.1-2 px at 224 px, scaled to ``size``),
    solarisation (``solarize``), then the run's normalisation."""
    sigma = (0.1 * size / 224, 2.0 * size / 224)
    kernel = 2 * math.ceil(3 * sigma[1]) + 1
    colour = [v2.ColorJitter(0.4, 0.4, 0.2, 0.1)] if data.channels == 3 else [v2.ColorJitter(0.4, 0.4)]
    steps: list = [v2.ToImage(), *([v2.Grayscale(1)] if data.channels == 1 else []),
                   v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=v2.InterpolationMode.BICUBIC,
                                        antialias=True),
                   *([v2.RandomHorizontalFlip()] if config.hflip else []),
                   v2.RandomApply(colour, p=config.color_jitter)]
    if data.channels == 3:
        steps.append(v2.RandomGrayscale(p=config.grayscale))
    steps += [v2.RandomApply([v2.GaussianBlur(kernel, sigma)], p=blur), v2.RandomSolarize(128, p=solarize),
              ToNormalized(data.channels, tuple(data.mean), tuple(data.std))]
    return v2.Compose(steps)


def multi_crop(config: DINOConfig, data, patch: int) -> MultiView:
    """The paper's recipe by default (``dino.blur``, ``dino.solarize``): global view 1 always blurred,
    global view 2 rarely blurred and sometimes solarised, local views half the time blurred."""
    small = local_size(config, data.image_size, patch)
    first, second, local = config.blur
    return MultiView([view_transform(data.image_size, config.global_scale, data, config, first, 0.0),
                      view_transform(data.image_size, config.global_scale, data, config, second, config.solarize),
                      *[view_transform(small, config.local_scale, data, config, local, 0.0)
                        for _ in range(config.local_crops)]])


class DINOHead(nn.Module):
    """[B, D] -> [B, out_dim]: a 3-layer MLP to a bottleneck, L2-normalised, then a weight-normalised
    linear layer whose norm is fixed at 1 (the paper's ``norm_last_layer``)."""

    def __init__(self, in_dim: int, config: DINOConfig) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, config.hidden_dim), nn.GELU(),
                                 nn.Linear(config.hidden_dim, config.hidden_dim), nn.GELU(),
                                 nn.Linear(config.hidden_dim, config.bottleneck_dim))
        self.mlp.apply(init_weights)
        self.last_layer = nn.Parameter(torch.empty(config.out_dim, config.bottleneck_dim))
        nn.init.trunc_normal_(self.last_layer, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.last_layer, dim=-1))


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's Kozachenko-Leonenko regulariser: minus the mean log distance of each (normalised)
    feature to its nearest neighbour in the batch: spreads the features over the sphere."""
    unit = F.normalize(features, dim=-1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-2.0)
    nearest = unit[similarity.argmax(dim=1)]
    return -torch.log((unit - nearest).norm(dim=-1) + eps).mean()


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], student_temp: float) -> torch.Tensor:
    """student: logits [B, K] of every view (globals first); teacher: centred, sharpened
    probabilities [B, K] of the global views -> the mean over (teacher view, other student view)
    pairs of the cross-entropy H(teacher, softmax(student / student_temp))."""
    total, pairs = student[0].new_zeros(()), 0
    for t_index, target in enumerate(teacher):
        for s_index, logits in enumerate(student):
            if s_index == t_index:
                continue  # never the same view on both sides
            total = total - (target * F.log_softmax(logits / student_temp, dim=-1)).sum(dim=-1).mean()
            pairs += 1
    return total / pairs


class Student(nn.Module):
    """Backbone + head: what the optimizer trains and compile / DDP wrap (the teacher stays out).
    Its attribute names are DINO's own, so parameter names match the objective's."""

    def __init__(self, backbone: VisionTransformer, head: DINOHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Views [B, C, h, w] (2 global, then local) -> (head logits [B, K] per view, the global
        views' pooled features [2B, D]); one pass per resolution."""
        pooled = self.backbone(torch.cat(views[:2]))
        logits = list(self.head(pooled).chunk(2))
        if len(views) > 2:  # chunked per resolution: no [V * B, K] copy forward and back
            logits += self.head(self.backbone(torch.cat(views[2:]))).chunk(len(views) - 2)
        return logits, pooled


class DINO(Objective):
    transform_preset = "mae"  # unused for training (``views`` is the recipe); evaluation resizes and crops
    batch_fields = ("image",)

    def __init__(self, backbone: VisionTransformer, config: DINOConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = DINOHead(backbone.embed_dim, config)
        self.teacher = copy.deepcopy(backbone).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.config = config
        object.__setattr__(self, "student", Student(self.backbone, self.head))  # not a submodule: same names
        # buffers: a resumed run goes on with the centre, momentum and temperature it had
        self.register_buffer("center", torch.zeros(1, config.out_dim))
        self.register_buffer("momentum", torch.tensor(config.ema_start, dtype=torch.float64))
        self.register_buffer("teacher_temp", torch.tensor(config.warmup_teacher_temp, dtype=torch.float64))

    def encoder(self) -> VisionTransformer:
        """Evaluation and export use the teacher backbone (the paper's better one)."""
        return self.teacher

    def views(self, data) -> MultiView:
        return multi_crop(self.config, data, self.backbone.patch_size)

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def trainable_module(self) -> Student:
        return self.student

    @torch.no_grad()
    def forward_teacher(self, views: list[torch.Tensor]) -> torch.Tensor:
        """The global views -> teacher logits [2B, K] (no drop path: eval mode)."""
        self.teacher.eval()
        return self.teacher_head(self.teacher(torch.cat(views[:2])))

    def forward(self, batch: dict[str, Any]) -> Output:
        views = batch["image"]
        if not isinstance(views, list) or len(views) < 2:
            raise ValueError("DINO needs its multi-crop views (batch['image'] as a list: 2 global, then local)")
        student, pooled = self.trainable(views)
        teacher_logits = self.forward_teacher(views)
        teacher = F.softmax((teacher_logits - self.center) / float(self.teacher_temp), dim=-1)
        loss = dino_loss(student, list(teacher.chunk(2)), self.config.student_temp)
        metrics = self.health(teacher)
        object.__setattr__(self, "last_health", metrics)  # read by on_step_end's collapse check
        if self.config.koleo:
            koleo = sum(koleo_loss(part) for part in pooled.chunk(2)) / 2
            loss = loss + self.config.koleo * koleo
            metrics["koleo"] = koleo.detach()
        self.update_center(teacher_logits)
        return Output(loss, {**metrics, "teacher_temp": float(self.teacher_temp), "ema_momentum": float(self.momentum)})

    @torch.no_grad()
    def health(self, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        """The two collapse modes, in nats (log K = uniform): ``teacher_entropy`` (per sample) near
        log K = every output uniform; ``teacher_kl_to_uniform`` (of the batch-mean distribution)
        near log K = every sample on the same prototype."""
        entropy = -(teacher * torch.log(teacher + 1e-12)).sum(dim=-1).mean()
        mean = teacher.mean(dim=0)
        kl = (mean * torch.log(mean * mean.numel() + 1e-12)).sum()
        return {"teacher_entropy": entropy, "teacher_kl_to_uniform": kl}

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        batch_center = all_reduce_mean(teacher_logits.mean(dim=0, keepdim=True))
        self.center.mul_(self.config.center_momentum).add_(batch_center, alpha=1 - self.config.center_momentum)

    def after_backward(self, step: int, max_steps: int) -> None:
        """The head's last layer stays as initialised for the first steps (the paper's first epoch)."""
        if step <= int(self.config.freeze_last_layer_fraction * max_steps):
            self.head.last_layer.grad = None

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """Teacher <- EMA of the student (momentum on a half cosine to ema_end); the teacher
        temperature for the next step (linear warm-up)."""
        config = self.config
        momentum = cosine_momentum(step, max_steps, config.ema_start, config.ema_end)
        self.momentum.fill_(momentum)
        ema_update(self.teacher, self.backbone, momentum)
        ema_update(self.teacher_head, self.head, momentum)
        warmup = config.warmup_teacher_temp_fraction * max_steps
        if step % COLLAPSE_EVERY == 0 and step >= warmup and is_first_process():
            problem = collapse_warning(self.__dict__.get("last_health"), config.out_dim)
            if problem:
                print(f"warning: step {step}: {problem}", file=sys.stderr)
        progress = min(step / warmup, 1.0) if warmup > 0 else 1.0
        self.teacher_temp.fill_(config.warmup_teacher_temp + (config.teacher_temp - config.warmup_teacher_temp) * progress)


COLLAPSE_EVERY = 50
"""Steps between collapse checks after the teacher-temperature warm-up (each reads two numbers)."""


def collapse_warning(health: dict[str, torch.Tensor] | None, out_dim: int) -> str | None:
    """A sentence when the teacher is in a collapse mode: near-uniform outputs (entropy >= 98% of
    log K) or one prototype for every image (the batch mean's KL to uniform >= 90% of log K)."""
    if not health:
        return None
    log_k = math.log(out_dim)
    entropy, kl = float(health["teacher_entropy"]), float(health["teacher_kl_to_uniform"])
    if entropy >= 0.98 * log_k:
        return (f"DINO's teacher output is near uniform (entropy {entropy:.2f} of log K = {log_k:.2f} nats): "
                "collapsed; more steps, a lower dino.teacher_temp or a smaller dino.out_dim may help")
    if kl >= 0.9 * log_k:
        return (f"DINO's teacher puts every image on the same prototype (KL to uniform {kl:.2f} of "
                f"{log_k:.2f} nats): collapsed; a higher dino.center_momentum or a lower learning rate may help")
    return None


def build(config: PretrainConfig, artifacts: dict[str, bytes]) -> DINO:
    small, patch = local_size(config.dino, config.data.image_size, config.model.patch_size), config.model.patch_size
    check(small % patch == 0, f"dino.local_size={small} must be a multiple of model.patch_size={patch}")
    return DINO(VisionTransformer(config.model, config.data.image_size, config.data.channels), config.dino)


SPEC = ObjectiveSpec(
    name="dino", build=build, section="dino", section_type=DINOConfig,
    # the paper's recipe: AdamW, lr 5e-4 per 256 with warm-up, weight decay 0.04 -> 0.4 (cosine),
    # gradient clipping at 3, CLS-pooled ViT
    defaults={"optim": {"base_lr": 5e-4, "weight_decay": 0.04, "weight_decay_end": 0.4, "warmup_fraction": 0.1,
                        "min_lr": 1e-6, "clip_grad": 3.0}},
    summary="DINO: self-distillation to an EMA teacher over multi-crop views (centring, sharpening)",
)
