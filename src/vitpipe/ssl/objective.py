"""What an objective is to the rest of vitpipe.

An objective is an ``nn.Module`` with ``forward(batch) -> Output`` plus an ``ObjectiveSpec`` that
says everything else about it (config section and recipe defaults, artefacts fitted from the
data, how to build it). What evaluation and export see is its ``encoder()``: any module that
follows the ``Encoder`` protocol, a ViT or not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class Output:
    loss: torch.Tensor
    """Scalar to minimise."""
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)
    """Extra scalars to log (detached by the trainer)."""


@runtime_checkable
class Encoder(Protocol):
    """The module kept after pretraining: evaluated (features, probes, k-NN) and exported."""

    embed_dim: int
    """Width of the features ``pool`` returns."""

    @property
    def depth(self) -> int:
        """Blocks ``intermediate_layers`` can return (0-based indices)."""

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] normalized images -> tokens [B, T, D] after the last block."""

    def intermediate_layers(self, images: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """Tokens [B, T, D] after each block in ``layers`` (0-based; negative counts from the end)."""

    def pool(self, tokens: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """[B, T, D] -> [B, D] by the encoder's own pooling, or ``pool`` (cls | gap | map) when given."""


BatchHook = Callable[[dict[str, Any], torch.Generator], dict[str, Any]]
ReadSamples = Callable[[tuple[str, ...], int], Iterator[dict[str, Any]]]


class Objective(nn.Module):
    """Base class. Subclasses set the class attributes and implement ``forward``.

    They never touch devices, files, loggers or distributed state: the trainer does. The
    exceptions are the collectives ``vitpipe.ssl.engine.distributed`` names for objectives
    (``gather_with_grad``, ``gather_others``, ``is_first_process``, ``all_reduce_mean``): a
    contrastive loss needs the global batch, a centring its global mean. Every hook the trainer calls is declared here with its default; the trainer
    never looks for a method that is not.
    """

    transform_preset: str = "mae"
    """Loader augmentation preset (see vitpipe.pipeline.transforms)."""
    batch_fields: tuple[str, ...] = ("image",)
    """Fields the loader must put in each batch (image, label, text, key)."""

    accumulates_step: bool = False
    """True for a loss whose negatives span the whole optimizer step (CLIP's gradient cache): with
    ``train.grad_accum > 1`` the trainer hands the step's micro-batches to ``accumulate`` instead
    of calling ``forward`` on each."""

    def forward(self, batch: dict[str, Any]) -> Output:  # pragma: no cover - abstract
        raise NotImplementedError

    def accumulate(self, batches: list[dict[str, Any]], backward: Callable[[torch.Tensor], None]) -> Output:
        """One step's micro-batches (only when ``accumulates_step``): call ``backward(loss)`` once per
        micro-batch (each process's gradients are its own samples' share; the trainer sums them
        over processes) and return the step's Output."""
        raise NotImplementedError(f"{type(self).__name__} sets accumulates_step but has no accumulate()")

    def on_step_end(self, step: int, max_steps: int) -> None:
        """Called after every optimizer step (e.g. EMA updates), with the step just done."""

    def after_backward(self, step: int, max_steps: int) -> None:
        """Called between the step's last backward and the optimizer step, with the step being
        made (1-based): gradients may be changed here (e.g. DINO drops its last layer's for the
        first steps; a parameter whose ``grad`` is None is not updated, nor decayed)."""

    def views(self, data) -> Callable[[Any], list[torch.Tensor]] | None:
        """The objective's own data recipe for training (``DataConfig`` in): a picklable image ->
        list of views (``vitpipe.pipeline.transforms.MultiView``); ``batch["image"]`` is then a
        list of [B, C, h, w] tensors, one per view. None: one view by ``transform_preset``."""
        return None

    def batch_hook(self) -> BatchHook | None:
        """A picklable function the loader workers run on each finished batch, with a generator
        seeded by the batch's data position (so a resumed run draws the same): I-JEPA's masks,
        tokenisation, palette quantisation. (MAE draws its masks in ``forward`` from the torch RNG,
        an order its golden per-step losses pin.)"""
        return None

    def encoder(self) -> nn.Module:
        """The module kept after pretraining (follows ``Encoder``; exported, evaluated)."""
        raise NotImplementedError

    def trainable_module(self) -> nn.Module:
        """What the optimizer trains and compile and DDP wrap: the whole objective by default. An
        objective with a teacher returns its student (a module whose attribute names match the
        objective's, so parameter names agree) and calls it as ``self.trainable(...)`` in forward.

        Every parameter of it is in the optimizer from the start, frozen or not: a parameter
        unfrozen later (``requires_grad_(True)``) is trained from then on, one frozen later is
        neither updated nor decayed. Constants (a sin-cos table) are buffers, not parameters."""
        return self

    def bind_trainable(self, runner: Callable[..., Any] | None) -> None:
        """The trainer hands over the compiled / DDP-wrapped ``trainable_module()`` (kept outside
        the module tree: state dicts and parameter names stay the objective's own)."""
        object.__setattr__(self, "_trainable_runner", runner)

    def trainable(self, *args: Any, **kwargs: Any) -> Any:
        """Call the trainable module: through its wrapper when the trainer bound one."""
        runner = self.__dict__.get("_trainable_runner")
        return (runner if runner is not None else self.trainable_module())(*args, **kwargs)

    def lr_scale(self, name: str) -> float:
        """Multiplier of the learning rate for parameter ``name`` (layer-wise decay)."""
        return 1.0

    def no_weight_decay(self) -> set[str]:
        """Parameter names (full dotted names) excluded from weight decay besides norms and biases."""
        return set()


@dataclass(frozen=True)
class ObjectiveCommand:
    """A command an objective adds to the CLI (its own evals): `vitpipe eval NAME` or `vitpipe NAME`."""

    name: str
    """Its name on the command line (e.g. ``zero-shot``)."""
    function: Callable[..., None]
    """A typer command function (its parameters are the options; its docstring the help)."""
    group: str = "eval"
    """"eval" (`vitpipe eval NAME`) or "" (`vitpipe NAME`)."""


@dataclass(frozen=True)
class ObjectiveSpec:
    """Everything the rest of vitpipe needs to know about an objective: its registry entry."""

    name: str
    """What `vitpipe pretrain NAME` calls it."""
    build: Callable[[Any, dict[str, bytes]], Objective]
    """(resolved config, artefacts by file name) -> the objective, freshly initialised."""
    section: str | None = None
    """Its own config section (e.g. ``mae``), of type ``section_type``."""
    section_type: type | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    """Its recipe, layered under the YAML and `key=value` overrides (e.g. CLIP's AdamW betas)."""
    fit_artifacts: Callable[[Any, ReadSamples], dict[str, bytes]] | None = None
    """(config, read) -> {file name: bytes}, fitted once from the training shards before training
    (a tokenizer, a palette); ``read(fields, limit)`` yields decoded batches. Saved under
    RUN/artifacts/, checksummed in run.json, handed to ``build`` by every later command."""
    encoder_init: Callable[[Any], str] | None = None
    """(config) -> a run or checkpoint whose trained encoder starts this one ("" = none; CLIP's
    ``clip.image_init``). The engine refuses one of another shape before the run starts, and hands
    its weights to ``build`` as the artefact ``vitpipe.ssl.engine.warmstart.ENCODER_INIT``."""
    preflight: Callable[[Any], None] | None = None
    """(config) -> None, raising ConfigError for a training run this machine cannot do (e.g. a step
    that would not fit in memory); called before every training session, never at evaluation."""
    summary: str = ""
    """One line for `vitpipe pretrain --help` and `vitpipe config show --objective`."""
    probe_layers: str = "last"
    """Where `vitpipe compare` probes by default: "last" (the output) or "all" (every block, for
    objectives whose best features sit mid-stack, as iGPT's do)."""
    needs: tuple[str, ...] = ()
    """Sample fields beyond the image that training reads ("text": every sample must carry one;
    "label": unlabelled samples are left out). The shards are checked for them before anything is
    fitted or built, so a shard set that cannot serve the objective is one line, not a worker error."""
    towers: tuple[str, ...] = ("image",)
    """What it embeds: ("image",), or ("image", "text") for image-text models (zero-shot, text retrieval)."""
    renamed: dict[str, str] = field(default_factory=dict)
    """Old key -> new key of its section: a run config written before a rename reads as the new one."""
    commands: tuple[ObjectiveCommand, ...] = ()
    """Its own evals, found by the CLI here (CLIP's zero-shot, iGPT's bits-per-dim and sample); a
    name a built-in command or an earlier objective already has is left out with a warning."""
    figures: tuple[Callable[[Any], Any], ...] = ()
    """Its report figures: (``vitpipe.report.sections.FigureContext``) -> (title, caption, PNG) or
    None when the run has nothing to draw; drawn before the figures every encoder gets."""
