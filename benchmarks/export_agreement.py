"""How closely each export of a CLIP run agrees with vitpipe: image and text embeddings through
open_clip's and transformers' own preprocessing and tokenizer (both transformers image backends),
and ONNX image features, on real non-square pictures and their titles; largest absolute difference.

    python benchmarks/export_agreement.py RUN --images /usr/share/openclipart/png --n 200

RUN must be a CLIP run trained with model.pool=cls model.pre_norm=true for the transformers row
(other runs: the open_clip and ONNX rows only). The original PNGs are read, not the shards: each
tool resizes and crops them itself.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitpipe.runlayout import RunLayout
from vitpipe.config import ConfigError
from vitpipe.export import export
from vitpipe.pipeline.images import to_rgb
from vitpipe.pipeline.transforms import TransformSpec, build_transform
from vitpipe.ssl.runs import load_run_objective


def sample(folder: Path, n: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    paths = sorted(folder.rglob("*.png"))
    random.Random(seed).shuffle(paths)
    images, titles = [], []
    for path in paths[:n]:
        with Image.open(path) as image:
            images.append(to_rgb(image.convert("RGBA")))
        titles.append(path.stem.rsplit("_", 1)[0].replace("_", " ").replace("-", " "))
    return images, titles


def ours(run: Path, images, titles):
    clip = load_run_objective(run)
    from vitpipe.ssl import registry

    data = registry.run_config(RunLayout.of(run).config).data
    transform = build_transform(TransformSpec.for_eval(data))
    pixels = torch.stack([transform(i) for i in images])
    with torch.no_grad():
        return clip.encode_image(pixels), clip.encode_text(clip.tokenize.encode(titles)[0]), pixels, clip


def open_clip_row(run: Path, out: Path, images, titles, want_image, want_text) -> str:
    import open_clip

    export(run, out, "open_clip")
    open_clip.add_model_config(out)
    model, _, preprocess = open_clip.create_model_and_transforms(RunLayout.of(run).root.name,
                                                                 pretrained=str(out / "open_clip_model.safetensors"))
    tokenizer = open_clip.get_tokenizer(RunLayout.of(run).root.name)
    with torch.no_grad():
        image = model.eval().encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
        text = model.encode_text(tokenizer(titles), normalize=True)
    return f"| open_clip | {(image - want_image).abs().max():.2e} | {(text - want_text).abs().max():.2e} |"


def hf_rows(run: Path, out: Path, images, titles, want_image, want_text, context: int, pixels) -> list[str]:
    import transformers

    export(run, out, "hf")
    model = transformers.CLIPModel.from_pretrained(out).eval()
    rows = []
    for backend in ("pil", "torchvision"):
        processor = transformers.CLIPProcessor.from_pretrained(out, backend=backend)
        inputs = processor(text=titles, images=images, return_tensors="pt", padding=True, truncation=True,
                           max_length=context)
        with torch.no_grad():
            result = model(**inputs)
        # transformers floors the centre crop's offset where torchvision rounds it (half to even)
        alike = (inputs["pixel_values"] - pixels).flatten(1).abs().amax(dim=1) < 1e-4
        image = (result.image_embeds - want_image).abs().amax(dim=1)
        rows.append(f"| transformers ({backend} images) | {image.max():.2e} (all); {image[alike].max():.2e} over the "
                    f"{int(alike.sum())} images whose pixels agree | {(result.text_embeds - want_text).abs().max():.2e} |")
    return rows


def onnx_row(run: Path, out: Path, pixels: torch.Tensor, clip) -> str:
    import onnxruntime as ort

    export(run, out, "onnx")
    session = ort.InferenceSession(str(out / "model.onnx"))
    with torch.no_grad():
        want = clip.backbone(pixels).numpy()
    got = session.run(["features"], {"pixels": pixels.numpy()})[0]
    return f"| ONNX (pooled image features) | {np.abs(got - want).max():.2e} | - |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("--images", type=Path, default=Path("/usr/share/openclipart/png"))
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images, titles = sample(args.images, args.n, args.seed)
    want_image, want_text, pixels, clip = ours(args.run, images, titles)
    sizes = sorted({i.size for i in images})
    print(f"{len(images)} images ({len(sizes)} distinct sizes, e.g. {sizes[:3]}), {len(titles)} titles, "
          f"{sum(any(ord(c) > 127 for c in t) for t in titles)} with non-ASCII characters")
    print("| export | max abs diff, image embeddings | max abs diff, text embeddings |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        print(open_clip_row(args.run, Path(scratch) / "oc", images, titles, want_image, want_text))
        try:
            for row in hf_rows(args.run, Path(scratch) / "hf", images, titles, want_image, want_text,
                               clip.tokenize.context_length, pixels):
                print(row)
        except ConfigError as err:
            print(f"| transformers | refused: {err} | |")
        print(onnx_row(args.run, Path(scratch) / "onnx", pixels, clip))


if __name__ == "__main__":
    main()
