"""`vitpipe export --format onnx`: every objective's encoder as one ONNX graph whose features, run
by onnxruntime at any batch size, equal vitpipe's to 1e-4."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_models import SMALL_SECTIONS, synthetic_read
from test_trainer import RUN_ARGS
from vitpipe.cli import main
from vitpipe.onnx_export import PooledFeatures, onnx_model
from vitpipe.ssl import registry
from vitpipe.ssl.registry import OBJECTIVES, build_objective

ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objectives_encoder_exports_to_onnx_with_the_same_features(name, tmp_path):
    torch.manual_seed(0)
    spec = registry.get(name)
    config = registry.pretrain_config(name, None, ["model.size=micro", "data.image_size=16", "model.patch_size=4",
                                                   *SMALL_SECTIONS.get(name, [])])
    artifacts = spec.fit_artifacts(config, synthetic_read) if spec.fit_artifacts else {}
    encoder = build_objective(config, artifacts).encoder().eval()
    session = ort.InferenceSession(onnx_model(encoder, config.data))
    pool = getattr(getattr(encoder, "config", None), "pool", None)
    for batch in (1, 5):  # the graph's batch is dynamic
        pixels = torch.randn(batch, config.data.channels, 16, 16)
        with torch.no_grad():
            expected = PooledFeatures(encoder, pool)(pixels).numpy()
        got = session.run(["features"], {"pixels": pixels.numpy()})[0]
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4


def test_export_onnx_through_the_cli_writes_the_graph_its_input_spec_and_a_card(tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "mae", "--data", str(tiny_shards), "--out", str(run), *RUN_ARGS, "train.max_steps=1"]) == 0
    out = tmp_path / "onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["input"]["name"] == "pixels" and config["input"]["shape"] == ["batch", 3, 16, 16]
    assert "onnxruntime.InferenceSession" in (out / "README.md").read_text()
    session = ort.InferenceSession(str(out / "model.onnx"))
    assert session.get_inputs()[0].name == "pixels" and session.get_outputs()[0].name == "features"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 2  # never replaced silently
