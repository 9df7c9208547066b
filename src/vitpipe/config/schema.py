"""The config schemas: one dataclass per concept, a docstring per field, checks in
``__post_init__``. Objectives add their own section through ``with_section``."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A bad config file, key or value. The CLI prints it as one line and exits with code 2."""


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``condition``: for ``__post_init__`` validations."""
    if not condition:
        raise ConfigError(message)


# ---------------------------------------------------------------------------------------------
# Ingest
# ---------------------------------------------------------------------------------------------


@dataclass
class IngestConfig:
    image_size: int = 0
    """Resize so the image fits this size (pixels); 0 keeps the original size."""
    resize_mode: str = "border"
    """img2dataset resize mode for URL lists and local sources: no | keep_ratio | center_crop | border."""
    encode_format: str = "auto"
    """Stored image format: jpg | png | webp | auto (png for sources that are lossless, jpg for URLs)."""
    encode_quality: int = 95
    """JPEG/WebP quality (PNG ignores it)."""
    shard_size: int = 10_000
    """Samples per shard."""
    url_col: str = "url"
    """Column holding the image URL in a URL list."""
    caption_col: str | None = None
    """Column holding a caption in a URL list; stored as `txt`."""
    processes: int = 1
    """img2dataset download processes."""
    threads: int = 16
    """img2dataset download threads per process."""
    distributor: str = "local"
    """Where a URL list is downloaded and post-processed: local (img2dataset's processes on this
    machine) | pyspark (download, dedup and re-sharding as Spark tasks; `pip install vitpipe[spark]`
    and a Java runtime; OUT must be on a filesystem every executor sees)."""
    spark_master: str = ""
    """Spark master URL for distributor=pyspark ("" = $SPARK_MASTER, else what spark-submit set,
    else local[processes])."""
    timeout: float = 10.0
    """Seconds before a download is given up."""
    retries: int = 0
    """Extra attempts for a failed download."""
    max_download_bytes: int = 20_000_000
    """Largest accepted download body; larger bodies are counted as failures."""
    max_pixels: int = 40_000_000
    """Largest accepted decoded image (width x height); guards against decompression bombs."""
    allow_schemes: list[str] = field(default_factory=lambda: ["http", "https"])
    """URL schemes that are fetched; anything else is counted as a failure (`bad_scheme`)."""
    allow_networks: list[str] = field(default_factory=list)
    """CIDRs fetched although they are loopback, private, link-local or reserved (refused by default,
    checked after DNS and at every redirect), e.g. `allow_networks=127.0.0.1/32,10.1.0.0/16`."""
    min_size: int = 0
    """Drop images whose shorter side (original size) is below this many pixels."""
    max_aspect: float = 0.0
    """Drop images whose long/short side ratio exceeds this; 0 disables the filter."""
    dedup: bool = True
    """Drop exact duplicates (same decoded-image bytes hash)."""
    val_fraction: float = 0.0
    """Fraction of samples carved out as a validation split (by key hash, so stable across reruns)."""
    seed: int = 0
    """Seed of the train/val split and of the shuffle."""
    shuffle: bool = True
    """Write samples in a seeded random order, so every shard holds a mix of classes (folders, IDX
    and HF datasets list them class by class). URL lists keep the list's own order."""
    image_col: str = "image"
    """Hugging Face datasets: image column."""
    label_col: str | None = "label"
    """Integer label column of a URL list or Hugging Face dataset (ignored when missing)."""
    split_col: str | None = None
    """URL lists: a column naming each row's split (train, test, ...; letters, digits, `_.-`); each
    split goes to OUT/<split>/, an empty cell to train. A test split is kept whole (no dedup), as
    Fashion-MNIST's and Hugging Face's own test splits are; a row with another name fails as bad_split."""
    text_col: str | None = None
    """Hugging Face datasets: caption column."""
    split: str = ""
    """Hugging Face datasets: take only this split ("" = every split the dataset has, each to OUT/<split>/)."""
    filename_captions: bool = False
    """Image folders: an image without a sidecar .txt gets its file name as caption
    (`red_sports-car.png` -> "red sports car"), e.g. for clip-art collections titled by file name."""
    background: str = "white"
    """Colour transparent pixels are composited on (any PIL colour: white, black, gray, #808080).
    URL lists are decoded by img2dataset, which composites on white: other colours are refused there."""
    max_failed_fraction: float = 1.0
    """Exit 1 (after writing the manifest) when more than this fraction of rows failed, so a
    scheduled pipeline stops before pretraining; an ingest that wrote nothing always exits 1.
    Not part of the shards' identity: changing it never asks for --overwrite."""

    def __post_init__(self) -> None:
        check(self.image_size >= 0, "ingest.image_size must be >= 0")
        check(self.resize_mode in ("no", "keep_ratio", "center_crop", "border"),
               "ingest.resize_mode must be one of no|keep_ratio|center_crop|border")
        check(self.encode_format in ("auto", "jpg", "png", "webp"), "ingest.encode_format must be auto|jpg|png|webp")
        check(1 <= self.encode_quality <= 100, "ingest.encode_quality must be in 1..100")
        check(self.shard_size >= 1, "ingest.shard_size must be >= 1")
        check(self.processes >= 1 and self.threads >= 1, "ingest.processes and ingest.threads must be >= 1")
        check(self.distributor in ("local", "pyspark"), "ingest.distributor must be local or pyspark")
        check(self.timeout > 0, "ingest.timeout must be > 0")
        check(self.retries >= 0, "ingest.retries must be >= 0")
        check(self.max_pixels > 0 and self.max_download_bytes > 0, "ingest size bounds must be > 0")
        check(0.0 <= self.val_fraction < 1.0, "ingest.val_fraction must be in [0, 1)")
        check(0.0 <= self.max_failed_fraction <= 1.0, "ingest.max_failed_fraction must be in [0, 1]")
        check(self.max_aspect == 0 or self.max_aspect >= 1, "ingest.max_aspect must be 0 (off) or >= 1")
        from PIL import ImageColor

        try:
            ImageColor.getrgb(self.background)
        except ValueError:
            raise ConfigError(f"ingest.background: {self.background!r} is not a colour (white, black, #808080)") from None
        for cidr in self.allow_networks:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigError(f"ingest.allow_networks: {cidr!r} is not a network (e.g. 127.0.0.1/32)") from None


