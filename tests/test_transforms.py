"""The fused normalisation tail gives torchvision's pixels exactly, on every input the presets feed it."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from vitpipe.pipeline.transforms import ToNormalized, TransformSpec, build_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def torchvision_tail(channels, mean, std):
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_to_normalized_equals_torchvision_on_pil_images(mode):
    rng = np.random.default_rng(0)
    channels = 3 if mode == "RGB" else 1
    shape = (23, 31, 3) if mode == "RGB" else (23, 31)
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    mean, std = MEAN[:channels], STD[:channels]
    ours = ToNormalized(channels, mean, std)(image)
    theirs = torchvision_tail(channels, list(mean), list(std))(image)
    assert ours.shape == (channels, 23, 31) and ours.dtype == torch.float32
    assert torch.equal(ours, theirs.as_subclass(torch.Tensor))


def test_to_normalized_equals_torchvision_on_uint8_tensors_and_refuses_floats():
    image = torch.randint(0, 256, (3, 17, 9), dtype=torch.uint8)
    theirs = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(MEAN), list(STD))])(image)
    assert torch.equal(ToNormalized(3, MEAN, STD)(image), theirs)
    assert torch.equal(ToNormalized(3)(image), v2.ToDtype(torch.float32, scale=True)(image))  # preset "none"
    with pytest.raises(TypeError):
        ToNormalized(3)(image.float())
    with pytest.raises(ValueError):
        ToNormalized(3, MEAN, (1.0, 0.0, 1.0))


@pytest.mark.parametrize("channels", [3, 1])
def test_eval_preset_matches_the_torchvision_pipeline_it_replaced(channels):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (40, 28, 3), dtype=np.uint8), "RGB")
    mean, std = [0.5] * channels, [0.25] * channels
    reference = v2.Compose([*([v2.Grayscale(1)] if channels == 1 else []),
                            v2.Resize(32, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                            v2.CenterCrop(32), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(mean, std)])
    spec = TransformSpec("eval", 32, channels, mean=(0.5,) * 3, std=(0.25,) * 3)
    ours = build_transform(spec)(image)
    assert ours.shape == (channels, 32, 32)
    assert torch.equal(ours, reference(image).as_subclass(torch.Tensor))


@pytest.mark.parametrize("channels,hflip,size", [(3, True, 28), (1, True, 16), (3, False, 32)])
def test_training_preset_equals_the_v2_chain_it_replaced(channels, hflip, size):
    """The same crops, flips and pixels as ToImage + RandomResizedCrop + RandomHorizontalFlip, draw
    for draw: a run's augmentations (and MAE's golden losses) do not move."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              [(28, 28), (40, 25), (7, 90), (300, 200)] * 10]  # the last two: the fallback central crop
    steps = [v2.Grayscale(1)] if channels == 1 else []
    steps += [v2.ToImage(), v2.RandomResizedCrop(size, scale=(0.3, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                                                 antialias=True)]
    steps += [v2.RandomHorizontalFlip()] if hflip else []
    reference = v2.Compose([*steps, ToNormalized(channels, (0.5,), (0.25,))])
    ours = build_transform(TransformSpec("mae", size, channels, 0.3, hflip, (0.5,) * 3, (0.25,) * 3))
    for seed in range(3):
        outputs, next_draw = [], []
        for transform in (reference, ours):
            torch.manual_seed(seed)
            outputs.append([transform(image) for image in images] + [transform(v2.functional.pil_to_tensor(images[0]))])
            next_draw.append(torch.rand(1).item())  # the RNG is left where v2 leaves it
        assert all(torch.equal(a, b) for a, b in zip(*outputs)) and next_draw[0] == next_draw[1]
