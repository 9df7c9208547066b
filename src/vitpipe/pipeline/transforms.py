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