# ---------------------------------------------------------------------------------------------
# Pretraining
# ---------------------------------------------------------------------------------------------

MODEL_PRESETS: dict[str, dict[str, int]] = {
    # CPU sizes for tests and laptop runs
    "micro": dict(embed_dim=64, depth=2, num_heads=2),
    "mini": dict(embed_dim=128, depth=4, num_heads=4),
    # the usual ViT sizes (timm names: vit_tiny/small/base/large_patchN_R)
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}


@dataclass
class DataConfig:
    shards: str = ""
    """Training shards: a directory written by `vitpipe ingest`, a brace pattern or a list file."""
    image_size: int = 32
    """Side of the square crops fed to the model."""
    channels: int = 3
    """Image channels given to the model (1 = greyscale, 3 = RGB)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = load in the training process)."""
    shuffle_buffer: int = 2000
    """Samples held in the shuffle buffer of each worker."""
    samples_per_epoch: int = 0
    """Samples per epoch and rank; 0 = the dataset's size (from sizes.json) divided by the world size."""
    resampled: bool = False
    """Draw shards with replacement (infinite stream; for multi-node runs with few shards)."""
    max_error_rate: float = 0.05
    """Abort when more than this fraction of samples fails to decode (after 100 samples), or when
    the samples a reader loses to damaged shards (those sizes.json lists after the break) in one
    pass exceed this fraction of the whole set."""
    subset_fraction: float = 1.0
    """Use only this fraction of the samples (a fixed subset chosen by key hash and train.seed)."""
    crop_scale_min: float = 0.2
    """Lower bound of RandomResizedCrop's area scale."""
    hflip: bool = True
    """Random horizontal flips."""
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    """Per-channel mean used to normalize images."""
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    """Per-channel std used to normalize images."""

    def __post_init__(self) -> None:
        check(self.image_size >= 4, "data.image_size must be >= 4")
        check(self.channels in (1, 3), "data.channels must be 1 or 3")
        check(self.num_workers >= 0, "data.num_workers must be >= 0")
        check(self.shuffle_buffer >= 0, "data.shuffle_buffer must be >= 0")
        check(self.samples_per_epoch >= 0, "data.samples_per_epoch must be >= 0")
        check(0 <= self.max_error_rate <= 1, "data.max_error_rate must be in [0, 1]")
        check(0 < self.subset_fraction <= 1, "data.subset_fraction must be in (0, 1]")
        check(0 < self.crop_scale_min <= 1, "data.crop_scale_min must be in (0, 1]")
        check(len(self.mean) == len(self.std) == 3, "data.mean and data.std need 3 values")


