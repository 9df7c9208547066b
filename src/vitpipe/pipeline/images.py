"""Decoding and encoding of single images with hard bounds (pixels, formats, modes)."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageColor

EXTENSIONS = ("jpg", "png", "webp")
_PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


class ImageRejected(ValueError):
    """An image that cannot be used; ``reason`` is the failure class counted in the manifest."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def open_bounded(data: bytes, max_pixels: int) -> Image.Image:
    """Open and fully decode ``data``; the pixel bound is checked from the header, before decoding."""
    if not data:
        raise ImageRejected("empty_file")
    try:
        with warnings.catch_warnings():
            # our own bound below is stricter than PIL's bomb warning; keep logs clean
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected("too_many_pixels", f"{width}x{height}")
            image.load()
    except ImageRejected:
        raise
    except Image.DecompressionBombError as err:
        raise ImageRejected("too_many_pixels", str(err)) from None
    except (OSError, SyntaxError, ValueError) as err:
        reason = "truncated_image" if "truncated" in str(err).lower() else "not_an_image"
        raise ImageRejected(reason, str(err)) from None
    return image


def to_rgb(image: Image.Image, background: str = "white") -> Image.Image:
    """Any mode (CMYK, palette, alpha, 16-bit greyscale) to RGB; alpha is composited on ``background``
    (a PIL colour) rather than dropped, which would leave whatever the transparent pixels hold."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:  # tRNS colour keys on P, RGB, L too
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, ImageColor.getrgb(background)[:3])
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = array.max() or 1.0
        return Image.fromarray((array * (255.0 / top)).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def resize_to_fit(image: Image.Image, size: int, mode: str, background: str = "white") -> Image.Image:
    """Resize like img2dataset's modes so local and web sources give the same shapes; "border" pads
    with ``background`` (img2dataset pads with white), the colour transparency is composited on."""
    if size <= 0 or mode == "no":
        return image
    width, height = image.size
    if mode == "center_crop":
        scale = size / min(width, height)
        image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
        left = (image.width - size) // 2
        top = (image.height - size) // 2
        return image.crop((left, top, left + size, top + size))
    scale = size / max(width, height)
    image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)
    if mode == "keep_ratio":
        return image
    fill = ImageColor.getcolor(background, image.mode if image.mode in ("RGB", "L") else "RGB")
    canvas = Image.new(image.mode, (size, size), fill)  # "border": pad to a square
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return canvas


def encode(image: Image.Image, ext: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    options = {"quality": quality} if ext in ("jpg", "webp") else {}
    image.save(buffer, format=_PIL_FORMATS[ext], **options)
    return buffer.getvalue()


def decode_rgb(data: bytes, max_pixels: int = 200_000_000) -> Image.Image:
    """Decode shard image bytes for training/eval (RGB)."""
    return to_rgb(open_bounded(data, max_pixels))
