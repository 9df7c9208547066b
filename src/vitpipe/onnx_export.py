"""`vitpipe export RUN --format onnx`: any objective's encoder as one ONNX graph with a dynamic batch,
giving the pooled features vitpipe's probes and k-NN use (torch.onnx's torch.export-based exporter)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from vitpipe.config import ConfigError

INPUT, OUTPUT = "pixels", "features"
OPSET = 18


class PooledFeatures(torch.nn.Module):
    """pixels [B, C, H, W] (float32, resized, centre-cropped and normalised as config.json says)
    -> features [B, D]: the encoder's output pooled as its evaluations pool it."""

    def __init__(self, encoder: torch.nn.Module, pool: str | None) -> None:
        super().__init__()
        self.encoder, self.pool = encoder, pool

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder.pool(self.encoder.forward_features(pixels), self.pool)


def onnx_model(encoder: torch.nn.Module, data) -> bytes:
    """The serialised ONNX model of ``encoder`` for inputs shaped by ``data`` (a DataConfig)."""
    try:
        import onnxscript  # noqa: F401 - torch.onnx's exporter needs it
    except ImportError:
        raise ConfigError("--format onnx needs onnx and onnxscript: pip install 'vitpipe[onnx]'") from None
    pool = getattr(getattr(encoder, "config", None), "pool", None)  # a ViT's configured pooling
    module = PooledFeatures(encoder.eval(), pool).eval()
    example = torch.zeros(2, data.channels, data.image_size, data.image_size)
    with tempfile.TemporaryDirectory(prefix="vitpipe-onnx-") as scratch:
        path = Path(scratch) / "model.onnx"
        torch.onnx.export(module, (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=OPSET, dynamo=True,
                          verbose=False, external_data=False)
        return path.read_bytes()


def onnx_config(data, objective: str) -> dict[str, Any]:
    """What a serving stack needs to feed the graph: the input's name, shape and preprocessing."""
    return {"architecture": "onnx", "objective": objective, "opset": OPSET,
            "input": {"name": INPUT, "shape": ["batch", data.channels, data.image_size, data.image_size],
                      "dtype": "float32", "resize": "shorter side to image_size (bicubic, antialiased), centre crop",
                      "scale": "pixel / 255", "mean": list(data.mean[: data.channels]),
                      "std": list(data.std[: data.channels]), "channels": "RGB" if data.channels == 3 else "grey"},
            "output": {"name": OUTPUT, "shape": ["batch", "dim"], "dtype": "float32"}}
