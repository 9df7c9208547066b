"""torchvision v2 presets, named so configs can declare them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2


@dataclass(frozen=True)
class TransformSpec:
    preset: str
    """mae | finetune (both RandomResizedCrop(crop_scale_min..1) + flip) | eval (resize + center crop) | none."""
    image_size: int
    channels: int = 3
    crop_scale_min: float = 0.2
    hflip: bool = True
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def for_eval(cls, data) -> "TransformSpec":
        """Resize + centre crop at ``data.image_size`` with ``data``'s normalisation (a DataConfig):
        what every evaluation, fitter and report figure feeds a model."""
        return cls("eval", data.image_size, data.channels, mean=tuple(data.mean), std=tuple(data.std))


    @classmethod
    def for_training(cls, preset: str, data) -> "TransformSpec":
        """An objective's one-view training transform (``preset``) with ``data``'s crop, flip and
        normalisation settings (a DataConfig): the trainer's, and the FLOP count's."""
        return cls(preset, data.image_size, data.channels, data.crop_scale_min, data.hflip, tuple(data.mean),
                   tuple(data.std))


PRESETS = ("mae", "finetune", "eval", "none")


def build_transform(spec: TransformSpec) -> v2.Compose:
    if spec.preset not in PRESETS:
        raise ValueError(f"unknown transform preset {spec.preset!r}; choose from {', '.join(PRESETS)}")
    size = spec.image_size
    steps: list = []
    if spec.channels == 1:
        steps.append(v2.Grayscale(1))
    if spec.preset in ("mae", "finetune"):
        steps += [v2.ToImage(), v2.RandomResizedCrop(size, scale=(spec.crop_scale_min, 1.0),
                                                     interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
        if spec.hflip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        # resized while still a PIL image (PIL's bicubic), as timm, open_clip and transformers do: the
        # same pixels, so an exported model gives vitpipe's features through the tool's own transform
        # (torch's antialiased bicubic is off by one grey level on some pixels)
        steps += [v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(size),
                  v2.ToImage()]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if spec.preset != "none":
        mean, std = list(spec.mean)[: spec.channels], list(spec.std)[: spec.channels]
        steps.append(v2.Normalize(mean, std))
    return v2.Compose(steps)


class MultiView:
    """An objective's data recipe: one image -> a list of views, each by its own transform (any
    number, any resolution: DINO's 2 global + N local crops). Picklable, built in each loader
    worker; its random draws come from the torch RNG the loader seeds per batch, so a data
    position always gives the same views. The loader stacks view i of every sample into
    ``batch["image"][i]``."""

    def __init__(self, transforms: list) -> None:
        if not transforms:
            raise ValueError("a multi-view recipe needs at least one view")
        self.transforms = list(transforms)

    def __len__(self) -> int:
        return len(self.transforms)

    def __call__(self, image) -> list[torch.Tensor]:
        return [transform(image) for transform in self.transforms]

    def batch(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[B, C, H, W] uint8 images -> the views of each, stacked per view (tests, timing)."""
        per_image = [self(image) for image in images]
        return [torch.stack(views) for views in zip(*per_image)]