@dataclass
class ModelConfig:
    size: str = "tiny"
    """Preset: micro | mini | tiny | small | base | large (sets embed_dim, depth, num_heads)."""
    patch_size: int = 4
    """Side of a square patch in pixels."""
    embed_dim: int = 0
    """Token width; 0 = from the preset."""
    depth: int = 0
    """Transformer blocks; 0 = from the preset."""
    num_heads: int = 0
    """Attention heads; 0 = from the preset."""
    mlp_ratio: float = 4.0
    """MLP hidden width / token width."""
    class_token: bool = True
    """Prepend a CLS token."""
    pool: str = "cls"
    """Pooled feature: cls | gap (mean of patch tokens) | map (attention pooling)."""
    pos_embed: str = "sincos"
    """Position embedding: sincos (fixed 2D) | learned."""
    conv_stem: bool = False
    """Replace the patchify projection by a small convolutional stem (early convolutions)."""
    pre_norm: bool = False
    """LayerNorm on the embedded tokens before the first block (CLIP's ln_pre, timm's norm_pre);
    what transformers' CLIPModel needs for a --format hf export of a CLIP run."""
    drop_path: float = 0.0
    """Stochastic depth rate of the last block (linearly increasing)."""

    def __post_init__(self) -> None:
        check(self.size in MODEL_PRESETS, f"model.size must be one of {', '.join(MODEL_PRESETS)}")
        preset = MODEL_PRESETS[self.size]
        self.embed_dim = self.embed_dim or preset["embed_dim"]
        self.depth = self.depth or preset["depth"]
        self.num_heads = self.num_heads or preset["num_heads"]
        check(min(self.embed_dim, self.depth, self.num_heads) >= 1,
              "model.embed_dim, model.depth and model.num_heads must be >= 1 (0: the size preset's)")
        check(self.mlp_ratio > 0, "model.mlp_ratio must be > 0")
        check(self.patch_size >= 1, "model.patch_size must be >= 1")
        check(self.embed_dim % self.num_heads == 0, "model.embed_dim must be divisible by model.num_heads")
        check(self.pool in ("cls", "gap", "map"), "model.pool must be cls|gap|map")
        check(self.pool != "cls" or self.class_token, "model.pool=cls needs model.class_token=true")
        check(self.pos_embed in ("sincos", "learned"), "model.pos_embed must be sincos|learned")
        check(0 <= self.drop_path < 1, "model.drop_path must be in [0, 1)")


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4
    """Learning rate per 256 samples: lr = base_lr * global_batch / 256."""
    lr: float = 0.0
    """Absolute learning rate; when > 0 it replaces the base_lr scaling."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to norms, biases, position embeddings and tokens)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warmup steps; when 0, warmup_fraction of max_steps is used."""
    warmup_fraction: float = 0.05
    """Warmup length as a fraction of train.max_steps (used when warmup_steps is 0)."""
    clip_grad: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay_end: float | None = None
    """When set, weight decay follows a cosine from weight_decay to this value over training
    (I-JEPA: 0.04 -> 0.4); None keeps it constant."""

    def __post_init__(self) -> None:
        check(self.eps > 0, "optim.eps must be > 0")
        check(self.weight_decay_end is None or self.weight_decay_end >= 0, "optim.weight_decay_end must be >= 0")
        check(self.base_lr > 0 or self.lr > 0, "optim.base_lr or optim.lr must be > 0")
        check(self.weight_decay >= 0 and self.min_lr >= 0, "optim.weight_decay and optim.min_lr must be >= 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas needs two values in [0, 1)")
        check(self.warmup_steps >= 0 and 0 <= self.warmup_fraction < 1,
              "optim.warmup_steps must be >= 0 and optim.warmup_fraction in [0, 1)")
        check(self.clip_grad >= 0, "optim.clip_grad must be >= 0")


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps to train for (schedules are defined in steps)."""
    batch_size: int = 64
    """Samples per process per micro-batch; global batch = batch_size * grad_accum * world size."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    precision: str = "auto"
    """fp32 | bf16 | fp16 | auto (bf16 on GPUs that support it, fp32 on CPU)."""
    compile: bool | str = False
    """torch.compile the objective's trainable module: true | false | auto (decided from the run's
    own eager and then compiled steps, for sessions long enough to pay a compile back; the choice and
    its numbers in run.json; ssl/engine/compiling.py)."""
    grad_checkpointing: bool = False
    """Recompute every transformer block's activations in the backward pass (encoder, decoder,
    predictor, text tower): less activation memory for about a third more compute; same gradients."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state over the processes (FSDP2 ``fully_shard`` per
    transformer block) instead of replicating them (DDP). Checkpoints and encoder.safetensors stay
    consolidated (the same files as DDP's); one process trains unsharded."""
    seed: int = 0
    """Seed for parameters, masks, augmentation and data order."""
    log_every: int = 10
    """Log metrics every N steps."""
    ckpt_every_steps: int = 500
    """Checkpoint every N steps (0 = only at the end and on signals)."""
    ckpt_every_minutes: float = 30.0
    """Also checkpoint when this many minutes passed since the last one (0 = off)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept; older ones are pruned after a new one is written."""
    nan_policy: str = "error"
    """On a NaN/Inf loss: error (stop, exit 1) | skip (drop the step, stop after 10 in a row)."""
    tensorboard: bool = True
    """Write TensorBoard event files under RUN/tb."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb` and a login, or WANDB_MODE=offline)."""
    mlflow: bool = False
    """Also log to MLflow: a file store under RUN/mlruns, or the server MLFLOW_TRACKING_URI names."""
    deterministic: bool = False
    """Use deterministic algorithms (for bitwise-reproducible resume tests)."""
    health_every: int = 50
    """At step 1 and every N steps (at a logged step; step 1 is always logged), log the encoder's
    feature std and effective rank on the current batch; 0 disables it."""
    collapse_min_std: float = 1e-3
    """A `collapse` warning when the mean per-dimension std of pooled features falls below this ..."""
    collapse_min_rank: float = 1.5
    """... or their effective rank falls below this."""
    record_keys: bool = False
    """Audit: write the sample keys each process trained on (RUN/audit/rank*.jsonl) and a final
    parameter fingerprint per process."""

    def __post_init__(self) -> None:
        check(self.max_steps >= 1, "train.max_steps must be >= 1")
        check(self.batch_size >= 1 and self.grad_accum >= 1, "train.batch_size and train.grad_accum must be >= 1")
        check(self.precision in ("auto", "fp32", "bf16", "fp16"), "train.precision must be auto|fp32|bf16|fp16")
        check(self.compile in (True, False, "auto"), "train.compile must be true | false | auto")
        check(self.log_every >= 1, "train.log_every must be >= 1")
        check(self.ckpt_every_steps >= 0 and self.ckpt_every_minutes >= 0, "checkpoint intervals must be >= 0")
        check(self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
        check(self.nan_policy in ("error", "skip"), "train.nan_policy must be error|skip")
        check(self.health_every >= 0, "train.health_every must be >= 0")
        check(0 <= self.seed < 2**32, "train.seed must be in 0..2**32 - 1 (what torch and numpy accept)")


@dataclass
class PretrainConfig:
    """The sections every objective shares. Each objective adds its own section (``mae``,
    ``finetune``, ...) through ``with_section``; the registry does that for it."""

    objective: str = "mae"
    """Objective name from the registry (mae, ...)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards and augmentation."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Encoder shape (a ViT for most objectives)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop, precision, checkpoints and logging."""


_SECTIONED: dict[tuple[str, str, type | None], type] = {}


def with_section(objective: str, section: str | None, section_type: type | None) -> type:
    """The PretrainConfig of one objective: the shared sections plus ``section`` of type
    ``section_type`` (e.g. ``mae: MAEConfig``), with ``objective`` defaulting to its name."""
    key = (objective, section or "", section_type)
    if key not in _SECTIONED:
        fields: list[Any] = [("objective", str, field(default=objective))]
        if section:
            fields.append((section, section_type, field(default_factory=section_type)))
        name = f"PretrainConfig_{re.sub(r'[^0-9A-Za-z_]', '_', objective)}"
        cls = dataclasses.make_dataclass(name, fields, bases=(PretrainConfig,))
        cls.__module__ = __name__
        globals()[name] = cls  # picklable by reference
        _SECTIONED[key] = cls
    return _SECTIONED[key]
