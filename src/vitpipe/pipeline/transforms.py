"""torchvision v2 presets, named so configs can declare them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
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
        steps.append(RandomCropFlip(size, (spec.crop_scale_min, 1.0), spec.hflip))
    else:
        # resized while still a PIL image (PIL's bicubic), as timm, open_clip and transformers do: the
        # same pixels, so an exported model gives vitpipe's features through the tool's own transform
        # (torch's antialiased bicubic is off by one grey level on some pixels)
        steps += [v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(size)]
    if spec.preset == "none":
        steps.append(ToNormalized(spec.channels))
    else:
        steps.append(ToNormalized(spec.channels, spec.mean, spec.std))
    return v2.Compose(steps)


class RandomCropFlip:
    """v2.ToImage + v2.RandomResizedCrop(bicubic, antialiased) + v2.RandomHorizontalFlip, the same
    random draws from the torch RNG and the same kernels, called directly: v2's per-transform
    dispatch cost more than the work on small images (with normalising, ~280-310 instead of
    ~380-470 us a 28 px sample; benchmarks/crop_flip_speed.py). A PIL image or a uint8 [C, H, W] tensor ->
    uint8 [C, H, W] tensor, bit-identical to the v2 chain (tests/test_transforms.py)."""

    def __init__(self, size: int, scale: tuple[float, float], hflip: bool = True) -> None:
        self.crop = v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        self.hflip = hflip

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        tensor = (v2.functional.pil_to_tensor(image) if isinstance(image, Image.Image)
                  else image).as_subclass(torch.Tensor)
        box = self.crop.make_params([tensor])
        out = v2.functional.resized_crop_image(tensor, **box, size=self.crop.size,
                                               interpolation=self.crop.interpolation, antialias=True)
        if self.hflip and torch.rand(1) < 0.5:  # v2.RandomHorizontalFlip(p=0.5): flips unless rand >= p
            out = v2.functional.horizontal_flip_image(out)
        return out


class ToNormalized:
    """A PIL image or a uint8 [C, H, W] tensor -> float32 ``(x / 255 - mean) / std`` (mean 0, std 1
    when not given; the first ``channels`` values, or one value for all): torchvision's ToImage +
    ToDtype(scale=True) + Normalize, the same operations
    in the same order, so bit-identical, at ~23 instead of ~150 us a sample (benchmarks/RESULTS.md,
    "The 12-block linear probe"). Returns a plain tensor, [C, H, W]."""

    def __init__(self, channels: int, mean: tuple[float, ...] = (0.0,), std: tuple[float, ...] = (1.0,)) -> None:
        self.mean = torch.tensor((list(mean) * channels)[:channels], dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor((list(std) * channels)[:channels], dtype=torch.float32).view(-1, 1, 1)
        if not bool((self.std != 0).all()):
            raise ValueError("std evaluated to zero, leading to division by zero")

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, Image.Image):
            array = np.array(image, copy=True)
            tensor = torch.from_numpy(array if array.ndim == 3 else array[:, :, None]).permute(2, 0, 1)
        else:
            tensor = image.as_subclass(torch.Tensor)
        if tensor.dtype != torch.uint8:
            raise TypeError(f"ToNormalized takes uint8 images; got {tensor.dtype}")
        return tensor.to(torch.float32).mul_(1.0 / 255).sub_(self.mean).div_(self.std)


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
